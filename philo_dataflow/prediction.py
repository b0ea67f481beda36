"""Prediction: greedy, batched, left-padded answers to the held-out and validation questions
(``lib.generation``).

The base model's answers come from the same weights with the adapter disabled
(``PeftModel.disable_adapter()``), so no second copy of the model is held in memory.
"""

import contextlib
import logging

from datasets import Dataset
from hamilton.function_modifiers import (
    extract_fields,
    parameterize,
    tag,
    tag_outputs,
    value,
)
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .lib.generation import generate_greedy
from .lib.inputs import raise_hyperparameter_problems
from .lib.prompts import prompt_token_ids

logger = logging.getLogger(__name__)


def _generations(
    examples: Dataset,
    finetuned_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    max_new_tokens: int,
    generation_batch_size: int,
    use_adapter: bool,
    description: str,
) -> list[dict]:
    raise_hyperparameter_problems(max_new_tokens=max_new_tokens, generation_batch_size=generation_batch_size)
    prompts = [prompt_token_ids(tokenizer, prompt_format, q) for q in examples["input_text"]]
    adapter_off = contextlib.nullcontext() if use_adapter else finetuned_model.disable_adapter()
    with adapter_off:
        return generate_greedy(finetuned_model, tokenizer, prompts, max_new_tokens, generation_batch_size, description)


@parameterize(
    finetuned_model_hold_out_generations={"use_adapter": value(True), "description": value("fine-tuned on hold-out")},
    base_model_hold_out_generations={"use_adapter": value(False), "description": value("base on hold-out")},
)
def hold_out_generations(
    hold_out_set: Dataset,
    finetuned_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    use_adapter: bool,
    description: str,
    max_new_tokens: int = 160,
    generation_batch_size: int = 32,
) -> list[dict]:
    """Greedy answers to each ``hold_out_set`` question, of the fine-tuned model or of the base model
    (same weights, adapter disabled); see ``generate_greedy`` for the dict of each answer.

    :param max_new_tokens: cap on generated tokens per answer.
    :param generation_batch_size: questions per batched ``generate`` call; answers are identical at any
        batch size (the default's measurement: ``benchmarks/README.md``).
    :raises ValueError: ``max_new_tokens`` or ``generation_batch_size`` out of range (the preflight's lines).
    """
    return _generations(
        hold_out_set, finetuned_model, tokenizer, prompt_format, max_new_tokens, generation_batch_size,
        use_adapter, description,
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
    finetuned_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    max_new_tokens: int = 160,
    generation_batch_size: int = 32,
) -> dict:
    """Greedy fine-tuned answers on ``validation_set`` and the reference answers (untruncated text).

    :return: ``validation_predictions`` and ``validation_references``, lists of strings in split order.
    :raises ValueError: ``max_new_tokens`` or ``generation_batch_size`` out of range (the preflight's lines).
    """
    generations = _generations(
        validation_set, finetuned_model, tokenizer, prompt_format, max_new_tokens, generation_batch_size,
        True, "fine-tuned on validation",
    )
    return {
        "validation_predictions": [g["text"] for g in generations],
        "validation_references": list(validation_set["output_text"]),
    }
