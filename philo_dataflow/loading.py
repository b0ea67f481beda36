"""Loading: question/answer records from a JSON, JSONL or CSV file.

Nodes: ``raw_records`` (the file's records, untouched) and ``instruction_records`` (normalised
``{"input_text", "output_text", "category"}`` dicts, empty pairs dropped, duplicate prompts kept once).
Both report every bad record, not only the first (``lib.records``).
"""

import logging
from typing import Optional

from .lib.records import normalised_pairs, read_records

logger = logging.getLogger(__name__)


def raw_records(data_path: str) -> list[dict]:
    """The records of ``data_path``, as parsed, in file order (formats: ``lib.records.read_records``).

    :param data_path: path to the data file.
    :return: list of dicts, one per record.
    :raises ValueError: the file is missing, unreadable, not UTF-8, empty, not valid for its suffix, or
        holds no records or records that are not objects; the message names the file and the records.
    """
    return read_records(data_path)


def instruction_records(
    raw_records: list[dict],
    data_path: str,
    input_text_key: Optional[str] = None,
    output_text_key: Optional[str] = None,
    category_key: str = "school",
) -> list[dict]:
    """Question/answer pairs, normalised to ``{"input_text", "output_text", "category"}``.

    Alpaca records (``instruction``, optional ``input``, ``output``) are recognised when no keys are
    given; the prompt is the instruction, followed by a blank line and the input when the input is not
    empty. The category is ``record[category_key]`` when present, else the first school of thought named
    in the question (then the answer), else ``"unknown"``. Pairs with an empty (or null) question or
    answer are dropped and counted in the log; a prompt seen before (same text up to case and
    whitespace) is kept once, at its first occurrence.

    :param raw_records: the file's records (see ``raw_records``).
    :param data_path: the file they came from, named in errors.
    :param input_text_key: key of the question; None means alpaca ``instruction``/``input``.
    :param output_text_key: key of the answer; None means alpaca ``output``.
    :param category_key: key of the record's category (school of thought), used when present.
    :return: list of dicts with string values, in file order.
    :raises ValueError: a key is missing from records, or holds a non-string value; no pair is left. The
        message has one line per problem, naming every bad record (the first ``lib.problems.MAX_LISTED_RECORDS``).
    """
    found = normalised_pairs(raw_records, data_path, input_text_key, output_text_key, category_key)
    if found.problems:
        raise ValueError("\n".join(found.problems))
    if found.empty:
        logger.warning("%s: dropped %d record(s) with an empty question or answer", data_path, len(found.empty))
    if found.duplicates:
        logger.warning("%s: dropped %d record(s) repeating an earlier prompt", data_path, len(found.duplicates))
    logger.info("%s: %d question/answer pairs", data_path, len(found.pairs))
    return found.pairs
