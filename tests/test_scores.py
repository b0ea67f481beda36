"""Scores of answers: the repetition measures (loop rate, distinct-n) against hand counts, their paired
bootstrap CIs, and their place in ``hold_out_set_metrics``."""

import math

import pytest

from philo_dataflow.lib.scores import (
    distinct_n,
    has_loop,
    most_changed,
    per_question_outcomes,
    repetition_difference,
    repetition_measures,
    wilson_interval,
    words,
)
from philo_dataflow.stages.metrics import hold_out_set_metrics

#: The issue's example of a tuned answer that loops, once more round: "is the source of" occurs three times.
LOOPING = ("The mother is the source of the universe, and the universe is the source of the mother, and the "
           "mother is the source of the universe.")


def test_words_drop_punctuation_and_case():
    assert words("The Way, that can't be told!") == ["the", "way", "that", "can't", "be", "told"]


@pytest.mark.parametrize("text, loops", [
    (LOOPING, True),
    ("a b c d a b c d", False),                      # a 4-gram twice is not a loop
    ("a b c d a b c d a b c d", True),               # three times is
    ("a a a a a a", True),                           # overlapping occurrences count: (a a a a) x3
    ("A b c d. a B c D! a b, c d?", True),           # case and punctuation do not hide a repeat
    ("", False),
])
def test_has_loop_counts_a_four_gram_three_times(text, loops):
    assert has_loop(text) is loops


def test_distinct_n_is_the_mean_share_of_distinct_ngrams_per_answer():
    texts = ["a b a b", "a c", "one"]
    # per answer, unigrams: 2 of 4, 2 of 2, 1 of 1; bigrams: (ab ba ab) 2 of 3, (ac) 1 of 1, none.
    assert distinct_n(texts, 1) == pytest.approx((0.5 + 1 + 1) / 3)
    assert distinct_n(texts, 2) == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(distinct_n(["one"], 2))


def test_repetition_measures_of_a_set_of_answers():
    measures = repetition_measures([LOOPING, "a b c", "x y z w x y z w"])
    assert measures["loop_rate"] == pytest.approx(1 / 3)
    assert set(measures) == {"loop_rate", "distinct_1", "distinct_2"}


def test_repetition_difference_ci_holds_the_difference_and_pairs_the_answers():
    base = [LOOPING] * 20 + ["plain words here now"] * 20
    tuned = ["a fresh answer each time number %d" % i for i in range(40)]
    diff = repetition_difference(base, tuned, seed=42)
    assert diff["loop_rate"]["mean"] == pytest.approx(-0.5)
    for measure in ("loop_rate", "distinct_1", "distinct_2"):
        d = diff[measure]
        assert d["ci95_low"] <= d["mean"] <= d["ci95_high"], measure
    assert diff["distinct_1"]["ci95_low"] > 0  # the tuned answers are plainly more varied
    same = repetition_difference(base, base, seed=42)
    assert all(same[m]["ci95_low"] == same[m]["ci95_high"] == 0 for m in same)  # paired: no spread


def test_repetition_difference_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="paired"):
        repetition_difference(["a"], ["a", "b"], seed=0)


def test_hold_out_set_metrics_carry_the_repetition_measures():
    rows = [
        {"question": f"q{i}", "category": "Stoicism" if i % 2 else "Taoism", "reference": "virtue is the good",
         "base_prediction": LOOPING if i < 3 else "virtue is good", "finetuned_prediction": "virtue is the good",
         "base_ended_on_eos": False, "finetuned_ended_on_eos": True, "base_new_tokens": 20, "finetuned_new_tokens": 5}
        for i in range(6)
    ]
    metrics = hold_out_set_metrics(rows, seed=42)
    assert metrics["base"]["loop_rate"] == pytest.approx(0.5)
    assert metrics["finetuned"]["loop_rate"] == 0.0
    assert metrics["finetuned"]["distinct_1"] == 1.0
    assert metrics["repetition_difference"]["loop_rate"]["mean"] == pytest.approx(-0.5)
    assert metrics["per_category"]["Taoism"]["base"]["loop_rate"] == pytest.approx(2 / 3)  # i = 0, 2 of 0, 2, 4
    assert (metrics["base"]["loop_rate_ci95_low"], metrics["base"]["loop_rate_ci95_high"]) == wilson_interval(3, 6)
    assert metrics["finetuned"]["loop_rate_ci95_low"] == 0.0 < metrics["finetuned"]["loop_rate_ci95_high"]


def test_wilson_interval_matches_published_values():
    # Newcombe 1998 (Statistics in Medicine 17:857), table I: 0/10 -> 0 to 0.2775, 15/148 -> 0.0624 to 0.1605.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high) and low < 0.5 < high  # symmetric about 1/2
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_per_question_outcomes_count_each_question_once_overall_and_per_category():
    differences = [0.3, 0.05, -0.05, -0.2, float("nan"), 0.051, 0.0]
    categories = ["a", "a", "b", "b", "b", "c", "c"]
    outcomes = per_question_outcomes(differences, categories, tolerance=0.05)
    assert (outcomes["wins"], outcomes["ties"], outcomes["losses"]) == (2, 4, 1)  # ±0.05 itself and NaN tie
    assert outcomes["per_category"] == {"a": {"wins": 1, "ties": 1, "losses": 0},
                                        "b": {"wins": 0, "ties": 2, "losses": 1},
                                        "c": {"wins": 1, "ties": 1, "losses": 0}}
    assert per_question_outcomes(differences, categories, tolerance=0.0)["ties"] == 2  # 0.0 and NaN


def test_most_changed_lists_the_largest_wins_and_losses_in_order():
    differences = [0.1, -0.4, 0.4, 0.0, -0.1, 0.4]
    assert most_changed(differences, 2) == {"won": [2, 5], "lost": [1, 4]}
    assert most_changed(differences, 10) == {"won": [2, 5, 0], "lost": [1, 4]}
    assert most_changed([0.0, 0.0], 3) == {"won": [], "lost": []}


def test_hold_out_set_metrics_count_questions_won_tied_and_lost():
    reference = "virtue is the only good and the wise live by it"
    answers = [("virtue is the only good and the wise live by it", "wealth"),  # fine-tuned wins
               ("wealth", "virtue is the only good and the wise live by it"),  # fine-tuned loses
               ("virtue is good", "virtue is good")]  # tie
    rows = [{"question": f"q{i}", "category": "Stoicism" if i else "Taoism", "reference": reference,
             "base_prediction": base, "finetuned_prediction": tuned, "base_ended_on_eos": True,
             "finetuned_ended_on_eos": True, "base_new_tokens": 3, "finetuned_new_tokens": 3}
            for i, (tuned, base) in enumerate(answers)]
    metrics = hold_out_set_metrics(rows, seed=42, tie_tolerance=0.05, most_changed_questions=1)
    outcomes = metrics["rougeL_outcomes"]
    assert (outcomes["wins"], outcomes["ties"], outcomes["losses"], outcomes["tolerance"]) == (1, 1, 1, 0.05)
    assert outcomes["per_category"] == {"Stoicism": {"wins": 0, "ties": 1, "losses": 1},
                                        "Taoism": {"wins": 1, "ties": 0, "losses": 0}}
    (won,), (lost,) = metrics["most_changed"]["won"], metrics["most_changed"]["lost"]
    assert (won["question"], won["finetuned_rougeL"], won["base_prediction"]) == ("q0", 1.0, "wealth")
    assert lost["question"] == "q1" and lost["rougeL_difference"] == -1.0
