"""The paraphrase-aware split: reworded questions ("Can you explain: ...") and records of one ``group``
land in one split, the hold-out's leakage is 0, and with no group of two records the split is the
record-level split of earlier versions, record for record."""

import random
from collections import defaultdict

import pytest
from conftest import EXAMPLE_DATA, SHARED_DATA

from philo_dataflow import preflight
from philo_dataflow.lib.inputs import DEFAULTS, hyperparameter_problems
from philo_dataflow.lib.near_duplicates import (
    content_word_jaccard,
    content_words,
    groups_of,
    jaccard,
    leaked_questions,
    lsh_bands,
    near_duplicate_groups,
)
from philo_dataflow.lib.records import normalised_pairs, read_records
from philo_dataflow.stages.report import _near_duplicate_lines
from philo_dataflow.stages.splitting import SPLIT_NAMES, data_splits, split_summary

#: Thirty questions of this test's own (four or more content words each, none containing "explain"),
#: with short answers, by school.
QUESTIONS = {
    "Stoicism": [
        ("What did Epictetus mean by the dichotomy of control?", "Some things are up to us, others are not."),
        ("How should a Stoic respond to an insult from a stranger?",
         "Calmly, since the insult harms only the one who gives it."),
        ("Why did Marcus Aurelius write his Meditations each evening?", "To examine his day and train his judgement."),
        ("What role does virtue play in Stoic ethics and happiness?",
         "Virtue is the only good and enough for happiness."),
        ("How does Seneca advise readers to face the fear of death?",
         "By rehearsing it daily until it loses its terror."),
        ("Why do Stoics call wealth and health preferred indifferents?",
         "They are worth choosing but not needed for a good life."),
        ("What practice of negative visualisation did Stoic teachers recommend?",
         "Imagining loss so as to value what one has."),
        ("How does Stoic logos connect human reason with nature?",
         "Human reason is a fragment of the reason ordering the cosmos."),
        ("Why did Zeno of Citium teach on a painted porch?",
         "The Stoa Poikile was a public place open to all listeners."),
        ("What does Stoicism teach about anger and revenge?", "Anger is a brief madness and revenge a second injury."),
    ],
    "Taoism": [
        ("What is wu wei in the Tao Te Ching?", "Effortless action that follows the grain of things."),
        ("Why does Laozi compare the sage to flowing water?", "Water is soft and yielding yet wears away stone."),
        ("How does Zhuangzi's butterfly dream question ordinary certainty?",
         "It asks how we know which state is the real one."),
        ("What does the uncarved block symbolise in Taoist thought?",
         "Original simplicity before desire and convention."),
        ("How do yin and yang balance each other in Taoism?", "Each holds the seed of the other and gives way to it."),
        ("Why do Taoist texts praise emptiness and stillness?",
         "Emptiness makes room for use and stillness for clarity."),
        ("How should a Taoist ruler govern a large state?", "Lightly, like cooking a small fish."),
        ("What does Taoism say about ambition and desire for fame?",
         "Fame and striving exhaust the self and invite loss."),
        ("Why does the Tao Te Ching begin by saying the Tao cannot be named?",
         "Any name fixes what is always changing."),
        ("How does Taoism view death as a natural transformation?", "Death is one more change in the flow of the Tao."),
    ],
    "Buddhism": [
        ("What are the Four Noble Truths of the Buddha?", "Suffering, its origin, its end and the path to its end."),
        ("How does the Buddhist doctrine of anatta deny a permanent self?",
         "The self is a changing bundle of processes."),
        ("Why does Buddhism treat craving as the root of suffering?", "Craving clings to what cannot last."),
        ("What is the Noble Eightfold Path meant to achieve?",
         "The end of suffering through ethics, focus and wisdom."),
        ("How does mindfulness meditation train attention in Buddhism?",
         "By returning again and again to the present moment."),
        ("What does karma mean in early Buddhist teaching?", "Intentional action and the results it brings."),
        ("Why is the middle way between indulgence and asceticism important to Buddhists?",
         "Neither extreme frees the mind."),
        ("How does dependent origination account for rebirth?",
         "Each moment arises from conditions set by earlier ones."),
        ("What is nirvana according to the Pali Canon?", "The blowing out of greed, hatred and delusion."),
        ("How does Buddhist compassion extend to all sentient beings?",
         "Every being suffers, so every being is owed kindness."),
    ],
}


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _twinned_records() -> list[dict]:
    """Every question of ``QUESTIONS`` and, after all of them, its rewording."""
    originals = [{"input_text": q, "output_text": a, "category": school}
                 for school, pairs in QUESTIONS.items() for q, a in pairs]
    twins = [{"input_text": f"Can you explain: {_lower_first(r['input_text'])}",
              "output_text": f"To put it simply, {_lower_first(r['output_text'])}", "category": r["category"]}
             for r in originals]
    return originals + twins


def _record_level_split(records: list[dict], validation_fraction=0.1, hold_out_fraction=0.1, seed=42) -> dict:
    """The split before this change (``splitting.data_splits`` as of commit fd6f286), as the reference."""
    def split_count(n, fraction):
        return max(1, round(n * fraction)) if n >= 3 else 0

    by_category = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record)
    rng = random.Random(seed)
    splits = {"train_set": [], "validation_set": [], "hold_out_set": []}
    for category in sorted(by_category):
        shuffled = list(by_category[category])
        rng.shuffle(shuffled)
        n_hold_out = split_count(len(shuffled), hold_out_fraction)
        n_validation = split_count(len(shuffled), validation_fraction)
        splits["hold_out_set"] += shuffled[:n_hold_out]
        splits["validation_set"] += shuffled[n_hold_out : n_hold_out + n_validation]
        splits["train_set"] += shuffled[n_hold_out + n_validation :]
    return splits


def _assert_record_level(splits: dict, records: list[dict], **inputs) -> None:
    reference = _record_level_split(records, **inputs)
    for name in SPLIT_NAMES:
        for column in ("input_text", "output_text", "category"):
            assert splits[name][column] == [r[column] for r in reference[name]], (name, column)


def _summary(splits: dict) -> dict:
    nothing_cut = {"policy": "truncate_prompt", **{name: {"prompt_truncated": [], "dropped": []} for name in SPLIT_NAMES}}
    return split_summary(*(splits[name] for name in SPLIT_NAMES), splits["near_duplicate_groups"], nothing_cut)


def _load(path) -> list[dict]:
    """The normalised pairs of a data file, as ``instruction_records`` gives them (duplicates dropped)."""
    return normalised_pairs(read_records(str(path)), str(path)).pairs


# --- the helpers -----------------------------------------------------------------------------------

def test_content_words_drop_stop_words_and_split_apostrophes():
    words = content_words("Can you explain: What is Zhuangzi's butterfly dream?")
    assert words == {"explain", "zhuangzi", "butterfly", "dream"}
    assert content_words("What is it?") == frozenset()
    assert jaccard(frozenset(), frozenset()) == 0.0
    twin = "Can you explain: what does Stoicism teach about anger and revenge?"
    assert content_word_jaccard("What does Stoicism teach about anger and revenge?", twin) == 0.8  # 4 of 5


def test_lsh_bands_miss_few_pairs_at_the_threshold():
    assert lsh_bands(0.8) == (25, 5)
    for threshold in (0.3, 0.5, 0.8, 0.95):
        bands, rows = lsh_bands(threshold)
        assert bands * rows <= 128 and bands >= 2
        assert (1 - threshold**rows) ** bands <= 1e-4


def test_groups_join_transitively_and_are_named_by_their_first_item():
    assert groups_of(5, [(3, 4), (1, 3)]) == [0, 1, 2, 1, 1]
    # a ~ b (0.8) and b ~ c (0.8), a and c only 0.67: one group
    a = "Stoic virtue wisdom courage justice"
    b = "Stoic virtue wisdom courage justice temperance"
    c = "Stoic virtue wisdom courage temperance"
    assert content_word_jaccard(a, c) < 0.8 <= min(content_word_jaccard(a, b), content_word_jaccard(b, c))
    assert near_duplicate_groups([c, "Taoist water", a, b], 0.8) == [0, 1, 0, 0]


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.8, 1.0])
def test_groups_and_leakage_equal_brute_force(threshold):
    questions = [r["input_text"] for r in _twinned_records() + _load(EXAMPLE_DATA)]
    words = [content_words(q) for q in questions]
    brute_pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words))
                   if jaccard(words[i], words[j]) >= threshold]
    assert near_duplicate_groups(questions, threshold) == groups_of(len(questions), brute_pairs)
    hold_out, train = questions[::7], [q for i, q in enumerate(questions) if i % 7]
    brute_leaked = [i for i, q in enumerate(hold_out) if any(content_word_jaccard(q, t) >= threshold for t in train)]
    assert leaked_questions(hold_out, train, threshold) == brute_leaked


# --- the split -------------------------------------------------------------------------------------

def test_reworded_twins_leak_into_the_record_level_split_and_not_into_the_grouped_one():
    records = _twinned_records()
    # threshold 1.0: no twin has its question's exact content words, so no group forms
    record_level = data_splits(records, "twins.jsonl", near_duplicate_threshold=1.0)
    assert record_level["near_duplicate_groups"] == {"threshold": 1.0, "groups": []}
    _assert_record_level(record_level, records)
    leakage_before = leaked_questions(record_level["hold_out_set"]["input_text"],
                                      record_level["train_set"]["input_text"], 0.8)
    assert len(leakage_before) >= len(record_level["hold_out_set"]) // 2  # measured: 5 of 6

    grouped = data_splits(records, "twins.jsonl")
    groups = grouped["near_duplicate_groups"]["groups"]
    assert len(groups) == 30 and all(len(group) == 2 and group[1] == f"Can you explain: {_lower_first(group[0])}"
                                     for group in groups)
    summary = _summary(grouped)
    assert summary["hold_out_set"]["leakage"] == {"threshold": 0.8, "questions": 0, "share": 0.0}
    assert sum(summary[name]["near_duplicate_groups"]["groups"] for name in SPLIT_NAMES) == 30
    assert sum(summary[name]["near_duplicate_groups"]["records"] for name in SPLIT_NAMES) == 60
    for name in SPLIT_NAMES:  # each question beside its twin
        questions = set(grouped[name]["input_text"])
        assert all((group[0] in questions) == (group[1] in questions) for group in groups)
    # 20 records per school: 2 to hold-out, 2 to validation, as before; one pair each
    assert [len(grouped[name]) for name in SPLIT_NAMES] == [48, 6, 6]
    assert sorted(grouped["hold_out_set"]["category"]) == sorted(["Stoicism", "Taoism", "Buddhism"] * 2)


def test_example_data_split_is_the_record_level_split():
    pairs = _load(EXAMPLE_DATA)
    splits = data_splits(pairs, str(EXAMPLE_DATA))
    assert splits["near_duplicate_groups"]["groups"] == []  # no pair of example questions reaches 0.8
    _assert_record_level(splits, pairs)
    _assert_record_level(data_splits(pairs, "x", seed=7, hold_out_fraction=0.2), pairs, seed=7, hold_out_fraction=0.2)
    assert _summary(splits)["hold_out_set"]["leakage"]["questions"] == 0


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="shared phillm data not present")
def test_phillm_split_is_the_record_level_split():
    pairs = _load(SHARED_DATA)
    splits = data_splits(pairs, str(SHARED_DATA))
    assert splits["near_duplicate_groups"]["groups"] == []  # its most similar questions reach 0.71
    _assert_record_level(splits, pairs)
    summary = _summary(splits)
    assert [summary[name]["total"] for name in SPLIT_NAMES] == [822, 104, 104]
    assert summary["hold_out_set"]["leakage"]["questions"] == 0


def test_records_of_one_group_key_share_a_split_and_columns_are_carried():
    records = [{"input_text": f"Stoic question number {i} about virtue {i * 7}", "output_text": f"answer {i}",
                "category": "Stoicism" if i % 3 else "Taoism"} for i in range(40)]
    for i in range(0, 40, 2):  # twenty two-record conversations, some spanning two categories
        records[i]["group"] = records[i + 1]["group"] = f"tree-{i // 2}"
        records[i + 1]["context"] = f'[{{"role": "user", "content": "{records[i]["input_text"]}"}}]'
    splits = data_splits(records, "trees.jsonl", near_duplicate_threshold=1.0)
    where = {question: name for name in SPLIT_NAMES for question in splits[name]["input_text"]}
    for i in range(0, 40, 2):
        assert where[records[i]["input_text"]] == where[records[i + 1]["input_text"]]
    for name in SPLIT_NAMES:
        assert splits[name].column_names == ["input_text", "output_text", "category", "context", "group"]
        for row in splits[name]:
            index = int(row["output_text"].split()[1])
            assert row["group"] == f"tree-{index // 2}"
            assert row["context"] == records[index].get("context", "[]")
    assert splits["near_duplicate_groups"]["groups"] == []  # group keys are no near-duplicates


def test_same_seed_same_split_other_seed_other_split():
    records = _twinned_records()
    first, again, other = (data_splits(records, "x", seed=seed) for seed in (42, 42, 7))
    for name in SPLIT_NAMES:
        assert first[name].to_dict() == again[name].to_dict()
    assert first["near_duplicate_groups"] == again["near_duplicate_groups"] == other["near_duplicate_groups"]
    assert first["hold_out_set"]["input_text"] != other["hold_out_set"]["input_text"]
    assert _summary(other)["hold_out_set"]["leakage"]["questions"] == 0


# --- the input, the preflight and the report -------------------------------------------------------

@pytest.mark.parametrize("value", [0, -0.1, 1.5, None, "high"])
def test_threshold_out_of_range_is_one_problem(value, tmp_path):
    problems = hyperparameter_problems({"near_duplicate_threshold": value})
    assert [p.input for p in problems] == ["near_duplicate_threshold"]
    assert "--near-duplicate-threshold" in problems[0].message and "in (0, 1]" in problems[0].message
    with pytest.raises(ValueError, match="near_duplicate_threshold"):
        data_splits(_twinned_records(), "x", near_duplicate_threshold=value)
    # the preflight reports it once, as the input's problem, not again as the data's
    problems, found = preflight.data_problems({**DEFAULTS, "data_path": str(EXAMPLE_DATA),
                                               "near_duplicate_threshold": value}, {"near_duplicate_threshold"})
    assert problems == [] and found is not None


def test_preflight_splits_with_the_threshold():
    problems, found = preflight.data_problems({**DEFAULTS, "data_path": str(EXAMPLE_DATA)}, set())
    assert problems == [] and len(found.pairs) == 306


def test_report_states_groups_and_leakage():
    summary = _summary(data_splits(_twinned_records(), "x"))
    (blank, line) = _near_duplicate_lines(summary)
    assert line == ("Near-duplicate questions (content-word Jaccard >= 0.8): 30 group(s) of 60 records, each kept in "
                    "one split; hold-out questions with a near-duplicate in train: 0 (0%).")
    assert _near_duplicate_lines({"hold_out_set": {"total": 3, "per_category": {}}}) == []
