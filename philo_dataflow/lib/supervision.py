"""What a tokenized example supervises: the spans of tokens that carry loss, their check against the
end-of-turn / EOS token, and the example rendered with those tokens marked (``philo-dataflow preview``).

A span is a maximal run of positions whose label is not ``IGNORE_INDEX``. Every span must end on the
tokenizer's EOS (the end-of-turn token of a chat model): a model trained on spans that do not never learns
to stop (trl#1623, Axolotl#3754; ``docs/pitfalls.md`` item 1).

Imports nothing of the package but ``problems`` and ``prompts``.
"""

from typing import Optional, Sequence

from .problems import capped_lines
from .prompts import IGNORE_INDEX
#: How a supervised span is marked when the output is not a terminal: ``[[`` ... ``]]``.
BRACKETS = ("[[", "]]")
#: How it is marked on a terminal: ANSI bold green, then reset.
COLOUR = ("\x1b[1;32m", "\x1b[0m")


def supervised_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """The ``(start, end)`` position ranges (end exclusive) of the runs of ``labels`` that carry loss.

    :param labels: one label per position, ``seq_len`` ints, ``IGNORE_INDEX`` where no loss is taken.
    """
    spans, start = [], None
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, position))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def supervision_problems(split_name: str, labels_per_example: Sequence[Sequence[int]],
                         record_indices: Sequence[int], eos_token_id: Optional[int], eos_token: str) -> list[str]:
    """One line per example of a tokenized split that has no supervised token, or a supervised span that
    does not end on ``eos_token_id`` (capped at ``problems.MAX_LISTED_RECORDS`` lines, then a count).

    :param labels_per_example: each example's labels (a tokenized split's ``labels`` column).
    :param record_indices: each example's index in its split (the ``record_index`` column).
    :param eos_token_id: the tokenizer's EOS / end-of-turn id; None is itself a problem of every example.
    """
    problems = []
    for labels, index in zip(labels_per_example, record_indices):
        where = f"{split_name} record {index}"
        spans = supervised_spans(labels)
        if not spans:
            problems.append(f"{where}: no token carries loss; the answer is empty or masked as prompt.")
            continue
        missing = [number for number, (_, end) in enumerate(spans, 1) if labels[end - 1] != eos_token_id]
        if missing:
            which = "its answer" if len(spans) == 1 else f"answer turn(s) {', '.join(map(str, missing))}"
            problems.append(
                f"{where}: {which} does not end on the EOS token {eos_token!r}, so the model would not learn to "
                "stop; raise --max-seq-length, choose --overlong-policy drop, or give a chat template whose "
                "assistant turn ends on the EOS token.")
    return capped_lines(problems, f"{split_name} records")


def marked_text(decode, input_ids: Sequence[int], labels: Sequence[int], marks: tuple[str, str]) -> str:
    """The example's text with every supervised span between ``marks`` (``BRACKETS`` or ``COLOUR``).

    :param decode: ``ids -> text`` keeping special tokens, e.g. ``lambda ids: tokenizer.decode(ids,
        skip_special_tokens=False)``.
    """
    pieces, position = [], 0
    for start, end in supervised_spans(labels):
        pieces.append(decode(list(input_ids[position:start])))
        pieces.append(marks[0] + decode(list(input_ids[start:end])) + marks[1])
        position = end
    pieces.append(decode(list(input_ids[position:])))
    return "".join(pieces)
