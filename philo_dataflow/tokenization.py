"""Tokenization: the prompt format and the three splits tokenized for causal-LM training, labels masked
on the prompt (``lib.prompts``)."""

import logging

from datasets import Dataset
from hamilton.function_modifiers import (
    config,
    parameterize,
    source,
    tag,
    tag_outputs,
    value,
)
from transformers import PreTrainedTokenizerBase

from .lib.inputs import raise_hyperparameter_problems
from .lib.problems import capped_lines
from .lib.prompts import ALPACA, CHAT_TEMPLATE, IGNORE_INDEX, tokenize_example

logger = logging.getLogger(__name__)


@config.when(start="base")
def prompt_format__base(tokenizer: PreTrainedTokenizerBase) -> str:
    """``"chat_template"`` when the tokenizer has one (SmolLM2 does), else ``"alpaca"``."""
    return CHAT_TEMPLATE if tokenizer.chat_template else ALPACA


@config.when(start="presaved")
def prompt_format__presaved(presaved_manifest: dict) -> str:
    """The prompt format the presaved adapter was trained with, read from its manifest."""
    return presaved_manifest["prompt_format"]


@parameterize(
    tokenized_train={"examples": source("train_set"), "split_name": value("train_set")},
    tokenized_validation={"examples": source("validation_set"), "split_name": value("validation_set")},
    tokenized_hold_out={"examples": source("hold_out_set"), "split_name": value("hold_out_set")},
)
@tag_outputs(tokenized_hold_out={"output": "final"})
def tokenized_split(
    examples: Dataset,
    split_name: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    max_seq_length: int = 512,
) -> Dataset:
    """The split tokenized for causal-LM training: columns ``input_ids``, ``attention_mask``, ``labels``
    (each a list of ``seq_len`` ints, unpadded) and ``truncated`` (bool).

    :param max_seq_length: tokens per example, prompt included; longer answers are cut (and counted).
    :raises lib.problems.InputProblems: (a ValueError) ``max_seq_length`` is not an integer >= 2.
    :raises ValueError: examples have no supervised token; one line per record names the split and the
        record (the first ``lib.problems.MAX_LISTED_RECORDS``, then how many more).
    """
    raise_hyperparameter_problems(max_seq_length=max_seq_length)
    rows, failures = [], []
    for index, (instruction, response) in enumerate(zip(examples["input_text"], examples["output_text"])):
        try:
            rows.append(tokenize_example(tokenizer, prompt_format, instruction, response, max_seq_length))
        except ValueError as error:
            failures.append(f"{split_name} record {index} ({instruction[:60]!r}...): {error}")
    if failures:
        raise ValueError("\n".join(capped_lines(failures, f"{split_name} records")))
    truncated = sum(row["truncated"] for row in rows)
    if truncated:
        logger.warning("%s: %d of %d answers truncated to max_seq_length=%d", split_name, truncated, len(rows), max_seq_length)
    return Dataset.from_list(rows)


@tag(output="final")
def tokenization_stats(tokenized_train: Dataset, tokenized_validation: Dataset, max_seq_length: int = 512) -> dict:
    """Token-length statistics of the train split (only; no hold-out leakage) and truncation counts.

    :return: dict with ``max_seq_length``, ``train_tokens`` (total), ``train_supervised_tokens``,
        ``train_mean_length``, ``train_max_length`` (tokens per example) and ``truncated_examples``
        per split.
    """
    lengths = [len(ids) for ids in tokenized_train["input_ids"]]
    supervised = sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in tokenized_train["labels"])
    return {
        "max_seq_length": max_seq_length,
        "train_tokens": sum(lengths),
        "train_supervised_tokens": supervised,
        "train_mean_length": sum(lengths) / len(lengths),
        "train_max_length": max(lengths),
        "truncated_examples": {
            "train_set": sum(tokenized_train["truncated"]),
            "validation_set": sum(tokenized_validation["truncated"]),
        },
    }
