"""Batched greedy generation: prompts sorted by length, left-padded, decoded with the KV cache."""

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    description: str = "generating",
) -> list[dict]:
    """Greedy continuations of tokenized prompts, in the order given.

    Prompts are sorted by length (longest first) and batched; each batch is left-padded (right padding
    gives garbage, transformers#25790) and decoded with the KV cache; a sequence stops at its first EOS.

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
