"""Stage 1 — load question/answer records from JSON, JSONL or CSV.

Nodes: ``raw_records`` (the file's records, untouched) and ``instruction_records`` (normalised
``{"input_text", "output_text", "category"}`` dicts, empty pairs dropped, duplicate prompts kept once).
"""

import csv
import json
import logging
import os
import re
from typing import Any, Optional

logger = logging.getLogger(__name__)

#: Keys of an alpaca record (Taori et al. 2023, Stanford Alpaca); ``input`` is optional.
ALPACA_KEYS = ("instruction", "input", "output")

#: The nine schools of thought of the philosophy data, and the words that name each in free text.
SCHOOLS_OF_THOUGHT = {
    "Stoicism": ("stoicism", "stoic", "stoics"),
    "Nihilism": ("nihilism", "nihilist", "nihilists", "nihilistic"),
    "Rationalism": ("rationalism", "rationalist", "rationalists"),
    "Existentialism": ("existentialism", "existentialist", "existentialists"),
    "Utilitarianism": ("utilitarianism", "utilitarian", "utilitarians"),
    "Buddhism": ("buddhism", "buddhist", "buddhists"),
    "Hinduism": ("hinduism", "hindu", "hindus"),
    "Taoism": ("taoism", "taoist", "taoists", "daoism", "daoist"),
    "Hedonism": ("hedonism", "hedonist", "hedonists", "hedonistic"),
}
_SCHOOL_PATTERN = re.compile(
    r"\b(" + "|".join(w for words in SCHOOLS_OF_THOUGHT.values() for w in words) + r")\b",
    re.IGNORECASE,
)
_WORD_TO_SCHOOL = {w: school for school, words in SCHOOLS_OF_THOUGHT.items() for w in words}

#: Category given to a record that carries none and names no school in its text.
UNKNOWN_CATEGORY = "unknown"


def _records_from_json(data: Any, data_path: str) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list) and value]
        record_lists = [k for k in lists if all(isinstance(r, dict) for r in data[k])]
        if len(record_lists) == 1:
            return data[record_lists[0]]
        raise ValueError(
            f"{data_path}: a JSON object must hold exactly one list of records under a key; "
            f"found {len(record_lists)} such lists among keys {sorted(data)}. "
            "Give a file whose top level is the list of records."
        )
    raise ValueError(
        f"{data_path}: top-level JSON value is a {type(data).__name__}; "
        "expected a list of records or an object holding that list under a key."
    )


def raw_records(data_path: str) -> list[dict]:
    """The records of ``data_path``, as parsed, in file order.

    Formats, chosen by file suffix: ``.json`` (a list of objects, or an object holding that list under
    one key, like ``{"$schema": ..., "data": [...]}``), ``.jsonl`` (one object per line, blank lines
    skipped) and ``.csv`` (a header row, then one record per row).

    :param data_path: path to the data file.
    :return: list of dicts, one per record.
    :raises ValueError: the file is missing, unreadable, not valid for its suffix, or a record is not an
        object; the message names the file and the record.
    """
    if os.path.isdir(data_path):
        raise ValueError(f"{data_path}: is a directory; give the path of a .json, .jsonl or .csv file.")
    if not os.path.isfile(data_path):
        raise ValueError(f"{data_path}: no such file; check data_path.")
    suffix = os.path.splitext(data_path)[1].lower()
    try:
        with open(data_path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{data_path}: not UTF-8 text ({error}); re-encode the file as UTF-8.") from None
    except OSError as error:
        raise ValueError(f"{data_path}: cannot be read ({error.strerror}).") from None
    if not text.strip():
        raise ValueError(f"{data_path}: the file is empty; it must hold question/answer records.")

    if suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{data_path}: line {line_number} is not valid JSON ({error.msg}); "
                    "each line of a .jsonl file must be one JSON object."
                ) from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{data_path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
        records = _records_from_json(data, data_path)
    elif suffix == ".csv":
        try:
            records = list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            raise ValueError(f"{data_path}: not valid CSV ({error}).") from None
    else:
        raise ValueError(f"{data_path}: unknown suffix {suffix!r}; use .json, .jsonl or .csv.")

    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(
                f"{data_path}: record {index} is a {type(record).__name__}, not an object with "
                "question and answer keys."
            )
    return records


def _school_in_text(*texts: str) -> Optional[str]:
    """The school of thought named first in the first text that names one, else None."""
    for text in texts:
        match = _SCHOOL_PATTERN.search(text)
        if match:
            return _WORD_TO_SCHOOL[match.group(1).lower()]
    return None


def _text_field(record: dict, key: str, index: int, data_path: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"{data_path}: record {index}, key {key!r} holds a {type(value).__name__}; "
            "it must be a string."
        )
    return value.strip()


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
    :raises ValueError: a key is missing from a record, or holds a non-string value; no pair is left.
    """
    alpaca = input_text_key is None and output_text_key is None
    question_key = "instruction" if input_text_key is None else input_text_key
    answer_key = "output" if output_text_key is None else output_text_key
    pairs, seen_prompts = [], set()
    dropped_empty = dropped_duplicate = 0
    for index, record in enumerate(raw_records):
        for key in (question_key, answer_key):
            if key not in record:
                hint = (
                    "set input_text_key/output_text_key to the keys of your question and answer"
                    if alpaca
                    else "check input_text_key/output_text_key"
                )
                raise ValueError(
                    f"{data_path}: record {index} has no key {key!r} (keys present: "
                    f"{sorted(record)}); {hint}."
                )
        question = _text_field(record, question_key, index, data_path)
        if alpaca:
            extra_input = _text_field(record, "input", index, data_path)
            if extra_input and question:
                question = f"{question}\n\n{extra_input}"
        answer = _text_field(record, answer_key, index, data_path)
        if not question or not answer:
            dropped_empty += 1
            continue
        prompt_key = " ".join(question.lower().split())
        if prompt_key in seen_prompts:
            dropped_duplicate += 1
            continue
        seen_prompts.add(prompt_key)
        category = record.get(category_key)
        if not isinstance(category, str) or not category.strip():
            category = _school_in_text(question, answer) or UNKNOWN_CATEGORY
        pairs.append({"input_text": question, "output_text": answer, "category": category.strip()})
    if dropped_empty:
        logger.warning("%s: dropped %d record(s) with an empty question or answer", data_path, dropped_empty)
    if dropped_duplicate:
        logger.warning("%s: dropped %d record(s) repeating an earlier prompt", data_path, dropped_duplicate)
    if not pairs:
        raise ValueError(f"{data_path}: no record has both a question and an answer.")
    logger.info("%s: %d question/answer pairs", data_path, len(pairs))
    return pairs
