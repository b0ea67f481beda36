"""Tokenization: the prompt format and the three splits tokenized for causal-LM training, labels masked
on the prompt (``lib.prompts``), over-long examples shortened or left out by ``overlong_policy``, within
``max_seq_length`` capped to the model's context window."""

import logging
from typing import Optional

from datasets import Dataset
from hamilton.function_modifiers import (
    parameterize,
    source,
    tag,
    tag_outputs,
    value,
)
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from ..lib.context_window import ContextWindow, capped_max_seq_length
from ..lib.inputs import raise_hyperparameter_problems
from ..lib.problems import capped_lines, listed
from ..lib.prompts import (
    ALPACA,
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    PLAIN,
    TEMPLATE,
    OverlongExample,
    tokenize_example,
    tokenize_seq2seq_example,
)
from ..lib.switches import when

logger = logging.getLogger(__name__)


@when(start="base")
def prompt_format__base(tokenizer: PreTrainedTokenizerBase, prompt_template_in_use: Optional[str],
                        model_class: type) -> str:
    """``"template"`` when a ``prompt_template`` renders the prompts, else ``"plain"`` for an
    encoder-decoder model (the question is the encoder's input), else ``"chat_template"`` when the
    tokenizer has one (SmolLM2 does), else ``"alpaca"``."""
    if prompt_template_in_use:
        return TEMPLATE
    if model_class is AutoModelForSeq2SeqLM:
        return PLAIN
    return CHAT_TEMPLATE if tokenizer.chat_template else ALPACA


@when(start="presaved")
def prompt_format__presaved(presaved_manifest: dict) -> str:
    """The prompt format the presaved adapter was trained with, read from its manifest."""
    return presaved_manifest["prompt_format"]


def max_seq_length_in_use(model_context_window: ContextWindow, max_seq_length: int = 512) -> int:
    """``max_seq_length`` capped to the model's context window (``lib.context_window.capped_max_seq_length``;
    its module docstring says why capped rather than refused), with one warning line when it is capped.

    :param max_seq_length: tokens per training example, prompt included (an encoder-decoder's prompt, and
        its answer, each).
    :raises lib.problems.InputProblems: (a ValueError) ``max_seq_length`` out of range.
    """
    raise_hyperparameter_problems(max_seq_length=max_seq_length)
    value, note = capped_max_seq_length(max_seq_length, model_context_window)
    if note:
        logger.warning(note)
    return value


def _tokenized(examples: Dataset, split_name: str, tokenize, max_seq_length: int, overlong_policy: str) -> Dataset:
    """``examples`` tokenized one by one with ``tokenize(instruction, response, context)``; see
    ``tokenized_split``."""
    rows, failures, dropped = [], [], []
    contexts = examples["context"] if "context" in examples.column_names else ["[]"] * len(examples)
    for index, (instruction, response, context) in enumerate(
        zip(examples["input_text"], examples["output_text"], contexts)
    ):
        try:
            row = tokenize(instruction, response, context)
        except OverlongExample:
            dropped.append(index)
            continue
        except ValueError as error:
            failures.append(f"{split_name} record {index} ({instruction[:60]!r}...): {error}")
            continue
        rows.append({**row, "record_index": index})
    if failures:
        raise ValueError("\n".join(capped_lines(failures, f"{split_name} records")))
    if not rows:
        raise ValueError(f"{split_name}: all {len(examples)} examples are longer than max_seq_length={max_seq_length} "
                         f"and overlong_policy={overlong_policy!r} left every one out; raise max_seq_length.")
    truncated = sum(row["truncated"] for row in rows)
    if truncated:
        logger.warning("%s: %d of %d answers truncated to max_seq_length=%d", split_name, truncated, len(rows), max_seq_length)
    shortened = [row["record_index"] for row in rows if row["prompt_truncated"]]
    if shortened:
        logger.warning("%s: %d question(s) shortened to fit max_seq_length=%d (records %s)", split_name,
                       len(shortened), max_seq_length, listed(shortened))
    if dropped:
        logger.warning("%s: %d over-long example(s) dropped (overlong_policy='drop'; records %s)", split_name,
                       len(dropped), listed(dropped))
    return Dataset.from_list(rows)




@when(architecture="causal")
@parameterize(
    tokenized_train={"examples": source("train_set"), "split_name": value("train_set")},
    tokenized_validation={"examples": source("validation_set"), "split_name": value("validation_set")},
    tokenized_hold_out={"examples": source("hold_out_set"), "split_name": value("hold_out_set")},
)
@tag_outputs(tokenized_hold_out={"output": "final"})
def tokenized_split__causal(
    examples: Dataset,
    split_name: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    prompt_template_in_use: Optional[str],
    max_seq_length_in_use: int,
    overlong_policy: str = "truncate_prompt",
) -> Dataset:
    """The split tokenized for causal-LM training: columns ``input_ids``, ``attention_mask``, ``labels``
    (each a list of ``seq_len`` ints, unpadded), ``truncated`` (the answer was cut), ``prompt_truncated``
    (the question was shortened) and ``record_index`` (the example's index in the split; examples left out
    by ``overlong_policy="drop"`` have none).

    :param max_seq_length_in_use: tokens per example, prompt included (``max_seq_length``, capped to the
        model's window); longer examples follow ``overlong_policy``.
    :param overlong_policy: ``"truncate_prompt"`` (shorten the question so that the answer keeps its share
        of ``max_seq_length``, ``lib.prompts.ANSWER_SHARE``; answers of short prompts are cut to fit),
        ``"drop"`` (leave the example out) or ``"error"`` (cut answers, refuse prompts that leave no room);
        the hold-out generation always sees the whole question.
    :raises lib.problems.InputProblems: (a ValueError) ``overlong_policy`` out of range.
    :raises ValueError: examples have no supervised token, or every example was left out; one line per
        record names the split and the record (the first ``lib.problems.MAX_LISTED_RECORDS``, then how many
        more).
    """
    raise_hyperparameter_problems(overlong_policy=overlong_policy)

    def tokenize(instruction: str, response: str, context: str) -> dict:
        return tokenize_example(tokenizer, prompt_format, instruction, response, max_seq_length_in_use, context,
                                overlong_policy, prompt_template_in_use)

    return _tokenized(examples, split_name, tokenize, max_seq_length_in_use, overlong_policy)


@when(architecture="seq2seq")
@parameterize(
    tokenized_train={"examples": source("train_set"), "split_name": value("train_set")},
    tokenized_validation={"examples": source("validation_set"), "split_name": value("validation_set")},
    tokenized_hold_out={"examples": source("hold_out_set"), "split_name": value("hold_out_set")},
)
@tag_outputs(tokenized_hold_out={"output": "final"})
def tokenized_split__seq2seq(
    examples: Dataset,
    split_name: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    max_seq_length_in_use: int,
    overlong_policy: str = "truncate_prompt",
) -> Dataset:
    """The split tokenized for an encoder-decoder model: ``input_ids``/``attention_mask`` the prompt,
    ``labels`` the answer's tokens (``lib.prompts.tokenize_seq2seq_example``); the other columns and the
    errors are those of ``tokenized_split__causal``.

    :param max_seq_length_in_use: tokens of the encoder's prompt, and of the answer, each (``max_seq_length``,
        capped to the model's encoder and decoder windows).
    :param overlong_policy: see ``tokenized_split__causal``.
    """
    raise_hyperparameter_problems(overlong_policy=overlong_policy)

    def tokenize(instruction: str, response: str, context: str) -> dict:
        return tokenize_seq2seq_example(tokenizer, prompt_format, instruction, response, max_seq_length_in_use,
                                        context, overlong_policy)

    return _tokenized(examples, split_name, tokenize, max_seq_length_in_use, overlong_policy)


@tag(output="final")
def overlong_records(
    train_set: Dataset, validation_set: Dataset, hold_out_set: Dataset, tokenized_train: Dataset,
    tokenized_validation: Dataset, tokenized_hold_out: Dataset, overlong_policy: str = "truncate_prompt",
) -> dict:
    """What ``overlong_policy`` did, per split: ``{"policy": ..., "train_set": {"prompt_truncated":
    [indices], "dropped": [indices]}, ...}`` (indices into the split). The hold-out generation always
    sees the whole question; only its loss examples follow the policy."""
    summary = {"policy": overlong_policy}
    for name, split, tokenized in (("train_set", train_set, tokenized_train),
                                   ("validation_set", validation_set, tokenized_validation),
                                   ("hold_out_set", hold_out_set, tokenized_hold_out)):
        kept = set(tokenized["record_index"])
        summary[name] = {
            "prompt_truncated": [i for i, cut in zip(tokenized["record_index"], tokenized["prompt_truncated"]) if cut],
            "dropped": [i for i in range(len(split)) if i not in kept],
        }
    return summary


@tag(output="final")
def tokenization_stats(tokenized_train: Dataset, tokenized_validation: Dataset, max_seq_length_in_use: int) -> dict:
    """Token-length statistics of the train split (only; no hold-out leakage) and truncation counts.

    :return: dict with ``max_seq_length`` (the one in use: ``max_seq_length_in_use``), ``train_tokens`` (total),
        ``train_supervised_tokens``, ``train_mean_length``, ``train_max_length`` (tokens per example) and
        ``truncated_examples`` per split.
    """
    lengths = [len(ids) for ids in tokenized_train["input_ids"]]
    supervised = sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in tokenized_train["labels"])
    return {
        "max_seq_length": max_seq_length_in_use,
        "train_tokens": sum(lengths),
        "train_supervised_tokens": supervised,
        "train_mean_length": sum(lengths) / len(lengths),
        "train_max_length": max(lengths),
        "truncated_examples": {
            "train_set": sum(tokenized_train["truncated"]),
            "validation_set": sum(tokenized_validation["truncated"]),
        },
    }
