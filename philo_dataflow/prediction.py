"""Stage 7 — greedy, batched, left-padded generation on held-out questions.

The base model's answers come from the same weights with the adapter disabled
(``PeftModel.disable_adapter()``), so no second copy of the model is held in memory.
"""

import contextlib
import logging

import torch
from datasets import Dataset
from hamilton.function_modifiers import extract_fields, parameterize, value
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .tokenization import prompt_token_ids

logger = logging.getLogger(__name__)


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    description: str = "generating",
) -> list[dict]:
    """Greedy continuations of tokenized prompts, in the order given.

    Prompts are sorted by length (longest first) and batched; each batch is left-padded (PITFALLS
    row 6) and decoded with the KV cache; a sequence stops at its first EOS token.

    :param prompts: token ids of each prompt (unpadded).
    :param max_new_tokens: cap on generated tokens per prompt.
    :param batch_size: prompts per ``generate`` call.
    :return: one dict per prompt: ``text`` (decoded, special tokens dropped), ``token_ids`` (generated
        ids up to and including the EOS), ``ended_on_eos`` (bool).
    """
    eos = tokenizer.eos_token_id
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict] = [{}] * len(prompts)
    device = next(model.parameters()).device
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc=description, unit="batch"):
            padded = tokenizer.pad(
                {"input_ids": [prompts[i] for i in batch]}, padding_side="left", return_tensors="pt"
            ).to(device)  # (batch, prompt_len)
            output = model.generate(**padded, generation_config=generation_config)
            new_tokens = output[:, padded["input_ids"].shape[1] :].tolist()  # (batch, <= max_new_tokens)
            for i, tokens in zip(batch, new_tokens):
                ended = eos in tokens
                tokens = tokens[: tokens.index(eos) + 1] if ended else tokens
                results[i] = {
                    "text": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    "token_ids": tokens,
                    "ended_on_eos": ended,
                }
    return results


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
    from .preflight import raise_hyperparameter_problems  # imported here: preflight imports the stage modules

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
    :param generation_batch_size: questions per batched ``generate`` call. Default 32: decoding a small
        model on a CPU is bound by reading the weights once per step, so a wider batch costs little more
        per step (measured: the base model's 27 example-data hold-out answers took 28 s in one batch of 32
        against 42 s in batches of 16 on a 2-core CPU). Answers are identical at any batch size.
    :raises ValueError: ``max_new_tokens`` or ``generation_batch_size`` out of range (the preflight's lines).
    """
    return _generations(
        hold_out_set, finetuned_model, tokenizer, prompt_format, max_new_tokens, generation_batch_size,
        use_adapter, description,
    )


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
