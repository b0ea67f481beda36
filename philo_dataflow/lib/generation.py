"""Batched generation: prompts sorted by length, left-padded, decoded with the KV cache; greedy by
default, sampled (seeded) when the generation settings ask for it."""

from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .inputs import DEFAULTS

#: The settings of ``generation_settings`` (transformers' ``GenerationConfig`` names; the sampling ones
#: are used only with ``do_sample``) of plain greedy decoding: no sampling, no repetition penalty, no
#: banned n-grams. The run's defaults (``DEFAULTS``) differ in ``no_repeat_ngram_size``.
GREEDY = {"do_sample": False, "temperature": DEFAULTS["temperature"], "top_p": DEFAULTS["top_p"],
          "top_k": DEFAULTS["top_k"], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
#: Most tokens one ``generate`` call holds: rows x (longest prompt + ``max_new_tokens``), the size of its
#: padded KV cache. Serving engines batch by a token budget the same way (vLLM's ``max_num_batched_tokens``)
#: so that one long prompt does not pad many short ones; at 32 rows it admits prompts of up to 352 tokens
#: with 160 new ones.
TOKEN_BUDGET = 16384
#: Most prompt tokens one ``generate`` call prefills: rows x longest prompt, the padded prefill. It bounds
#: the padding of long prompts, whose prefill dominates, without splitting batches of prompts up to 256
#: tokens at 32 rows (the long-prompt measurement: ``benchmarks/README.md``).
PROMPT_TOKEN_BUDGET = 8192


def token_budget_batches(lengths: list[int], max_new_tokens: int, batch_size: int,
                         token_budget: int = TOKEN_BUDGET,
                         prompt_token_budget: int = PROMPT_TOKEN_BUDGET) -> list[list[int]]:
    """Batches of prompt indices, longest prompts first: each batch has at most ``batch_size`` prompts, at
    most ``token_budget`` tokens counted as rows x (its longest prompt + ``max_new_tokens``) and at most
    ``prompt_token_budget`` counted as rows x its longest prompt; a prompt over a budget by itself gets a
    batch of its own.

    :param lengths: token count of each prompt.
    :return: lists of indices into ``lengths``, every index once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            rows, longest = len(batches[-1]) + 1, lengths[batches[-1][0]]  # sorted: the first is the longest
            if rows <= batch_size and rows * (longest + max_new_tokens) <= token_budget \
                    and rows * longest <= prompt_token_budget:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def generation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, settings: Optional[dict] = None
                      ) -> GenerationConfig:
    """The ``GenerationConfig`` of ``settings`` (keys of ``GREEDY``; plain greedy when None): one beam, stops at
    the tokenizer's EOS, pads with its pad token."""
    settings = {**GREEDY, **(settings or {})}
    sampling = {key: settings[key] for key in ("temperature", "top_p", "top_k")} if settings["do_sample"] else {}
    eos = tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=bool(settings["do_sample"]),
        num_beams=1,
        repetition_penalty=settings["repetition_penalty"],
        no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **sampling,
    )


def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    description: str = "generating",
    settings: Optional[dict] = None,
    seed: int = 42,
    token_budget: int = TOKEN_BUDGET,
    prompt_token_budget: int = PROMPT_TOKEN_BUDGET,
) -> list[dict]:
    """Continuations of tokenized prompts, in the order given: greedy, or sampled with ``settings``.

    Prompts are sorted by length (longest first) and batched by count and by tokens
    (``token_budget_batches``); each batch is left-padded (right padding
    gives garbage, transformers#25790) and decoded with the KV cache; a sequence stops at its first EOS.
    Sampling draws from torch's generator seeded with ``seed`` before the first batch, so the same
    prompts, settings and seed give the same answers. For an encoder-decoder model the prompt is the
    encoder's input and every generated token after the decoder start token is new.

    :param prompts: token ids of each prompt (unpadded).
    :param max_new_tokens: cap on generated tokens per prompt.
    :param batch_size: most prompts per ``generate`` call.
    :param token_budget: most tokens per ``generate`` call (``token_budget_batches``).
    :param prompt_token_budget: most padded prompt tokens per ``generate`` call (``token_budget_batches``).
    :param settings: keys of ``GREEDY`` (``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``repetition_penalty``, ``no_repeat_ngram_size``); None is plain greedy (``GREEDY``).
    :return: one dict per prompt: ``text`` (decoded, special tokens dropped), ``token_ids`` (generated
        ids up to and including the EOS), ``ended_on_eos`` (bool).
    """
    eos = tokenizer.eos_token_id
    config = generation_config(tokenizer, max_new_tokens, settings)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    results: list[dict] = [{}] * len(prompts)
    device = next(model.parameters()).device
    batches = token_budget_batches([len(p) for p in prompts], max_new_tokens, batch_size, token_budget,
                                   prompt_token_budget)
    if config.do_sample:
        torch.manual_seed(seed)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=description, unit="batch"):
            padded = tokenizer.pad(
                {"input_ids": [prompts[i] for i in batch]}, padding_side="left", return_tensors="pt"
            ).to(device)  # (batch, prompt_len)
            output = model.generate(**padded, generation_config=config)
            start = 1 if encoder_decoder else padded["input_ids"].shape[1]  # decoder start token / the prompt
            new_tokens = output[:, start:].tolist()  # (batch, <= max_new_tokens)
            for i, tokens in zip(batch, new_tokens):
                ended = eos in tokens
                tokens = tokens[: tokens.index(eos) + 1] if ended else tokens
                results[i] = {
                    "text": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    "token_ids": tokens,
                    "ended_on_eos": ended,
                }
    return results


def answer_columns(generations: list[dict]) -> dict:
    """``generate_answers``' (or ``lib.gguf_export.gguf_answers``') dicts as the columns
    ``lib.scores.verdict`` scores: ``{"texts", "ended_on_eos", "new_tokens"}``, in question order."""
    return {"texts": [g["text"] for g in generations], "ended_on_eos": [g["ended_on_eos"] for g in generations],
            "new_tokens": [len(g["token_ids"]) for g in generations]}
