"""Prompt rendering and tokenization of one example with masked labels: one function, ``render_prompt``,
turns a conversation (and, for training, its answer) into text for training, evaluation, generation and
presaved loading alike (docs/pitfalls.md, "one prompt format"). Labels are built from the lengths of
rendered prefixes, never by searching for a response marker:

    input_ids = prompt_ids + response_ids          # response_ids end with the EOS / end-of-turn token
    labels    = [-100] * len(prompt_ids) + response_ids

A multi-turn conversation repeats this per assistant turn: each turn's prompt part is what the render
of the conversation up to that turn (with the generation prompt) adds to the previous render, and is
masked; each assistant turn is supervised up to and including its end-of-turn token.

Padding is added later by the collator, which pads labels with -100 by position, so the EOS stays
supervised even where the pad token *is* the EOS token.
"""

import json
import logging
import string
from typing import Optional

from transformers import PreTrainedTokenizerBase

from .inputs import OVERLONG_POLICIES
from .problems import listed

logger = logging.getLogger(__name__)

#: Label of a position that is not supervised (PyTorch's ``cross_entropy`` ``ignore_index``).
IGNORE_INDEX = -100
CHAT_TEMPLATE = "chat_template"
ALPACA = "alpaca"
#: The prompt is the record's ``prompt_template`` rendered at loading (``input_text``), passed through.
TEMPLATE = "template"
#: Encoder-decoder models: the encoder reads the question as it is, the decoder writes the answer.
PLAIN = "plain"
PROMPT_FORMATS = (CHAT_TEMPLATE, ALPACA, TEMPLATE, PLAIN)
#: Prompt of the Stanford Alpaca project (Taori et al. 2023), used when a tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
#: Under ``truncate_prompt``, the share of ``max_seq_length`` an answer keeps when its prompt is long:
#: the question is shortened so that the answer has ``min(answer tokens, ANSWER_SHARE * max_seq_length)``
#: tokens (LLaMA-Factory's ``cutoff_len`` splits the budget between source and target the same way when
#: both are long, ``data/processor/processor_utils.py: infer_seqlen``).
ANSWER_SHARE = 0.5


def conversation(context: str) -> list[dict]:
    """The messages of a record's ``context`` column (JSON; ``"[]"`` for a single-turn record)."""
    return json.loads(context) if context else []


def _rendered(tokenizer: PreTrainedTokenizerBase, prompt_format: str, messages: list[dict],
              generation_prompt: bool) -> str:
    """The render of ``messages`` (ending on a user turn when ``generation_prompt``, else on an
    assistant turn)."""
    if prompt_format == CHAT_TEMPLATE:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: use one of {PROMPT_FORMATS}.")
    if len(messages) > 2 or messages[0]["role"] != "user":
        raise ValueError(
            "a multi-turn conversation or a system prompt needs a tokenizer with a chat template "
            f"(prompt_format={prompt_format!r}); give a model that has one, or single-turn records."
        )
    question = messages[0]["content"]
    if prompt_format == PLAIN:
        text = question
    else:
        bos = tokenizer.bos_token or ""
        adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        body = ALPACA_PROMPT.format(instruction=question) if prompt_format == ALPACA else question
        text = (bos if adds_bos else "") + body
    return text if generation_prompt else text + messages[1]["content"]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_format: str, instruction: str, response: Optional[str] = None,
    context: str = "[]",
) -> str:
    """The text the model sees: the prompt alone (``response=None``), or prompt and response.

    With ``"chat_template"`` the tokenizer's template renders the ``context`` messages (system prompt and
    earlier turns) and a user turn, with the generation prompt when ``response`` is None. With
    ``"alpaca"`` the Alpaca prompt is used, with ``"template"`` the instruction is the rendered
    ``prompt_template`` itself; both get the tokenizer's BOS token prefixed when the tokenizer would add
    one. ``"plain"`` (encoder-decoder models) is the instruction alone. The result is meant to be tokenized
    with ``add_special_tokens=False`` (no double BOS).

    :raises ValueError: an unknown format; a non-empty ``context`` without a chat template.
    """
    messages = [*conversation(context), {"role": "user", "content": instruction}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return _rendered(tokenizer, prompt_format, messages, generation_prompt=response is None)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt_format: str, instruction: str,
                     context: str = "[]") -> list[int]:
    """Token ids of the rendered prompt, as both training and generation see them (``"plain"``, an
    encoder's input, with the tokenizer's special tokens: T5's closing ``</s>``)."""
    text = render_prompt(tokenizer, prompt_format, instruction, context=context)
    return tokenizer(text, add_special_tokens=prompt_format == PLAIN).input_ids


def no_room_for_an_answer(prompt_length: int, max_seq_length: int) -> str:
    """The problem of a prompt of ``prompt_length`` tokens that leaves no answer token within
    ``max_seq_length`` (an example needs ``max_seq_length > prompt_length``)."""
    return (
        f"the prompt alone is {prompt_length} tokens, max_seq_length={max_seq_length}: no answer token "
        "would be supervised. Raise max_seq_length, shorten the question, or choose overlong_policy "
        "truncate_prompt or drop."
    )


class OverlongExample(ValueError):
    """An example longer than ``max_seq_length`` that its ``overlong_policy`` leaves out (``drop``) or
    cannot fit (``truncate_prompt`` with a conversation too long before the question)."""


def _answer_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """A rendered assistant turn split into its supervised ids (up to and including the first EOS /
    end-of-turn token, which is appended when the render has none) and the ids after it (the template's
    trailing newline)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos in ids:
        cut = ids.index(eos) + 1
        return ids[:cut], ids[cut:]
    return ids + [eos], []


def _template_suffix(prompt_template: Optional[str]) -> str:
    """The literal text after the last placeholder of a ``prompt_template`` (its answer marker, such as
    ``"\\n\\n### Answer:"``), which truncation keeps."""
    if not prompt_template:
        return ""
    parts = list(string.Formatter().parse(prompt_template))
    last = max((i for i, part in enumerate(parts) if part[1] is not None), default=None)
    return "".join(literal for literal, *_ in parts[last + 1:]) if last is not None else ""


def shortened_question(
    tokenizer: PreTrainedTokenizerBase, prompt_format: str, instruction: str, context: str, budget: int,
    prompt_template: Optional[str] = None,
) -> Optional[str]:
    """The longest head of the question whose rendered prompt is at most ``budget`` tokens, the
    template's markers kept (for ``"template"``, the text after the template's last placeholder stays);
    None when not even an empty question fits."""
    suffix = _template_suffix(prompt_template) if prompt_format == TEMPLATE else ""
    if suffix and not instruction.endswith(suffix):
        suffix = ""
    body = instruction[: len(instruction) - len(suffix)] if suffix else instruction
    body_ids = tokenizer(body, add_special_tokens=False).input_ids

    def fits(kept: int) -> bool:
        text = tokenizer.decode(body_ids[:kept]) + suffix
        return len(prompt_token_ids(tokenizer, prompt_format, text, context)) <= budget

    low, high = 0, len(body_ids)  # invariant: fits(low) when any head fits
    if not fits(0):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return tokenizer.decode(body_ids[:low]) + suffix


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    instruction: str,
    response: str,
    max_seq_length: int,
    context: str = "[]",
    overlong_policy: str = "error",
    prompt_template: Optional[str] = None,
) -> dict:
    """One training example: ``input_ids``, ``attention_mask`` and ``labels`` (all of length ``seq_len``
    <= ``max_seq_length``), ``truncated`` (the final answer was cut to fit) and ``prompt_truncated`` (the
    question was shortened, ``overlong_policy="truncate_prompt"``).

    Every assistant turn is supervised: the part the render of the conversation up to it adds after the
    render with the generation prompt, cut just after its first EOS / end-of-turn token (what follows,
    such as the chat template's newline, is masked, and dropped after the final turn), or with the EOS
    appended when the render has none — so the last supervised label is the EOS unless truncated.

    Over-long examples (prompt and answer above ``max_seq_length``): ``"error"`` cuts the answer to fit
    and refuses a prompt that leaves no room at all; ``"truncate_prompt"`` cuts the answer the same way
    when the prompt is short, and shortens the question when the answer would keep fewer than
    ``min(answer tokens, ANSWER_SHARE * max_seq_length)`` tokens; ``"drop"`` leaves the example out.

    :raises ValueError: the prompt alone fills ``max_seq_length`` (``"error"``); the rendered prompt is not
        a prefix of the rendered example (a chat template that re-renders earlier turns).
    :raises OverlongExample: (a ValueError) ``"drop"`` of an over-long example, or ``"truncate_prompt"``
        where not even an empty question fits.
    """
    if overlong_policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong_policy={overlong_policy!r}: use one of {OVERLONG_POLICIES}.")
    messages = [*conversation(context), {"role": "user", "content": instruction},
                {"role": "assistant", "content": response}]
    input_ids, labels, rendered = [], [], ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _rendered(tokenizer, prompt_format, messages[:turn], generation_prompt=True)
        full_text = _rendered(tokenizer, prompt_format, messages[: turn + 1], generation_prompt=False)
        if not (prompt_text.startswith(rendered) and full_text.startswith(prompt_text)):
            raise ValueError("the rendered prompt is not a prefix of the rendered example; check the chat template.")
        prompt_ids = tokenizer(prompt_text[len(rendered):], add_special_tokens=False).input_ids
        answer_ids, tail_ids = _answer_ids(tokenizer, full_text[len(prompt_text):])
        input_ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        if turn < len(messages) - 1:
            input_ids += answer_ids + tail_ids
            labels += answer_ids + [IGNORE_INDEX] * len(tail_ids)
            rendered = full_text
    prompt_length = len(input_ids)
    prompt_truncated = False
    if prompt_length + len(answer_ids) > max_seq_length:
        if overlong_policy == "drop":
            raise OverlongExample(f"{prompt_length + len(answer_ids)} tokens, max_seq_length={max_seq_length}: dropped")
        keep = min(len(answer_ids), max(max_seq_length - prompt_length, int(ANSWER_SHARE * max_seq_length)))
        if overlong_policy == "truncate_prompt" and prompt_length > max_seq_length - keep:
            question = shortened_question(tokenizer, prompt_format, instruction, context, max_seq_length - keep,
                                          prompt_template)
            if question is None:
                raise OverlongExample(f"even with an empty question the prompt leaves the answer fewer than {keep} "
                                      f"of max_seq_length={max_seq_length} tokens")
            shortened = tokenize_example(tokenizer, prompt_format, question, response, max_seq_length, context,
                                         "error", prompt_template)
            return {**shortened, "prompt_truncated": True}
    room = max_seq_length - prompt_length
    if room <= 0:
        raise ValueError(no_room_for_an_answer(prompt_length, max_seq_length))
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    input_ids += answer_ids
    labels += answer_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "truncated": truncated,
        "prompt_truncated": prompt_truncated,
    }


def tokenize_seq2seq_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str,
    instruction: str,
    response: str,
    max_seq_length: int,
    context: str = "[]",
    overlong_policy: str = "error",
) -> dict:
    """One encoder-decoder training example: ``input_ids`` and ``attention_mask`` (the encoder's prompt,
    ``source_len`` <= ``max_seq_length``), ``labels`` (the answer's tokens ending with EOS, ``target_len``
    <= ``max_seq_length``; the model shifts them right into the decoder's inputs), ``truncated`` and
    ``prompt_truncated``. The encoder and the decoder each have ``max_seq_length`` tokens, so
    ``"truncate_prompt"`` cuts the prompt's end (its closing special token kept), ``"drop"`` leaves out an
    example over either budget, and ``"error"`` refuses a prompt over it; answers are cut to fit.

    :raises ValueError: ``"error"`` and a prompt above ``max_seq_length``.
    :raises OverlongExample: ``"drop"`` of an over-long example.
    """
    if overlong_policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong_policy={overlong_policy!r}: use one of {OVERLONG_POLICIES}.")
    source = prompt_token_ids(tokenizer, prompt_format, instruction, context)
    target = tokenizer(text_target=response).input_ids
    if target[-1:] != [tokenizer.eos_token_id]:
        target = target + [tokenizer.eos_token_id]
    longest = max(len(source), len(target))
    if longest > max_seq_length and overlong_policy == "drop":
        raise OverlongExample(f"{longest} tokens, max_seq_length={max_seq_length}: dropped")
    prompt_truncated = len(source) > max_seq_length
    if prompt_truncated and overlong_policy == "error":
        raise ValueError(f"the prompt is {len(source)} tokens, max_seq_length={max_seq_length}. Raise max_seq_length, "
                         "shorten the question, or choose overlong_policy truncate_prompt or drop.")
    if prompt_truncated:
        closing = source[-1:] if source[-1] in tokenizer.all_special_ids else []
        source = source[: max_seq_length - len(closing)] + closing
    truncated = len(target) > max_seq_length
    target = target[:max_seq_length]
    return {"input_ids": source, "attention_mask": [1] * len(source), "labels": target, "truncated": truncated,
            "prompt_truncated": prompt_truncated}


def split_prompt_ids(examples, tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> list[list[int]]:
    """Token ids of each question's whole prompt (``examples``: a split with ``input_text`` and, for
    conversations, ``context``), as generation sees it (its conversation before it included), whatever the
    ``overlong_policy``."""
    contexts = examples["context"] if "context" in examples.column_names else ["[]"] * len(examples)
    return [prompt_token_ids(tokenizer, prompt_format, q, c) for q, c in zip(examples["input_text"], contexts)]


def question_prompt_ids(examples, model, tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                        max_new_tokens: int) -> list[list[int]]:
    """``split_prompt_ids``, where only a prompt longer than the model's context less ``max_new_tokens`` loses
    its oldest tokens, counted in the log (the dataflow's own generation refuses such prompts instead:
    ``prediction.hold_out_prompt_ids``)."""
    prompts = split_prompt_ids(examples, tokenizer, prompt_format)
    context_length = getattr(model.config, "max_position_embeddings", None)
    if context_length and not getattr(model.config, "is_encoder_decoder", False):
        room = max(context_length - max_new_tokens, 1)
        cut = [i for i, ids in enumerate(prompts) if len(ids) > room]
        if cut:
            logger.warning("%d prompt(s) longer than the model's context (%d tokens) less max_new_tokens keep "
                           "their last %d tokens (records %s)", len(cut), context_length, room, listed(cut))
            prompts = [ids[-room:] for ids in prompts]
    return prompts
