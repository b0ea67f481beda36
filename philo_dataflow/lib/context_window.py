"""A model's context window — how many token positions it takes, read off its config, else its tokenizer — and
the limits of a run checked against it: ``max_seq_length`` (capped) and ``max_new_tokens`` with the longest
prompt answered (refused). Imports nothing of the package but ``problems``.

Why one is capped and the other refused:

- ``max_seq_length`` is a ceiling, not a size: batches are padded to their own longest example, so capping it
  to the window changes only the examples longer than the window, which the model could not take anyway
  (learned position embeddings fail with an index error past the window; rotary ones degrade). TRL's
  ``SFTTrainer`` capped its default the same way (``min(tokenizer.model_max_length, 1024)``), and Axolotl warns
  and carries on when ``sequence_len`` exceeds the model's positions. So it is capped, with one warning line.
- ``max_new_tokens`` is part of what is measured (answers ending on EOS within it) and is recorded with the
  results; capping it would make the record wrong, and an answer cannot run past the window anyway: a
  too-large value only makes the generation token budget answer one question per batch. Servers refuse such a
  request the same way (vLLM and OpenAI-style endpoints: prompt + ``max_tokens`` above the context is an error
  naming both), so it is refused, with the largest value the longest prompt leaves room for.
"""

from dataclasses import dataclass
from typing import Any, Optional

from .problems import flag

#: Config attributes that bound a model's positions, under the names transformers configs give them (GPT-2's
#: ``n_positions`` is also read as ``max_position_embeddings``; MPT's ``max_seq_len``, ChatGLM's ``seq_length``,
#: Command-R's ``model_max_length``). The smallest one present is the window; the same list vLLM reads
#: (``_get_and_verify_max_len`` in ``vllm/config``).
WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_sequence_length", "max_seq_length", "seq_len", "n_ctx")
#: An encoder-decoder's own keys for its encoder's and its decoder's positions (BART-like configs have
#: ``max_position_embeddings`` for both; Whisper-like ones ``max_source_positions``/``max_target_positions``).
ENCODER_KEYS = ("max_source_positions", "max_encoder_position_embeddings")
DECODER_KEYS = ("max_target_positions", "max_decoder_position_embeddings")
#: A tokenizer's ``model_max_length`` at or above this is transformers' "unset" (``VERY_LARGE_INTEGER``, 1e30).
_UNSET_MODEL_MAX_LENGTH = 10**20


@dataclass(frozen=True)
class ContextWindow:
    """The token positions a model takes.

    :param tokens: a decoder-only model's whole sequence (prompt and answer share it); an encoder-decoder's
        encoder input (the prompt). None: neither the config nor the tokenizer states one (no check).
    :param source: where ``tokens`` was read, for messages: ``"max_position_embeddings in the model's config"``
        or ``"the tokenizer's model_max_length"``.
    :param encoder_decoder: the model is an encoder-decoder (T5, BART): the answer has its own window.
    :param decoder_tokens: an encoder-decoder's decoder sequence (the answer); None for a decoder-only model.
    :param decoder_source: where ``decoder_tokens`` was read.
    """

    tokens: Optional[int]
    source: str = ""
    encoder_decoder: bool = False
    decoder_tokens: Optional[int] = None
    decoder_source: str = ""

    def answer_tokens(self) -> tuple[Optional[int], str]:
        """The window an answer is generated in, and its source: the decoder's, else the shared one."""
        if self.encoder_decoder:
            return self.decoder_tokens, self.decoder_source
        return self.tokens, self.source

    def limit_of_sequences(self) -> Optional[int]:
        """The most tokens one training sequence (a prompt, or an encoder-decoder's answer) may hold."""
        limits = [self.tokens, self.decoder_tokens if self.encoder_decoder else None]
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None


def _smallest(config: Any, keys: tuple) -> tuple[Optional[int], str]:
    found = [(value, key) for key in keys if isinstance(value := getattr(config, key, None), int)
             and not isinstance(value, bool) and value > 0]
    if not found:
        return None, ""
    value, key = min(found)
    return value, f"{key} in the model's config"


def _tokenizer_limit(tokenizer: Any) -> tuple[Optional[int], str]:
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNSET_MODEL_MAX_LENGTH:
        return length, "the tokenizer's model_max_length"
    return None, ""


def context_window(config: Any, tokenizer: Any = None) -> ContextWindow:
    """The window of the model ``config`` describes (a transformers ``PretrainedConfig``): the smallest of its
    ``WINDOW_KEYS`` (an encoder-decoder's ``ENCODER_KEYS``/``DECODER_KEYS`` first, and its ``encoder``/``decoder``
    sub-configs where it has them; a multimodal model's text config), else the tokenizer's ``model_max_length``
    where it sets one (T5's configs state none: its tokenizer says 512), else unknown. RoPE scaling is not
    applied on top: transformers' own configs state the scaled window (Llama 3.1: 131072).
    """
    if getattr(config, "is_encoder_decoder", False):
        encoder = getattr(config, "encoder", None) or config
        decoder = getattr(config, "decoder", None) or config
        tokens, source = _smallest(encoder, ENCODER_KEYS)
        if tokens is None:
            tokens, source = _smallest(encoder, WINDOW_KEYS)
        decoder_tokens, decoder_source = _smallest(decoder, DECODER_KEYS)
        if decoder_tokens is None:
            decoder_tokens, decoder_source = _smallest(decoder, WINDOW_KEYS)
        if tokens is None:
            tokens, source = _tokenizer_limit(tokenizer)
        if decoder_tokens is None:
            decoder_tokens, decoder_source = _tokenizer_limit(tokenizer)
        return ContextWindow(tokens, source, True, decoder_tokens, decoder_source)
    try:
        text_config = config.get_text_config(decoder=True)
    except (AttributeError, ValueError):  # not a PretrainedConfig; several text configs
        text_config = config
    tokens, source = _smallest(text_config, WINDOW_KEYS)
    if tokens is None:
        tokens, source = _tokenizer_limit(tokenizer)
    return ContextWindow(tokens, source)


def capped_max_seq_length(max_seq_length: int, window: ContextWindow) -> tuple[int, Optional[str]]:
    """``max_seq_length`` capped to the window's ``limit_of_sequences`` (see the module docstring for why
    capped): ``(value in use, the one line saying so, or None when not capped)``."""
    limit = window.limit_of_sequences()
    if limit is None or max_seq_length <= limit:
        return max_seq_length, None
    where = window.source if limit == window.tokens else window.decoder_source
    return limit, (f"max_seq_length={max_seq_length} ({flag('max_seq_length')}) is above the model's context "
                   f"window of {limit} tokens ({where}): capped to {limit}.")


@dataclass(frozen=True)
class GenerationPrompt:
    """One question a run generates an answer to: its split, its index there, its text, its prompt's tokens."""

    split: str
    index: int
    question: str
    tokens: int

    def named(self) -> str:
        return f"{self.split} record {self.index} ({self.question[:60]!r}...)"


def answer_room_problems(window: ContextWindow, prompts: list, max_new_tokens: int) -> list:
    """What keeps the answers to ``prompts`` (``GenerationPrompt``) from fitting the window: ``(input, line)``
    pairs, ``input`` being ``max_new_tokens`` or ``data_path``. A decoder-only model needs the longest prompt
    plus ``max_new_tokens`` within its window (with no prompts given, a prompt of one token); an encoder-decoder
    needs each prompt within its encoder's window and ``max_new_tokens`` within its decoder's. Empty when they
    fit, or when the window is unknown.

    Each line names the value, the window and where it comes from, and the largest value allowed.
    """
    longest = max(prompts, key=lambda prompt: prompt.tokens, default=None)
    answer_window, answer_source = window.answer_tokens()
    given = f"max_new_tokens={max_new_tokens} ({flag('max_new_tokens')})"
    problems = []
    if window.encoder_decoder:
        if answer_window is not None and max_new_tokens > answer_window:
            problems.append(("max_new_tokens", f"{given}: an answer must fit the model's decoder window of "
                                               f"{answer_window} tokens ({answer_source}); give max_new_tokens "
                                               f"{answer_window} or less."))
        if window.tokens is not None and longest is not None and longest.tokens > window.tokens:
            problems.append(("data_path", f"{longest.named()}: its prompt is {longest.tokens} tokens, more than the "
                                          f"model's encoder window of {window.tokens} tokens ({window.source}); "
                                          f"shorten that question or leave it out of the data ({flag('data_path')})."))
        return problems
    if window.tokens is not None and longest is None and max_new_tokens >= window.tokens:
        return [("max_new_tokens", f"{given}: an answer and its prompt (one token at least) must fit the model's "
                                   f"context window of {window.tokens} tokens ({window.source}); give max_new_tokens "
                                   f"{window.tokens - 1} or less (less the longest prompt's tokens).")]
    if window.tokens is None or longest is None or longest.tokens + max_new_tokens <= window.tokens:
        return []
    if longest.tokens >= window.tokens:
        return [("data_path", f"{longest.named()}: its prompt is {longest.tokens} tokens, which fills the model's "
                              f"context window of {window.tokens} tokens ({window.source}) and leaves no room for an "
                              f"answer; shorten that question or leave it out of the data ({flag('data_path')}).")]
    room = window.tokens - longest.tokens
    return [("max_new_tokens", f"{given}: the longest prompt answered, {longest.named()}, is {longest.tokens} tokens, "
                               f"and prompt and answer must fit the model's context window of {window.tokens} tokens "
                               f"({window.source}); give max_new_tokens {room} or less.")]
