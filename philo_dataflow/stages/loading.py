"""Loading: question/answer records from a file, a ``save_to_disk`` directory or a Hugging Face hub dataset,
in one of several record formats.

Nodes: ``raw_records`` (the source's records, untouched; a Hamilton data loader, whose metadata is
``data_source``), ``prompt_template_in_use`` (the input
``prompt_template``, or under ``start="presaved"`` the one the adapter was trained with) and
``instruction_records`` (normalised ``{"input_text", "output_text", "category", "context", "group"}`` dicts,
empty pairs dropped, duplicate prompts kept once) and ``records_left_out`` (what was dropped, by reason). Every bad record is reported, not only the first
(``lib.records``).
"""

import logging
from typing import Optional

from hamilton.function_modifiers import cache, dataloader, inject, source, tag

from ..lib.inputs import raise_hyperparameter_problems
from ..lib.problems import flag
from ..lib.records import left_out_line, left_out_summary, normalised_pairs, read_records, source_metadata
from ..lib.switches import when

logger = logging.getLogger(__name__)


@cache(behavior="recompute")
@dataloader()
def raw_records(data_path: str) -> tuple[list[dict], dict]:
    """The records of ``data_path``, as parsed, in file order (sources: ``lib.records.read_records``), and
    what was read. A Hamilton data loader: the node ``raw_records`` is the records, ``raw_records.loader``
    both, and its metadata is also the node ``data_source``.

    :param data_path: a .json, .jsonl, .csv or .parquet file, a ``save_to_disk`` directory (``dir`` or
        ``dir:split``), or a hub dataset id (``name`` or ``name:split``).
    :return: ``(records, metadata)``: a list of dicts, one per record, and ``lib.records.source_metadata``
        (path or hub id, source kind, format, record count, a file's SHA-256 and bytes).
    :raises ValueError: the source is missing, unreadable, not UTF-8, empty, not valid for its suffix, holds
        no records or records that are not objects, lacks the split asked for, or is a hub dataset that is
        neither cached nor downloadable; the message names the file or dataset and the records.
    """
    records = read_records(data_path)
    return records, source_metadata(data_path, records)


# ``@inject`` formats the docstring with str.format: no braces in it.
@inject(loaded=source("raw_records.loader"))
def data_source(loaded: tuple) -> dict:
    """What the data loader read (``raw_records``' metadata, ``lib.records.source_metadata``): a dict of
    ``data_path``, ``source``, ``format``, ``records``, ``sha256`` and ``bytes``; the manifest records its
    ``sha256``."""
    return loaded[1]


@when(start="base")
def prompt_template_in_use__base(prompt_template: Optional[str] = None) -> Optional[str]:
    """The ``prompt_template`` the records are rendered with (None: none; the prompt format decides)."""
    return prompt_template


@when(start="presaved")
def prompt_template_in_use__presaved(presaved_manifest: dict, prompt_template: Optional[str] = None) -> Optional[str]:
    """The template the presaved adapter was trained with (its manifest's ``prompt_template``): an adapter
    answers the prompts it learnt.

    :raises ValueError: ``prompt_template`` is given and differs from the manifest's.
    """
    trained_with = presaved_manifest.get("prompt_template")
    if prompt_template is not None and prompt_template != trained_with:
        raise ValueError(
            f"prompt_template={prompt_template!r} ({flag('prompt_template')}) differs from the template the presaved "
            f"adapter was trained with ({trained_with!r}, in its manifest); leave prompt_template unset to reuse it."
        )
    return trained_with


def instruction_records(
    raw_records: list[dict],
    data_path: str,
    prompt_template_in_use: Optional[str],
    input_text_key: Optional[str] = None,
    output_text_key: Optional[str] = None,
    category_key: str = "school",
    data_format: str = "auto",
    lang: Optional[str] = None,
) -> list[dict]:
    """The records as examples ``{"input_text", "output_text", "category", "context", "group"}`` (strings).

    Formats (``data_format``; ``auto`` decides from the first record, ``lib.records.detected_format``):

    - ``alpaca``: ``instruction``, optional ``input``, ``output`` (the default when no keys are given); the
      question is the instruction, followed by a blank line and the input when the input is not empty;
    - ``pairs``: the question under ``input_text_key``, the answer under ``output_text_key``;
    - ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (OpenAI);
    - ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}`` (FastChat,
      Axolotl; ``user``/``assistant`` are accepted for ``from`` too);
    - ``oasst``: OpenAssistant OASST1 message trees (``*.trees.jsonl``, one tree a line, or a JSON list:
      ``{"message_tree_id", "prompt": {"text", "role": "prompter"|"assistant", "lang", "rank", "deleted",
      "replies": [...]}}``, or bare root messages; https://huggingface.co/datasets/OpenAssistant/oasst1).

    A conversation alternates user and assistant turns after an optional leading system message; its last
    user turn is ``input_text``, its last assistant turn ``output_text``, and the turns before that last
    user turn (system message first) are ``context``, JSON of ``{"role", "content"}`` messages (``"[]"`` for
    single-turn records). A trailing user turn, with no answer to learn, is dropped (``records_left_out`` counts it).
    An OASST tree gives one conversation per path: at each prompter message its best-ranked assistant reply
    (lowest ``rank``; unranked after ranked, then file order), then every prompter reply to it, deleted
    messages skipped; ``lang`` keeps the trees whose first message has that language; every example of a
    tree has the tree's id as ``group``, so that the split keeps a tree in one split (``""`` elsewhere).

    With ``prompt_template_in_use`` (a ``str.format`` string over the record's keys, e.g. ``"### Question:\\n
    {question}\\n\\n### Answer:"``) the rendered template is ``input_text``, the whole prompt the model
    sees, and ``output_text_key`` (default ``output``) the answer; records whose template keys are all empty
    are dropped.

    The category is ``record[category_key]`` when present, else the first school of thought named in the
    question (then the answer), else ``"unknown"``. Examples with an empty (or null) question or answer are
    dropped; a prompt seen before (same context, same question up to case and
    whitespace) is kept once, at its first occurrence. ``records_left_out`` counts what was dropped, by
    reason.

    :param raw_records: the source's records (see ``raw_records``).
    :param data_path: where they came from, named in errors.
    :param prompt_template_in_use: the template that renders each record's prompt, or None.
    :param input_text_key: key of the question; None means alpaca ``instruction``/``input``.
    :param output_text_key: key of the answer; None means alpaca ``output``.
    :param category_key: key of the record's category (school of thought), used when present.
    :param data_format: one of ``lib.inputs.DATA_FORMATS``.
    :param lang: OASST only: the language code of the trees to keep; None keeps every tree.
    :return: list of dicts with string values, in file order.
    :raises ValueError: a key is missing from records or holds a non-string value, a turn or message is
        malformed or out of order, the template is malformed or names keys records lack, an input does not
        fit the format, no pair is left. The message has one line per problem, naming the file, the first
        bad record with its key or turn, and the others by index (the first ``lib.problems.MAX_LISTED_RECORDS``).
    """
    found = _normalised(raw_records, data_path, prompt_template_in_use, input_text_key, output_text_key, category_key,
                        data_format, lang)
    logger.info("%s: %d %s examples", data_path, len(found.pairs), found.data_format)
    return found.pairs


def _normalised(raw_records: list[dict], data_path: str, prompt_template: Optional[str], input_text_key: Optional[str],
                output_text_key: Optional[str], category_key: str, data_format: str, lang: Optional[str]):
    """``lib.records.normalised_pairs`` with the inputs checked first; raises its problems (one a line)."""
    raise_hyperparameter_problems(data_format=data_format, prompt_template=prompt_template, lang=lang)
    found = normalised_pairs(raw_records, data_path, input_text_key, output_text_key, category_key, data_format,
                             prompt_template, lang)
    if found.problems:
        raise ValueError("\n".join(found.problems))
    return found


@tag(output="final")
def records_left_out(
    raw_records: list[dict],
    data_path: str,
    prompt_template_in_use: Optional[str],
    input_text_key: Optional[str] = None,
    output_text_key: Optional[str] = None,
    category_key: str = "school",
    data_format: str = "auto",
    lang: Optional[str] = None,
) -> dict:
    """What ``instruction_records`` left out of ``raw_records``, by reason (``lib.records.LEFT_OUT_REASONS``), logged as
    one warning line; ``metrics.json`` (``left_out``), ``report.md`` and the report page show it.

    :return: ``{"records": n, "examples": k, "reasons": {reason: {"count": c, "records": [i, ...]}}}``: the
        ``n`` records read, the ``k`` examples kept, and for every reason (all of them, count 0 included)
        how many records it left out with the 0-based indices, in the file's records, of the first
        ``lib.problems.MAX_LISTED_RECORDS``. A ``trailing_user_turn`` record is kept without its last turn;
        the other reasons leave the whole record (an OASST tree: the tree) out.
    :raises ValueError: as ``instruction_records``.
    """
    found = _normalised(raw_records, data_path, prompt_template_in_use, input_text_key, output_text_key, category_key,
                        data_format, lang)
    summary = left_out_summary(found, len(raw_records))
    line = left_out_line(summary)
    if line:
        logger.warning("%s: %s", data_path, line)
    return summary

