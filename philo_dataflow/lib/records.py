"""Reading question/answer files and normalising their records, with every bad record reported: the
helpers of the ``loading`` stage, which ``preflight`` uses too."""

import codecs
import csv
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from .problems import listed

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

#: U+FEFF, which some editors write at the start of a UTF-8 file; skipped where a record starts.
BYTE_ORDER_MARK = "\ufeff"


def _also(indices: list) -> str:
    """The tail of a message about one record that others share: ``" (and 2 more records: 4, 9)"``."""
    if not indices:
        return ""
    return f" (and {len(indices)} more record{'s' if len(indices) > 1 else ''}: {listed(indices)})"


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


def read_records(data_path: str) -> list[dict]:
    """The records of ``data_path``, as parsed, in file order.

    Formats, chosen by file suffix: ``.json`` (a list of objects, or an object holding that list under
    one key, like ``{"$schema": ..., "data": [...]}``), ``.jsonl`` (one object per line, blank lines
    skipped) and ``.csv`` (a header row, then one record per row). The text must be UTF-8; a leading
    byte-order mark (U+FEFF, as Windows editors write it) is skipped, also at the start of a JSONL line
    (files joined with ``cat``).

    :param data_path: path to the data file.
    :return: list of dicts, one per record.
    :raises ValueError: the file is missing, not a regular file, unreadable, not UTF-8, empty, not valid
        for its suffix, holds no records, or holds records that are not objects; the message names the
        file and the records (every bad record, the first ``problems.MAX_LISTED_RECORDS`` by index).
    """
    if os.path.isdir(data_path):
        raise ValueError(f"{data_path}: is a directory; give the path of a .json, .jsonl or .csv file.")
    if not os.path.exists(data_path):
        raise ValueError(f"{data_path}: no such file; check data_path.")
    if not os.path.isfile(data_path):
        raise ValueError(
            f"{data_path}: not a regular file (a pipe, socket or device); give the path of a .json, .jsonl or "
            ".csv file."
        )
    suffix = os.path.splitext(data_path)[1].lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"{data_path}: unknown suffix {suffix!r}; use .json, .jsonl or .csv.")
    try:
        with open(data_path, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise ValueError(
            f"{data_path}: cannot be read ({error.strerror}); check its permissions (chmod +r) or copy it."
        ) from None
    if content.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(f"{data_path}: the text is UTF-16 (it starts with a UTF-16 byte-order mark); re-encode "
                         "the file as UTF-8.")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = content[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{data_path}: not UTF-8 text (byte 0x{content[error.start]:02x} at offset {error.start}, line {line}); "
            "re-encode the file as UTF-8."
        ) from None
    if not text.strip():
        raise ValueError(f"{data_path}: the file is empty; it must hold question/answer records.")

    if suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            line = line.lstrip(BYTE_ORDER_MARK)
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
    else:
        try:
            records = list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            raise ValueError(f"{data_path}: not valid CSV ({error}).") from None

    if not records:
        raise ValueError(f"{data_path}: holds no records; it must hold question/answer records.")
    not_objects = [index for index, record in enumerate(records) if not isinstance(record, dict)]
    if not_objects:
        first = not_objects[0]
        raise ValueError(
            f"{data_path}: record {first} is a {type(records[first]).__name__}, not an object with "
            f"question and answer keys{_also(not_objects[1:])}."
        )
    return records


def _school_in_text(*texts: str) -> Optional[str]:
    """The school of thought named first in the first text that names one, else None."""
    for text in texts:
        match = _SCHOOL_PATTERN.search(text)
        if match:
            return _WORD_TO_SCHOOL[match.group(1).lower()]
    return None


def _is_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _text(value: Optional[str]) -> str:
    return (value or "").strip()


@dataclass
class NormalisedPairs:
    """What ``normalised_pairs`` found: the pairs, where each came from, and what was wrong or dropped."""

    pairs: list = field(default_factory=list)
    #: index in the file's records of each pair
    source_indices: list = field(default_factory=list)
    #: one message per problem (each names the file, the records and the key)
    problems: list = field(default_factory=list)
    #: indices of records dropped for an empty, whitespace-only or null question or answer
    empty: list = field(default_factory=list)
    #: indices of records dropped for repeating an earlier prompt
    duplicates: list = field(default_factory=list)


def normalised_pairs(
    raw_records: list[dict],
    data_path: str,
    input_text_key: Optional[str] = None,
    output_text_key: Optional[str] = None,
    category_key: str = "school",
) -> NormalisedPairs:
    """Every record checked and normalised (see ``instruction_records``), with all problems collected.

    Problems are grouped: one message per missing key and one per key holding a non-string value, each
    naming the first record in full and the others by index.
    """
    alpaca = input_text_key is None and output_text_key is None
    question_key = "instruction" if input_text_key is None else input_text_key
    answer_key = "output" if output_text_key is None else output_text_key
    text_keys = (question_key, "input", answer_key) if alpaca else (question_key, answer_key)
    result, seen_prompts = NormalisedPairs(), set()
    missing, not_text = defaultdict(list), defaultdict(list)
    for index, record in enumerate(raw_records):
        absent = tuple(key for key in (question_key, answer_key) if key not in record)
        if absent:
            missing[absent].append(index)
        wrong = [key for key in text_keys if not _is_text(record.get(key))]
        for key in wrong:
            not_text[key].append(index)
        if absent or wrong:
            continue
        question, answer = _text(record[question_key]), _text(record[answer_key])
        extra_input = _text(record.get("input")) if alpaca else ""
        if extra_input and question:
            question = f"{question}\n\n{extra_input}"
        if not question or not answer:
            result.empty.append(index)
            continue
        prompt_key = " ".join(question.lower().split())
        if prompt_key in seen_prompts:
            result.duplicates.append(index)
            continue
        seen_prompts.add(prompt_key)
        category = record.get(category_key)
        if not isinstance(category, str) or not category.strip():
            category = _school_in_text(question, answer) or UNKNOWN_CATEGORY
        result.pairs.append({"input_text": question, "output_text": answer, "category": category.strip()})
        result.source_indices.append(index)
    hint = (
        "set input_text_key/output_text_key to the keys of your question and answer"
        if alpaca
        else "check input_text_key/output_text_key"
    )
    for keys, indices in missing.items():
        first = indices[0]
        result.problems.append(
            f"{data_path}: record {first} has no key {' and no key '.join(map(repr, keys))} (keys present: "
            f"{sorted(raw_records[first])}){_also(indices[1:])}; {hint}."
        )
    for key, indices in not_text.items():
        first = indices[0]
        result.problems.append(
            f"{data_path}: record {first}, key {key!r} holds a {type(raw_records[first][key]).__name__}"
            f"{_also(indices[1:])}; it must be a string."
        )
    if not result.pairs and not result.problems:
        result.problems.append(
            f"{data_path}: no record has both a question and an answer ({len(result.empty)} of "
            f"{len(raw_records)} have an empty, whitespace-only or null one); fill them in, or check "
            "input_text_key/output_text_key."
        )
    return result
