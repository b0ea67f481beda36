"""Splitting: a seeded, category-stratified train / validation / hold-out split of groups of records.

Prompts are unique after ``instruction_records`` (duplicates are kept once), and near-duplicate conversations
(earlier turns and question; content-word Jaccard at or above ``near_duplicate_threshold``,
``lib.near_duplicates``) and records of
one ``group`` (one conversation, say) land in one split, so no question is held out whose rewording was
trained on. Every category with at least ``MIN_CATEGORY_RECORDS`` records (in two groups or more) is
represented in the validation and hold-out sets.
"""

import logging
import random
from collections import defaultdict

from datasets import Dataset
from hamilton.function_modifiers import extract_fields, tag

from ..lib.inputs import raise_hyperparameter_problems
from ..lib.near_duplicates import conversation_text, groups_of, leaked_questions, near_duplicate_pairs
from ..lib.problems import flag

logger = logging.getLogger(__name__)

#: The columns of the three splits; ``context`` (JSON list of earlier turns) and ``group`` default to
#: ``"[]"`` and ``""`` for records without them.
SPLIT_COLUMNS = ("input_text", "output_text", "category", "context", "group")
_COLUMN_DEFAULTS = {"context": "[]", "group": ""}
SPLIT_NAMES = ("train_set", "validation_set", "hold_out_set")

#: Records a category needs for the validation and hold-out splits to get one each.
MIN_CATEGORY_RECORDS = 3


def _split_count(n: int, fraction: float) -> int:
    """Records of a category of size ``n`` that go to a split of ``fraction``: at least one when n >=
    ``MIN_CATEGORY_RECORDS``, none below."""
    if fraction <= 0:
        return 0
    return max(1, round(n * fraction)) if n >= MIN_CATEGORY_RECORDS else 0


def _value(record: dict, column: str) -> str:
    """``record[column]``; for ``context`` and ``group``, their default where missing, None or empty."""
    return record.get(column) or _COLUMN_DEFAULTS[column] if column in _COLUMN_DEFAULTS else record[column]


def _takes(filled: int, wanted: int, size: int) -> bool:
    """Whether a split holding ``filled`` of its ``wanted`` records of a category takes a group of ``size``:
    when it is still empty, or when the group brings it closer to ``wanted`` (for a group of one: while
    ``filled < wanted``)."""
    return wanted > 0 and (filled == 0 or 2 * filled + size < 2 * wanted)


def _group_key_pairs(instruction_records: list[dict]) -> list:
    """Pairs of record indices joining the records of one non-empty ``group`` key (each to the first)."""
    first_with, pairs = {}, []
    for index, record in enumerate(instruction_records):
        group = record.get("group") or ""
        if group:
            pairs.append((first_with.setdefault(group, index), index))
    return pairs


def _members(roots: list) -> list:
    """The groups of ``roots`` (each record's group root, ``groups_of``) as lists of record indices, in
    order of their first record."""
    members = defaultdict(list)
    for index, root in enumerate(roots):
        members[root].append(index)
    return list(members.values())


def _grouping_cause(groups: list, threshold: float) -> str:
    """The part of the too-few-records message that names what the grouping joined, or ``""`` when every
    group is one record."""
    joined = [group for group in groups if len(group) > 1]
    if not joined:
        return ""
    records = sum(map(len, joined))
    return (f": the grouping joined {records} of them into {len(joined)} group(s) (largest {max(map(len, joined))}), "
            f"each kept whole in one split (near-duplicate conversations at near_duplicate_threshold={threshold} "
            f"({flag('near_duplicate_threshold')}), and records of one group key such as an OASST tree), leaving "
            f"{len(groups)} group(s) in all")


@extract_fields(
    {"train_set": Dataset, "validation_set": Dataset, "hold_out_set": Dataset, "near_duplicate_groups": dict}
)
def data_splits(
    instruction_records: list[dict],
    data_path: str,
    validation_fraction: float = 0.1,
    hold_out_fraction: float = 0.1,
    seed: int = 42,
    near_duplicate_threshold: float = 0.8,
) -> dict:
    """Splits the pairs into ``train_set``, ``validation_set`` and ``hold_out_set``, each group of records
    whole in one of them, and names the near-duplicate groups (``near_duplicate_groups``).

    Groups join, transitively, the records whose conversations (earlier user and assistant turns and the
    question, ``lib.near_duplicates.conversation_text``: for a single-turn record its question) have a
    content-word Jaccard of ``near_duplicate_threshold`` or more (``lib.near_duplicates.near_duplicate_pairs``),
    so chats that share only a generic follow-up stay apart, and the records of one non-empty ``group`` key; every
    other record is a group of one. A group's category is its first record's. Within each category the
    groups are shuffled with ``random.Random(seed)``; in that order each group goes to the first of
    hold-out and validation that is still empty or that it brings closer to its count, else to train. The
    counts are ``round(n * hold_out_fraction)`` and ``round(n * validation_fraction)`` of the category's
    ``n`` records, each at least one when ``n >= MIN_CATEGORY_RECORDS`` (none below). A split misses its
    count by less than half a group, unless its first group alone is larger. When every group is one
    record this is the record-level split of earlier versions, record for record.

    :param instruction_records: normalised pairs (see ``instruction_records``); the optional keys
        ``context`` (default ``"[]"``) and ``group`` (default ``""``: none) are carried along.
    :param data_path: the data file, named in errors.
    :param validation_fraction: share of each category for the validation split (early stopping).
    :param hold_out_fraction: share of each category never seen in training, for the final comparison.
    :param seed: seed of the shuffle.
    :param near_duplicate_threshold: content-word Jaccard in (0, 1] at or above which two questions are
        one group; 1 joins only questions with identical content words.
    :return: dict of three ``datasets.Dataset`` with the columns ``SPLIT_COLUMNS``, and
        ``near_duplicate_groups``: ``{"threshold": t, "groups": [[question, ...], ...]}``, the
        near-duplicate groups of two or more records, in record order, each record by its conversation
        text (its question for a single-turn record).
    :raises lib.problems.InputProblems: (a ValueError) a fraction outside (0, 1), fractions summing to 1 or
        more, a seed outside [0, 2**32), a threshold outside (0, 1].
    :raises ValueError: too few records to give every split one record; the message says how many records
        the grouping joined and into how many groups.
    """
    raise_hyperparameter_problems(validation_fraction=validation_fraction, hold_out_fraction=hold_out_fraction,
                                  seed=seed, near_duplicate_threshold=near_duplicate_threshold)
    questions = [conversation_text(record["input_text"], record.get("context") or "[]")
                 for record in instruction_records]
    duplicate_pairs = near_duplicate_pairs(questions, near_duplicate_threshold)
    near_duplicates = [group for group in _members(groups_of(len(questions), duplicate_pairs)) if len(group) > 1]
    groups = _members(groups_of(len(questions), duplicate_pairs + _group_key_pairs(instruction_records)))
    by_category = defaultdict(list)
    for group in groups:
        by_category[instruction_records[group[0]]["category"]].append(group)
    rng = random.Random(seed)
    splits = {name: [] for name in SPLIT_NAMES}
    for category in sorted(by_category):
        category_groups = list(by_category[category])
        rng.shuffle(category_groups)
        n = sum(map(len, category_groups))
        wanted = {"hold_out_set": _split_count(n, hold_out_fraction),
                  "validation_set": _split_count(n, validation_fraction)}
        filled = dict.fromkeys(wanted, 0)
        for group in category_groups:
            name = next((name for name in wanted if _takes(filled[name], wanted[name], len(group))), "train_set")
            filled[name] = filled.get(name, 0) + len(group)
            splits[name] += [instruction_records[index] for index in group]
    empty = [name for name, records in splits.items() if not records]
    if empty:
        cause = _grouping_cause(groups, near_duplicate_threshold)
        advice = ("add records that are not rewordings of these, or raise near_duplicate_threshold to join fewer"
                  if cause else f"give at least {MIN_CATEGORY_RECORDS} records of one category (10 or more recommended)")
        raise ValueError(f"{data_path}: {len(instruction_records)} usable record(s) are too few to fill "
                         f"{', '.join(empty)}{cause}; {advice}.")
    logger.info(
        "split %s: train %d, validation %d, hold-out %d; %d near-duplicate group(s) of %d questions",
        data_path, *(len(splits[name]) for name in SPLIT_NAMES), len(near_duplicates), sum(map(len, near_duplicates)),
    )
    datasets = {
        name: Dataset.from_dict({column: [_value(record, column) for record in records] for column in SPLIT_COLUMNS})
        for name, records in splits.items()
    }
    return {**datasets, "near_duplicate_groups": {
        "threshold": near_duplicate_threshold,
        "groups": [[questions[index] for index in group] for group in near_duplicates],
    }}


@tag(output="final")
def split_summary(
    train_set: Dataset, validation_set: Dataset, hold_out_set: Dataset, near_duplicate_groups: dict,
    overlong_records: dict,
) -> dict:
    """Record counts per split and per category, the near-duplicate groups in each split, the
    hold-out's leakage, and the examples ``overlong_policy`` shortened or dropped in each split
    (``overlong``: ``{"prompt_truncated": [indices], "dropped": [indices]}``, see ``overlong_records``).

    :return: ``{"train_set": {"total": n, "per_category": {...}, "near_duplicate_groups": {"groups": g,
        "records": r}}, "validation_set": {...}, "hold_out_set": {..., "leakage": {"threshold": t,
        "questions": k, "share": k / n}}}``: ``g`` groups of two or more near-duplicate questions with
        ``r`` records in all; ``k`` hold-out questions whose conversation has a near-duplicate
        (content-word Jaccard >= t of ``lib.near_duplicates.conversation_text``) in the train split (``lib.near_duplicates.leaked_questions``), 0 when the groups were kept whole.
    """
    group_of = {question: number for number, group in enumerate(near_duplicate_groups["groups"]) for question in group}
    summary = {}
    for name, dataset in zip(SPLIT_NAMES, (train_set, validation_set, hold_out_set)):
        per_category = defaultdict(int)
        for category in dataset["category"]:
            per_category[category] += 1
        texts = [conversation_text(question, context) for question, context in zip(dataset["input_text"], dataset["context"])]
        grouped = [group_of[text] for text in texts if text in group_of]
        summary[name] = {
            "total": len(dataset),
            "per_category": dict(sorted(per_category.items())),
            "near_duplicate_groups": {"groups": len(set(grouped)), "records": len(grouped)},
            "overlong": overlong_records[name],
        }
    threshold = near_duplicate_groups["threshold"]
    leaked = leaked_questions(*([conversation_text(q, c) for q, c in zip(split["input_text"], split["context"])]
                                for split in (hold_out_set, train_set)), threshold)
    share = len(leaked) / len(hold_out_set) if len(hold_out_set) else 0.0
    summary["hold_out_set"]["leakage"] = {"threshold": threshold, "questions": len(leaked), "share": share}
    return summary
