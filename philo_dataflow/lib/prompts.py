"""Prompt rendering and tokenization of one example with masked labels: one function, ``render_prompt``,
turns a question (and, for training, its answer) into text for training, evaluation, generation and
presaved loading alike (docs/pitfalls.md, "one prompt format"). Labels are built from the prompt's token
length, never by searching for a response marker:

    input_ids = prompt_ids + response_ids          # response_ids end with the EOS / end-of-turn token
    labels    = [-100] * len(prompt_ids) + response_ids

Padding is added later by the collator, which pads labels with -100 by position, so the EOS stays
supervised even where the pad token *is* the EOS token.
"""

from typing import Optional

from transformers import PreTrainedTokenizerBase

#: Label of a position that is not supervised (PyTorch's ``cross_entropy`` ``ignore_index``).
IGNORE_INDEX = -100
CHAT_TEMPLATE = "chat_template"
ALPACA = "alpaca"
#: Prompt of the Stanford Alpaca project (Taori et al. 2023), used when a tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_format: str, instruction: str, response: Optional[str] = None
) -> str:
    """The text the model sees: the prompt alone (``response=None``), or prompt and response.

    With ``"chat_template"`` the tokenizer's template renders a single user turn, with the generation
    prompt when ``response`` is None. With ``"alpaca"`` the Alpaca prompt is used and the tokenizer's BOS
    token is prefixed when the tokenizer would add one. The result is meant to be tokenized with
    ``add_special_tokens=False`` (no double BOS).
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
    render has none — so the last supervised label is the EOS unless truncated.

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
