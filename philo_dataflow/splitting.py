"""Splitting: a seeded, category-stratified train / validation / hold-out split.

Prompts are unique after ``instruction_records`` (duplicates are kept once), so no prompt can land in
two splits. Every category with at least ``MIN_CATEGORY_RECORDS`` records is represented in the
validation and hold-out sets.
"""

import logging
import random
from collections import defaultdict

from datasets import Dataset
from hamilton.function_modifiers import extract_fields, tag

from .lib.inputs import raise_hyperparameter_problems

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ("input_text", "output_text", "category")

#: Records a category needs for the validation and hold-out splits to get one each.
MIN_CATEGORY_RECORDS = 3


def _split_count(n: int, fraction: float) -> int:
    """Records of a category of size ``n`` that go to a split of ``fraction``: at least one when n >=
    ``MIN_CATEGORY_RECORDS``, none below."""
    if fraction <= 0:
        return 0
    return max(1, round(n * fraction)) if n >= MIN_CATEGORY_RECORDS else 0


@extract_fields({"train_set": Dataset, "validation_set": Dataset, "hold_out_set": Dataset})
def data_splits(
    instruction_records: list[dict],
    data_path: str,
    validation_fraction: float = 0.1,
    hold_out_fraction: float = 0.1,
    seed: int = 42,
) -> dict:
    """Splits the pairs into ``train_set``, ``validation_set`` and ``hold_out_set``.

    Within each category the records are shuffled with ``random.Random(seed)`` and the first
    ``round(n * hold_out_fraction)`` go to hold-out, the next ``round(n * validation_fraction)`` to
    validation (each at least one for a category of three or more records), the rest to train.

    :param instruction_records: normalised pairs (see ``instruction_records``).
    :param data_path: the data file, named in errors.
    :param validation_fraction: share of each category for the validation split (early stopping).
    :param hold_out_fraction: share of each category never seen in training, for the final comparison.
    :param seed: seed of the shuffle.
    :return: dict of three ``datasets.Dataset`` with columns ``input_text``, ``output_text``, ``category``.
    :raises lib.problems.InputProblems: (a ValueError) a fraction outside (0, 1), fractions summing to 1 or
        more, a seed outside [0, 2**32).
    :raises ValueError: too few records to give every split one record.
    """
    raise_hyperparameter_problems(validation_fraction=validation_fraction, hold_out_fraction=hold_out_fraction, seed=seed)
    by_category = defaultdict(list)
    for record in instruction_records:
        by_category[record["category"]].append(record)
    rng = random.Random(seed)
    splits = {"train_set": [], "validation_set": [], "hold_out_set": []}
    for category in sorted(by_category):
        records = list(by_category[category])
        rng.shuffle(records)
        n_hold_out = _split_count(len(records), hold_out_fraction)
        n_validation = _split_count(len(records), validation_fraction)
        splits["hold_out_set"] += records[:n_hold_out]
        splits["validation_set"] += records[n_hold_out : n_hold_out + n_validation]
        splits["train_set"] += records[n_hold_out + n_validation :]
    empty = [name for name, records in splits.items() if not records]
    if empty:
        raise ValueError(
            f"{data_path}: {len(instruction_records)} usable record(s) are too few to fill "
            f"{', '.join(empty)}; give at least {MIN_CATEGORY_RECORDS} records of one category (10 or more recommended)."
        )
    logger.info(
        "split %s: train %d, validation %d, hold-out %d",
        data_path, *(len(splits[name]) for name in ("train_set", "validation_set", "hold_out_set")),
    )
    return {
        name: Dataset.from_dict({column: [r[column] for r in records] for column in SPLIT_COLUMNS})
        for name, records in splits.items()
    }


@tag(output="final")
def split_summary(train_set: Dataset, validation_set: Dataset, hold_out_set: Dataset) -> dict:
    """Record counts per split and per category: ``{"train_set": {"total": n, "per_category": {...}}, ...}``."""
    summary = {}
    for name, dataset in (("train_set", train_set), ("validation_set", validation_set), ("hold_out_set", hold_out_set)):
        per_category = defaultdict(int)
        for category in dataset["category"]:
            per_category[category] += 1
        summary[name] = {"total": len(dataset), "per_category": dict(sorted(per_category.items()))}
    return summary
