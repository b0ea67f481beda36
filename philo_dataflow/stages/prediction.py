"""Prediction: batched, left-padded answers to the held-out and validation questions (``lib.generation``),
greedy unless the generation settings ask for sampling.

The base model's answers come from ``base_answer_model``: with LoRA, the same weights with the adapter
disabled (``PeftModel.disable_adapter()``), so no second copy of the model is held in memory; with full
fine-tuning, the untouched base weights.

With several processes (torchrun, accelerate launch) process ``r`` of ``w`` answers the questions
``r, r + w, ...`` (``lib.distributed.sharded_map``) and every process gets all answers in split order.
Greedy answers are the same as with one process; sampled ones are seeded per process, so they depend on
the number of processes.
"""

import contextlib

from datasets import Dataset
from hamilton.function_modifiers import (
    extract_fields,
    parameterize,
    source,
    tag,
    tag_outputs,
    value,
)
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..lib.context_window import ContextWindow, GenerationPrompt, answer_room_problems
from ..lib.distributed import sharded_map
from ..lib.generation import generate_answers
from ..lib.inputs import raise_hyperparameter_problems
from ..lib.problems import InputProblems, Problem
from ..lib.prompts import split_prompt_ids


def _generations(
    prompts: list[list[int]],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    generation_batch_size: int,
    use_adapter: bool,
    description: str,
    generation_settings: dict,
    seed: int,
) -> list[dict]:
    raise_hyperparameter_problems(max_new_tokens=max_new_tokens, generation_batch_size=generation_batch_size)
    adapter_off = model.disable_adapter() if not use_adapter and isinstance(model, PeftModel) else contextlib.nullcontext()
    with adapter_off:
        # With several processes each answers its share of the prompts and all get every answer, in order.
        return sharded_map(prompts, lambda shard: generate_answers(
            model, tokenizer, shard, max_new_tokens, generation_batch_size, description, generation_settings, seed))


@parameterize(
    hold_out_prompt_ids={"examples": source("hold_out_set"), "split_name": value("hold_out_set")},
    validation_prompt_ids={"examples": source("validation_set"), "split_name": value("validation_set")},
)
def generation_prompt_ids(
    examples: Dataset,
    split_name: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    model_context_window: ContextWindow,
    max_new_tokens: int = 160,
) -> list[list[int]]:
    """Token ids of each question's whole prompt in the split (``lib.prompts.split_prompt_ids``: its
    conversation before it included, whatever the ``overlong_policy``), one list per question in split order,
    checked to leave room for ``max_new_tokens`` in the model's context window: a decoder-only model's longest
    prompt plus ``max_new_tokens``, an encoder-decoder's prompts and ``max_new_tokens`` each in its own window
    (``lib.context_window.answer_room_problems``; its module docstring says why refused, not capped).

    :param max_new_tokens: cap on generated tokens per answer.
    :raises lib.problems.InputProblems: (a ValueError) ``max_new_tokens`` out of range, or too large for the
        window with the split's longest prompt (the line names the window, where it is stated, and the largest
        value allowed), or a prompt that alone fills the window; the preflight's lines.
    """
    raise_hyperparameter_problems(max_new_tokens=max_new_tokens)
    prompts = split_prompt_ids(examples, tokenizer, prompt_format)
    found = [GenerationPrompt(split_name, index, question, len(ids))
             for index, (question, ids) in enumerate(zip(examples["input_text"], prompts))]
    problems = answer_room_problems(model_context_window, found, max_new_tokens)
    if problems:
        raise InputProblems([Problem(name, line) for name, line in problems])
    return prompts


def generation_settings(
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 4,
) -> dict:
    """How answers are decoded (transformers ``GenerationConfig`` names); the defaults are greedy
    decoding, the evaluation default (sampled metrics change from run to run), that never repeats a
    4-token n-gram. Recorded in the manifest and the report.

    :param do_sample: sample instead of taking the most likely token; sampling is seeded with ``seed``,
        so the same run gives the same answers twice.
    :param temperature: softmax temperature of sampling (``do_sample`` only).
    :param top_p: nucleus sampling: the smallest set of tokens whose probabilities add up to ``top_p``
        (Holtzman et al. 2020; ``do_sample`` only).
    :param top_k: sample among the ``top_k`` most likely tokens (``do_sample`` only).
    :param repetition_penalty: divides the logits of tokens already in the sequence (Keskar et al. 2019,
        CTRL); 1.0 is off.
    :param no_repeat_ngram_size: never repeat an n-gram of this many tokens, counting the prompt's
        (transformers' ``NoRepeatNGramLogitsProcessor``); 0 is off. The default 4 was chosen by the loop
        rate (answers with a word 4-gram three or more times) beside ROUGE-L on both hold-outs: the
        measurements are in ``docs/defaults_sweep.md``.
    :raises lib.problems.InputProblems: (a ValueError) a setting out of range (the preflight's lines).
    """
    settings = dict(locals())
    raise_hyperparameter_problems(**settings)
    return settings


@parameterize(
    finetuned_model_hold_out_generations={"answering_model": source("finetuned_model"), "use_adapter": value(True),
                                          "description": value("fine-tuned on hold-out")},
    base_model_hold_out_generations={"answering_model": source("base_answer_model"), "use_adapter": value(False),
                                     "description": value("base on hold-out")},
)
def hold_out_generations(
    hold_out_prompt_ids: list[list[int]],
    answering_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    use_adapter: bool,
    description: str,
    generation_settings: dict,
    max_new_tokens: int = 160,
    generation_batch_size: int = 32,
    seed: int = 42,
) -> list[dict]:
    """Answers to each ``hold_out_set`` question (its prompt: ``hold_out_prompt_ids``; greedy unless
    ``generation_settings`` sample), of the fine-tuned model or of the base model (``base_answer_model``, its
    adapter disabled); see ``generate_answers`` for the dict of each answer.

    :param max_new_tokens: cap on generated tokens per answer.
    :param generation_batch_size: questions per batched ``generate`` call; answers are identical at any
        batch size (the default's measurement: ``benchmarks/README.md``).
    :raises ValueError: ``max_new_tokens`` or ``generation_batch_size`` out of range (the preflight's lines).
    """
    return _generations(
        hold_out_prompt_ids, answering_model, tokenizer, max_new_tokens, generation_batch_size,
        use_adapter, description, generation_settings, seed,
    )


@tag(output="final")
def hold_out_set_predictions(
    hold_out_set: Dataset,
    base_model_hold_out_generations: list[dict],
    finetuned_model_hold_out_generations: list[dict],
) -> list[dict]:
    """The hold-out questions with reference, base and fine-tuned answers side by side.

    :return: one dict per question: ``question``, ``category``, ``reference``, ``base_prediction``,
        ``finetuned_prediction``, ``base_ended_on_eos``, ``finetuned_ended_on_eos``,
        ``base_new_tokens``, ``finetuned_new_tokens``.
    """
    rows = []
    for question, reference, category, base, tuned in zip(
        hold_out_set["input_text"], hold_out_set["output_text"], hold_out_set["category"],
        base_model_hold_out_generations, finetuned_model_hold_out_generations,
    ):
        rows.append({
            "question": question,
            "category": category,
            "reference": reference,
            "base_prediction": base["text"],
            "finetuned_prediction": tuned["text"],
            "base_ended_on_eos": base["ended_on_eos"],
            "finetuned_ended_on_eos": tuned["ended_on_eos"],
            "base_new_tokens": len(base["token_ids"]),
            "finetuned_new_tokens": len(tuned["token_ids"]),
        })
    return rows


@tag_outputs(finetuned_model_on_validation_set={"output": "final"})
@extract_fields({"validation_predictions": list, "validation_references": list})
def finetuned_model_on_validation_set(
    validation_set: Dataset,
    validation_prompt_ids: list[list[int]],
    finetuned_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generation_settings: dict,
    max_new_tokens: int = 160,
    generation_batch_size: int = 32,
    seed: int = 42,
) -> dict:
    """Fine-tuned answers (greedy unless ``generation_settings`` sample) to the ``validation_set`` questions
    (their prompts: ``validation_prompt_ids``) and the reference answers (untruncated text).

    :return: ``validation_predictions`` and ``validation_references``, lists of strings in split order.
    :raises ValueError: ``max_new_tokens`` or ``generation_batch_size`` out of range (the preflight's lines).
    """
    generations = _generations(
        validation_prompt_ids, finetuned_model, tokenizer, max_new_tokens, generation_batch_size,
        True, "fine-tuned on validation", generation_settings, seed,
    )
    return {
        "validation_predictions": [g["text"] for g in generations],
        "validation_references": list(validation_set["output_text"]),
    }
