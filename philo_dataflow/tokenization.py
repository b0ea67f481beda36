"""Stage 2 — prompt rendering and tokenization with masked labels.

One function, ``render_prompt``, turns a question (and, for training, its answer) into text; it serves
training, evaluation, generation and presaved loading alike (PITFALLS row 7). Labels are built from the
prompt's token length, never by searching for a response marker (rows 3–4):

    input_ids = prompt_ids + response_ids          # response_ids end with the EOS / end-of-turn token
    labels    = [-100] * len(prompt_ids) + response_ids

Padding is added later by the collator, which pads labels with -100 by position (row 2), so the EOS stays
supervised even where the pad token *is* the EOS token.
"""

import logging
from typing import Optional

from datasets import Dataset
from hamilton.function_modifiers import config, hamilton_exclude, parameterize, source, value
from transformers import PreTrainedTokenizerBase

from .loading import capped_lines

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHAT_TEMPLATE = "chat_template"
ALPACA = "alpaca"
#: Prompt of the Stanford Alpaca project (Taori et al. 2023), used when a tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@config.when(start="base")
def prompt_format__base(tokenizer: PreTrainedTokenizerBase) -> str:
    """``"chat_template"`` when the tokenizer has one (SmolLM2 does), else ``"alpaca"``."""
    return CHAT_TEMPLATE if tokenizer.chat_template else ALPACA


@config.when(start="presaved")
def prompt_format__presaved(presaved_model_dir: str) -> str:
    """The prompt format the presaved adapter was trained with, read from its manifest."""
    from .modeling import _read_manifest

    return _read_manifest(presaved_model_dir)["prompt_format"]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_format: str, instruction: str, response: Optional[str] = None
) -> str:
    """The text the model sees: the prompt alone (``response=None``), or prompt and response.

    With ``"chat_template"`` the tokenizer's template renders a single user turn, with the generation
    prompt when ``response`` is None. With ``"alpaca"`` the Alpaca prompt is used and the tokenizer's BOS
    token is prefixed when the tokenizer would add one. The result is meant to be tokenized with
    ``add_special_tokens=False`` (no double BOS, PITFALLS row 5).
    """
    if prompt_format == CHAT_TEMPLATE:
        messages = [{"role": "user", "content": instruction}]
        if response is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if prompt_format != ALPACA:
        raise ValueError(f"prompt_format={prompt_format!r}: use {CHAT_TEMPLATE!r} or {ALPACA!r}.")
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    text = (bos if adds_bos else "") + ALPACA_PROMPT.format(instruction=instruction)
    return text if response is None else text + response


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt_format: str, instruction: str) -> list[int]:
    """Token ids of the rendered prompt, as both training and generation see them."""
    return tokenizer(render_prompt(tokenizer, prompt_format, instruction), add_special_tokens=False).input_ids


@hamilton_exclude
def no_room_for_an_answer(prompt_length: int, max_seq_length: int) -> str:
    """The problem of a prompt of ``prompt_length`` tokens that leaves no answer token within
    ``max_seq_length`` (an example needs ``max_seq_length > prompt_length``)."""
    return (
        f"the prompt alone is {prompt_length} tokens, max_seq_length={max_seq_length}: no answer token "
        "would be supervised. Raise max_seq_length or shorten the question."
    )


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    instruction: str,
    response: str,
    max_seq_length: int,
) -> dict:
    """One training example: ``input_ids``, ``attention_mask`` and ``labels`` (all of length ``seq_len``
    <= ``max_seq_length``) and ``truncated`` (the response was cut to fit).

    The response part is what the full render adds after the prompt, cut just after its first EOS /
    end-of-turn token (the chat template's trailing newline is dropped), or with the EOS appended when the
    render has none — so the last supervised label is the EOS (PITFALLS row 1) unless truncated.

    :raises ValueError: the prompt alone fills ``max_seq_length``, leaving no supervised token.
    """
    prompt_text = render_prompt(tokenizer, prompt_format, instruction)
    full_text = render_prompt(tokenizer, prompt_format, instruction, response)
    if not full_text.startswith(prompt_text):
        raise ValueError("the rendered prompt is not a prefix of the rendered example; check the chat template.")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos in response_ids:
        response_ids = response_ids[: response_ids.index(eos) + 1]
    else:
        response_ids = response_ids + [eos]
    room = max_seq_length - len(prompt_ids)
    if room <= 0:
        raise ValueError(no_room_for_an_answer(len(prompt_ids), max_seq_length))
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    input_ids = prompt_ids + response_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "truncated": truncated,
    }


@parameterize(
    tokenized_train={"examples": source("train_set"), "split_name": value("train_set")},
    tokenized_validation={"examples": source("validation_set"), "split_name": value("validation_set")},
    tokenized_hold_out={"examples": source("hold_out_set"), "split_name": value("hold_out_set")},
)
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
    :raises preflight.InputProblems: (a ValueError) ``max_seq_length`` is not an integer >= 2.
    :raises ValueError: examples have no supervised token; one line per record names the split and the
        record (the first ``loading.MAX_LISTED_RECORDS``, then how many more).
    """
    from .preflight import InputProblems, hyperparameter_problems

    problems = hyperparameter_problems({"max_seq_length": max_seq_length})
    if problems:
        raise InputProblems(problems)
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
