"""Scores of answers: ROUGE (Lin 2004) by Google's ``rouge_score`` package (no network; F-measure, Porter
stemming; ROUGE-Lsum needs sentences on separate lines, split after ``.``, ``!`` or ``?`` followed by
whitespace) and the percentile bootstrap of a paired mean difference."""

import itertools
import math
import random
import re
import statistics

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
#: The two models every comparison has: the base model (adapter disabled) and the fine-tuned one.
MODELS = ("base", "finetuned")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences_on_lines(text: str) -> str:
    return "\n".join(_SENTENCE_END.split(text.strip()))


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict]:
    """ROUGE F-measures of each prediction against its reference.

    :return: one dict per pair, keys ``ROUGE_TYPES``, values in [0, 1].
    :raises ValueError: the lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [
        {name: score.fmeasure for name, score in scorer.score(_sentences_on_lines(ref), _sentences_on_lines(pred)).items()}
        for pred, ref in zip(predictions, references)
    ]


def mean(values: list[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return sum(values) / len(values) if values else float("nan")


def bootstrap_mean_difference_ci(
    differences: list[float], seed: int, samples: int = 2000, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13) of the mean of paired differences.

    :return: (low, high) bounds of the ``confidence`` interval.
    """
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(mean([differences[rng.randrange(n)] for _ in range(n)]) for _ in range(samples))
    tail = (1 - confidence) / 2
    return means[int(tail * samples)], means[min(samples - 1, int((1 - tail) * samples))]


#: Level of every confidence interval of this module.
CONFIDENCE = 0.95
#: Power at which ``detectable_difference`` is stated: the convention of Cohen (1988), *Statistical Power
#: Analysis for the Behavioral Sciences*, 2nd ed., §2.4.
POWER = 0.8


def minimum_questions(confidence: float = CONFIDENCE) -> int:
    """The fewest paired questions on which any outcome can be told from chance at ``confidence``: the
    smallest ``n`` with ``2 * 0.5**n < 1 - confidence``, where an exact two-sided sign test (Conover 1999,
    *Practical Nonparametric Statistics*, 3rd ed., §3.4) could reject "no difference" even when one model
    wins every question. 6 at 95%: on 5 questions, 5 wins out of 5 have p = 0.0625."""
    n = 1
    while 2 * 0.5**n >= 1 - confidence:
        n += 1
    return n


#: Hold-out questions below which a verdict is not conclusive (``minimum_questions`` at ``CONFIDENCE``).
MIN_HOLD_OUT_QUESTIONS = minimum_questions()


def detectable_difference(differences: list[float], confidence: float = CONFIDENCE, power: float = POWER):
    """The smallest mean paired difference that ``len(differences)`` questions detect at ``confidence``
    (two-sided) with ``power``, from the observed spread of the differences: the minimum detectable effect
    ``(z[1 - (1 - confidence) / 2] + z[power]) * s / sqrt(n)`` of Bloom (1995), "Minimum detectable
    effects", *Evaluation Review* 19(5), with ``s`` the sample standard deviation (n - 1) of the paired
    differences; 2.80 s / sqrt(n) at 95% and 80%. In the differences' units (ROUGE-L: 0-1).

    :return: the difference, or None for fewer than two questions (no spread to measure).
    """
    if len(differences) < 2:
        return None
    normal = statistics.NormalDist()
    z = normal.inv_cdf(1 - (1 - confidence) / 2) + normal.inv_cdf(power)
    return z * statistics.stdev(differences) / math.sqrt(len(differences))


def conclusiveness(differences: list[float]) -> dict:
    """Whether a paired verdict on these questions can conclude, and what it could detect.

    :return: ``{"conclusive": bool, "reason": str or None, "questions": n, "minimum_questions":
        MIN_HOLD_OUT_QUESTIONS, "detectable_difference": detectable_difference(differences) (None below
        two questions), "confidence": CONFIDENCE, "power": POWER}``; ``reason`` says why not when not.
    """
    n = len(differences)
    reason = None
    if n < MIN_HOLD_OUT_QUESTIONS:
        reason = (f"{n} question(s) are fewer than {MIN_HOLD_OUT_QUESTIONS}: on so few even a model that won every "
                  f"question could not be told from chance at the {CONFIDENCE:.0%} level (exact two-sided sign test, "
                  f"p = 2 * 0.5^{n} = {2 * 0.5**n:.3g})")
    return {"conclusive": reason is None, "reason": reason, "questions": n,
            "minimum_questions": MIN_HOLD_OUT_QUESTIONS, "detectable_difference": detectable_difference(differences),
            "confidence": CONFIDENCE, "power": POWER}


#: A "loop": some word 4-gram occurring 3 or more times in one answer (the issue's measure of answers that
#: repeat themselves, e.g. "the mother is the source of the universe, and the universe is the source of
#: the mother"; word n-gram repetition as in Welleck et al. 2020, "Neural text generation with
#: unlikelihood training", counted per answer).
LOOP_NGRAM = 4
LOOP_MIN_COUNT = 3
#: The repetition measures of ``repetition_measures``, in report order.
REPETITION_MEASURES = ("loop_rate", "distinct_1", "distinct_2")
_WORD = re.compile(r"\w+(?:'\w+)?")


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927, "Probable inference, the law of succession, and
    statistical inference"; Agresti & Coull 1998 recommend it over the normal approximation for small
    ``trials`` and proportions near 0 or 1). ``z`` = 1.96 gives the 95% interval.

    :return: (low, high), within [0, 1]; (NaN, NaN) for no trials.
    """
    if trials == 0:
        return float("nan"), float("nan")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (runs of letters, digits and underscores, with an inner apostrophe);
    punctuation is dropped."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def has_loop(text: str, n: int = LOOP_NGRAM, min_count: int = LOOP_MIN_COUNT) -> bool:
    """Whether some word ``n``-gram occurs ``min_count`` or more times in ``text`` (overlapping
    occurrences counted)."""
    counts: dict = {}
    for gram in _ngrams(words(text), n):
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= min_count:
            return True
    return False


def answer_distinct_n(text: str, n: int) -> float:
    """Distinct-n of one answer: its distinct word n-grams divided by all its word n-grams (Li et al.
    2016's ratio, "A diversity-promoting objective function for neural conversation models", taken within
    the answer); in (0, 1], lower is more repetitive; NaN when the answer has fewer than ``n`` words."""
    grams = _ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else float("nan")


def distinct_n(texts: list[str], n: int) -> float:
    """Mean ``answer_distinct_n`` over ``texts`` (answers shorter than ``n`` words left out; NaN when all
    are). Taken per answer, it measures repetition inside answers (loops), not answers resembling each
    other, and it pairs answer by answer for a bootstrap CI."""
    return mean([v for v in (answer_distinct_n(t, n) for t in texts) if v == v])


def repetition_measures(texts: list[str]) -> dict:
    """``loop_rate`` (share of ``texts`` with a loop, ``has_loop``), ``distinct_1`` and ``distinct_2``
    (``distinct_n`` over all ``texts``)."""
    return {
        "loop_rate": mean([float(has_loop(t)) for t in texts]),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


def repetition_difference(a_texts: list[str], b_texts: list[str], seed: int) -> dict:
    """The repetition measures of ``b_texts`` minus those of ``a_texts`` (paired answers to the same
    questions), each with the percentile bootstrap 95% CI of the mean per-question difference
    (``bootstrap_mean_difference_ci``, as for ROUGE-L; for distinct-n, over the questions whose two
    answers both have ``n`` words or more).

    :return: ``{measure: {"mean", "ci95_low", "ci95_high"}}`` for each of ``REPETITION_MEASURES``.
    :raises ValueError: the lists differ in length.
    """
    if len(a_texts) != len(b_texts):
        raise ValueError(f"{len(a_texts)} answers against {len(b_texts)}: a paired comparison needs equal lengths.")
    per_answer = {"loop_rate": lambda t: float(has_loop(t)), "distinct_1": lambda t: answer_distinct_n(t, 1),
                  "distinct_2": lambda t: answer_distinct_n(t, 2)}
    result = {}
    for measure, value in per_answer.items():
        pairs = [(value(a), value(b)) for a, b in zip(a_texts, b_texts)]
        differences = [y - x for x, y in pairs if x == x and y == y]  # NaN: an answer too short for n-grams
        low, high = bootstrap_mean_difference_ci(differences, seed) if differences else (float("nan"),) * 2
        result[measure] = {"mean": mean(differences), "ci95_low": low, "ci95_high": high}
    return result


def answer_summary(texts: list[str], ended_on_eos: list[bool], new_tokens: list[int], scores: list[dict]) -> dict:
    """One model's answers summed up: mean ROUGE F-measures (``ROUGE_TYPES``, 0–1, from ``scores``, one dict
    per answer), ``eos_stop_rate`` (share that ended on EOS), ``mean_answer_words``, ``mean_new_tokens``,
    the ``repetition_measures``, ``loop_rate_ci95_low`` and ``loop_rate_ci95_high`` (the loop rate's Wilson
    95% interval, ``wilson_interval``) and ``count``."""
    loops = sum(has_loop(t) for t in texts)
    low, high = wilson_interval(loops, len(texts))
    return {
        **{name: mean([s[name] for s in scores]) for name in ROUGE_TYPES},
        "eos_stop_rate": mean([float(ended) for ended in ended_on_eos]),
        "mean_answer_words": mean([len(t.split()) for t in texts]),
        "mean_new_tokens": mean([float(n) for n in new_tokens]),
        **repetition_measures(texts),
        "loop_rate_ci95_low": low,
        "loop_rate_ci95_high": high,
        "count": len(texts),
    }


#: ROUGE-L F-measure difference (0–1) below which a question is a tie between two answers
#: (``per_question_outcomes``): this project's choice, about one shared word in twenty of a 20-word
#: reference. The input ``tie_tolerance`` overrides it; every count is reported with the tolerance used.
TIE_TOLERANCE = 0.05


def per_question_outcomes(differences: list[float], categories: list[str], tolerance: float = TIE_TOLERANCE) -> dict:
    """Question-by-question wins, ties and losses of the second model of a pair over the first, from the
    per-question ROUGE-L differences (second minus first): a win above ``tolerance``, a loss below
    ``-tolerance``, a tie otherwise (a NaN difference is a tie).

    :param differences: one per question.
    :param categories: each question's category, in the same order.
    :return: ``{"tolerance", "wins", "ties", "losses", "per_category": {category: {"wins", "ties",
        "losses"}}}``; the three counts add up to the questions, overall and in each category.
    """
    def outcome(difference: float) -> str:
        return "wins" if difference > tolerance else "losses" if difference < -tolerance else "ties"

    counts = {"wins": 0, "ties": 0, "losses": 0}
    per_category = {}
    for difference, category in zip(differences, categories):
        kind = outcome(difference)
        counts[kind] += 1
        per_category.setdefault(category, {"wins": 0, "ties": 0, "losses": 0})[kind] += 1
    return {"tolerance": tolerance, **counts, "per_category": dict(sorted(per_category.items()))}


def most_changed(differences: list[float], count: int) -> dict:
    """Indices of the ``count`` questions the second model won by most and lost by most (ROUGE-L difference,
    largest first; ties between equal differences in question order).

    :return: ``{"won": [index, ...], "lost": [index, ...]}``, only questions with a positive (won) or
        negative (lost) difference.
    """
    won = sorted((index for index, d in enumerate(differences) if d > 0), key=lambda i: (-differences[i], i))
    lost = sorted((index for index, d in enumerate(differences) if d < 0), key=lambda i: (differences[i], i))
    return {"won": won[:count], "lost": lost[:count]}


def verdict(references: list[str], categories: list[str], answers: dict, seed: int,
            tolerance: float = TIE_TOLERANCE, changed_count: int = 3) -> dict:
    """Every measure of this module for two or more models' answers to the same questions, and every pair's
    differences: the one implementation behind the main job's ``hold_out_set_metrics`` (base and
    fine-tuned) and ``philo-dataflow compare`` (any models).

    :param references: the reference answer of each question.
    :param categories: the category of each question.
    :param answers: model name -> ``{"texts", "ended_on_eos", "new_tokens"}``, lists in question order;
        pairs are taken in this order (``itertools.combinations``).
    :param seed: seed of every bootstrap resampling.
    :param tolerance: ROUGE-L difference within which a question is a tie (``per_question_outcomes``).
    :param changed_count: questions listed as won and lost by most (``most_changed``).
    :return: ``{"models": {name: answer_summary}, "per_category": {category: {name: answer_summary}}
        (categories sorted), "pairs": [...], "rougeL_per_question": {name: [...]}}``. Each pair ``{"a",
        "b", "rougeL_difference", "eos_stop_rate_difference", "loop_rate_difference", "distinct_1_difference",
        "distinct_2_difference", "rougeL_outcomes", "most_changed", "rougeL_verdict"}`` holds ``b`` minus ``a``: the mean
        per-question ROUGE-L difference and EOS-stop difference (1 or 0 per answer) with their paired
        percentile bootstrap 95% CIs (``bootstrap_mean_difference_ci``), the
        ``repetition_difference``, the wins, ties and losses of ``b`` (``per_question_outcomes``) and the
        indices of the questions ``b`` won and lost by most (``most_changed``), and whether the ROUGE-L
        verdict can conclude on so many questions and the smallest difference they could detect
        (``conclusiveness``).
    """
    scores = {name: rouge_per_example(given["texts"], references) for name, given in answers.items()}

    def summary(name: str, indices: list[int]) -> dict:
        given = answers[name]
        return answer_summary([given["texts"][i] for i in indices], [given["ended_on_eos"][i] for i in indices],
                              [given["new_tokens"][i] for i in indices], [scores[name][i] for i in indices])

    by_category: dict = {}
    for index, category in enumerate(categories):
        by_category.setdefault(category, []).append(index)
    pairs = []
    for a, b in itertools.combinations(answers, 2):
        differences = [y["rougeL"] - x["rougeL"] for x, y in zip(scores[a], scores[b])]
        low, high = bootstrap_mean_difference_ci(differences, seed)
        repetition = repetition_difference(answers[a]["texts"], answers[b]["texts"], seed)
        stops = [float(y) - float(x) for x, y in zip(answers[a]["ended_on_eos"], answers[b]["ended_on_eos"])]
        stop_low, stop_high = bootstrap_mean_difference_ci(stops, seed)
        pairs.append({"a": a, "b": b,
                      "rougeL_difference": {"mean": mean(differences), "ci95_low": low, "ci95_high": high},
                      "eos_stop_rate_difference": {"mean": mean(stops), "ci95_low": stop_low, "ci95_high": stop_high},
                      **{f"{measure}_difference": repetition[measure] for measure in REPETITION_MEASURES},
                      "rougeL_outcomes": per_question_outcomes(differences, categories, tolerance),
                      "most_changed": most_changed(differences, changed_count),
                      "rougeL_verdict": conclusiveness(differences)})
    everything = list(range(len(references)))
    return {
        "models": {name: summary(name, everything) for name in answers},
        "per_category": {category: {name: summary(name, indices) for name in answers}
                         for category, indices in sorted(by_category.items())},
        "pairs": pairs,
        "rougeL_per_question": {name: [s["rougeL"] for s in scores[name]] for name in answers},
    }
