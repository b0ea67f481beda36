"""Reading question/answer data and normalising its records, with every bad record reported: the helpers
of the ``loading`` stage, which ``preflight`` uses too.

Sources (``read_records``): a ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file, a directory written by
``datasets``' ``save_to_disk``, or a Hugging Face hub dataset id. Record formats (``normalised_pairs``):
alpaca, question/answer pairs under named keys (optionally rendered through a ``prompt_template``), chat
conversations (OpenAI ``messages``, ShareGPT ``conversations``) and OpenAssistant OASST1 message trees.
"""

import codecs
import contextlib
import csv
import json
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import datasets
import huggingface_hub
import pyarrow
import pyarrow.parquet
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

from .artifacts import file_metadata
from .inputs import DATA_FORMATS
from .problems import MAX_LISTED_RECORDS, capped_lines, flag, listed

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

#: Suffixes of the data files ``read_records`` reads.
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
#: A ``data_path`` ending so is a local file that is missing, never a hub dataset id.
_FILE_LIKE_SUFFIXES = FILE_SUFFIXES + (".txt", ".tsv", ".arrow", ".gz", ".zip", ".yaml", ".yml", ".xlsx")
#: A hub dataset id, ``name`` or ``namespace/name``, optionally followed by ``:split``.
_HUB_ID = re.compile(r"(?P<name>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?::(?P<split>[\w.-]+))?")
#: The split of a DatasetDict or hub dataset used when ``data_path`` names none.
DEFAULT_SPLIT = "train"
#: Seconds the hub has to answer whether a dataset exists (asked once, no retries).
HUB_PROBE_TIMEOUT_SECONDS = 10


def _also(indices: list) -> str:
    """The tail of a message about one record that others share: ``" (and 2 more records: 4, 9)"``."""
    if not indices:
        return ""
    return f" (and {len(indices)} more record{'s' if len(indices) > 1 else ''}: {listed(indices)})"


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    return text[0][:limit] if text else type(error).__name__


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
    """The records of ``data_path``, as parsed, in file (or dataset row) order.

    Sources, tried in this order:

    - a directory written by ``datasets.Dataset.save_to_disk`` (its rows) or ``DatasetDict.save_to_disk``
      (its ``train`` split, or the split named after a colon: ``saved_dir:test``);
    - a file, by suffix: ``.json`` (a list of objects, or an object holding that list under one key, like
      ``{"$schema": ..., "data": [...]}``), ``.jsonl`` (one object per line, blank lines skipped), ``.csv``
      (a header row, then one record per row) and ``.parquet`` (one record per row, read with pyarrow).
      Text must be UTF-8; a leading byte-order mark (U+FEFF, as Windows editors write it) is skipped,
      also at the start of a JSONL line (files joined with ``cat``);
    - when no such local path exists, a Hugging Face hub dataset id ``name`` or ``name:split`` (default
      split ``train``), loaded with ``datasets.load_dataset`` (see ``_hub_dataset``): from the local
      cache when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set or the hub cannot be reached.

    :param data_path: path of the data file or directory, or a hub dataset id.
    :return: list of dicts, one per record.
    :raises ValueError: (one line) the file is missing, not a regular file, unreadable, not UTF-8, empty,
        not valid for its suffix, holds no records, or holds records that are not objects (every bad
        record named, the first ``problems.MAX_LISTED_RECORDS`` by index); the directory is no
        save_to_disk directory or lacks the split asked for; the hub dataset is not cached and cannot be
        downloaded. The message names the file, directory or dataset and what to do.
    """
    if os.path.isdir(data_path):
        return _checked_records(_saved_dataset_rows(data_path, data_path, None), data_path)
    if os.path.exists(data_path):
        return _checked_records(_file_records(data_path), data_path)
    source, colon, split = data_path.rpartition(":")
    if colon and source and os.path.isdir(source):
        return _checked_records(_saved_dataset_rows(data_path, source, split), data_path)
    if colon and source and os.path.exists(source):
        raise ValueError(f"{data_path}: a split (':{split}') can follow only a save_to_disk directory or a hub "
                         f"dataset id; give {source} alone.")
    hub_id = _HUB_ID.fullmatch(data_path)
    if hub_id is None or hub_id["name"].lower().endswith(_FILE_LIKE_SUFFIXES):
        raise ValueError(f"{data_path}: no such file; check data_path.")
    return _checked_records(_hub_rows(data_path, hub_id["name"], hub_id["split"]), data_path)


def source_metadata(data_path: str, records: list) -> dict:
    """What was read from ``data_path``, as a Hamilton data loader reports it (``stages.loading.raw_records``;
    the Hamilton UI shows it): ``{"data_path", "source": "file" | "save_to_disk" | "hub", "format"
    (the file's suffix without its dot, else the source), "records", "sha256" (of a file; None otherwise),
    "bytes" (of a file; None otherwise)}``, plus ``path`` and Hamilton's ``file_metadata`` for a file
    (``artifacts.file_metadata``)."""
    source, colon, _ = data_path.rpartition(":")
    if os.path.isfile(data_path):
        return {"data_path": data_path, "source": "file", "format": os.path.splitext(data_path)[1].lower().lstrip("."),
                "records": len(records), **file_metadata(data_path)}
    kind = "save_to_disk" if os.path.isdir(data_path) or (colon and os.path.isdir(source)) else "hub"
    return {"data_path": data_path, "source": kind, "format": kind, "records": len(records), "sha256": None,
            "bytes": None}


def _checked_records(records: list, data_path: str) -> list:
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


def _file_records(data_path: str) -> list:
    """The records of the data file ``data_path`` (see ``read_records``)."""
    if not os.path.isfile(data_path):
        raise ValueError(
            f"{data_path}: not a regular file (a pipe, socket or device); give the path of a .json, .jsonl, .csv "
            "or .parquet file."
        )
    suffix = os.path.splitext(data_path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{data_path}: unknown suffix {suffix!r}; use .json, .jsonl or .csv, a .parquet file, a "
                         "save_to_disk directory or a hub dataset id.")
    try:
        with open(data_path, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise ValueError(
            f"{data_path}: cannot be read ({error.strerror}); check its permissions (chmod +r) or copy it."
        ) from None
    if suffix == ".parquet":
        return _parquet_records(content, data_path)
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
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{data_path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
        return _records_from_json(data, data_path)
    try:
        return list(csv.DictReader(text.splitlines()))
    except csv.Error as error:
        raise ValueError(f"{data_path}: not valid CSV ({error}).") from None


def _parquet_records(content: bytes, data_path: str) -> list:
    """The rows of a Parquet file's bytes, as dicts (nested columns as lists and dicts)."""
    if not content:
        raise ValueError(f"{data_path}: the file is empty; it must hold question/answer records.")
    try:
        table = pyarrow.parquet.read_table(pyarrow.BufferReader(content))
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(
            f"{data_path}: not a Parquet file ({_first_line(error)}); write it with pandas' to_parquet, pyarrow or "
            "datasets' Dataset.to_parquet, or give a .json, .jsonl or .csv file."
        ) from None
    return table.to_pylist()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets``' own log lines and progress bars held back: ``read_records`` reports in its own words."""
    verbosity, bars_off = datasets.logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _split_rows(splits: Any, split: Optional[str], data_path: str, what: str, base: str) -> Any:
    """The split ``split`` (None: ``DEFAULT_SPLIT``) of a DatasetDict-like mapping of split names."""
    names = sorted(splits)
    wanted = DEFAULT_SPLIT if split is None else split
    if wanted in splits:
        return splits[wanted]
    if split is None:
        raise ValueError(f"{data_path}: {what} has no '{DEFAULT_SPLIT}' split (its splits: {names}); name one "
                         f"after a colon, e.g. {base}:{names[0]}.")
    raise ValueError(f"{data_path}: {what} has no split {split!r} (its splits: {names}); name one of them after "
                     f"the colon, e.g. {base}:{names[0]}.")


def _saved_dataset_rows(data_path: str, directory: str, split: Optional[str]) -> list:
    """The rows of a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    is_dict = os.path.isfile(os.path.join(directory, "dataset_dict.json"))
    if not is_dict and not os.path.isfile(os.path.join(directory, "state.json")):
        raise ValueError(f"{data_path}: is a directory; give the path of a .json, .jsonl, .csv or .parquet file, or "
                         "a directory written by datasets' save_to_disk (this one holds no dataset_dict.json or "
                         "state.json).")
    try:
        with _quiet_datasets():
            saved = datasets.load_from_disk(directory)
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, JSON and Arrow errors here
        raise ValueError(f"{data_path}: the save_to_disk directory cannot be read ({_first_line(error)}); save the "
                         "dataset again with save_to_disk.") from None
    if isinstance(saved, datasets.DatasetDict):
        return _split_rows(saved, split, data_path, "the DatasetDict", directory).to_list()
    if split is not None:
        raise ValueError(f"{data_path}: {directory} holds one Dataset, not a DatasetDict, so it has no splits; give "
                         f"{directory} without ':{split}'.")
    return saved.to_list()


def _offline() -> bool:
    """Whether the hub is off limits: ``HF_DATASETS_OFFLINE``, else ``HF_HUB_OFFLINE``, read now (not only
    when ``datasets`` was imported)."""
    value = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(datasets.config.HF_HUB_OFFLINE)


def _cached_hub_dataset(name: str) -> Optional[Any]:
    """Hub dataset ``name`` from this machine's caches, without a request: ``datasets``' own cache of
    prepared Arrow files (``HF_DATASETS_CACHE/<namespace>___<name>/<config>/<version>/<hash>/``, what
    ``load_dataset`` reads offline), else a hub snapshot (``HF_HUB_CACHE/datasets--<namespace>--<name>/
    snapshots/<commit>/``, e.g. from ``hf download --repo-type dataset``), streamed so that nothing is
    written. :return: a (possibly streaming) DatasetDict, or None when neither cache holds it."""
    previous = datasets.config.HF_HUB_OFFLINE
    # datasets' offline mode is a module setting read at import; set it for this call so that it reads
    # its cache at once instead of retrying the hub (five times, with backoff).
    datasets.config.HF_HUB_OFFLINE = True
    try:
        with _quiet_datasets():
            try:
                return datasets.load_dataset(name)
            except ConnectionError:  # not in datasets' cache: "Couldn't reach '<name>' on the Hub"
                pass
            try:
                snapshot = huggingface_hub.snapshot_download(name, repo_type="dataset", local_files_only=True)
            except (FileNotFoundError, HFValidationError):  # LocalEntryNotFoundError is a FileNotFoundError
                return None
            return datasets.load_dataset(snapshot, streaming=True)
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _hub_dataset(data_path: str, name: str) -> Any:
    """Hub dataset ``name`` as a DatasetDict, like model ids in ``lib.model_sources``: offline, or when the
    hub does not answer one request (``HUB_PROBE_TIMEOUT_SECONDS``, no retries), from the local cache
    (``_cached_hub_dataset``); else downloaded (or refreshed) by ``datasets.load_dataset``.

    :raises ValueError: one line: not cached and offline or unreachable, no such (or a private or gated)
        dataset, or ``load_dataset`` failed; it names the dataset and what to do.
    """
    where = f"{data_path}: no such local file or directory, and the Hugging Face hub dataset {name!r}"
    instead = (f"download it once online (a run with network, or `hf download --repo-type dataset {name}`), or "
               "give a local .json, .jsonl, .csv or .parquet file")
    if _offline():
        problem = (f"{where} is not in the local cache and HF_HUB_OFFLINE is set, so it is not available offline; "
                   f"{instead}.")
    else:
        try:
            huggingface_hub.dataset_info(name, timeout=HUB_PROBE_TIMEOUT_SECONDS)
        except GatedRepoError:
            problem = (f"{where} is gated; accept its terms on huggingface.co and log in (`hf auth login`), or give "
                       "a local file.")
        except RepositoryNotFoundError:
            problem = f"{where} does not exist (or is private: log in with `hf auth login`); check data_path."
        except HFValidationError:
            problem = f"{data_path}: no such file; check data_path."
        except Exception as error:  # the HTTP client's transport errors (DNS, refused, timeout) differ by version
            problem = (f"{where} is not in the local cache and the hub cannot be reached ({_first_line(error, 160)}), "
                       f"so it is not available offline; {instead}.")
        else:
            try:
                with _quiet_datasets():
                    return datasets.load_dataset(name)
            except Exception as error:  # datasets' own errors name no file of ours; one line of them is enough
                raise ValueError(f"{data_path}: the hub dataset {name!r} cannot be loaded ({_first_line(error)}); "
                                 "check data_path, or give a local file.") from None
    try:
        cached = _cached_hub_dataset(name)
    except Exception as error:  # a damaged or ambiguous cache (several configs): datasets' own errors
        raise ValueError(f"{data_path}: the hub dataset {name!r} in the local cache cannot be loaded "
                         f"({_first_line(error)}); download it again online, or give a local file.") from None
    if cached is None:
        raise ValueError(problem)
    return cached


def _hub_rows(data_path: str, name: str, split: Optional[str]) -> list:
    """The rows of split ``split`` (None: ``DEFAULT_SPLIT``) of hub dataset ``name``."""
    dataset = _split_rows(_hub_dataset(data_path, name), split, data_path, f"the hub dataset {name!r}", name)
    try:
        with _quiet_datasets():
            return dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)
    except Exception as error:  # a snapshot's files are parsed only here, while streaming
        raise ValueError(f"{data_path}: the rows of the hub dataset {name!r} cannot be read ({_first_line(error)}); "
                         "download it again, or give a local file.") from None


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
    """What ``normalised_pairs`` found: the examples, where each came from, and what was wrong or dropped."""

    #: the normalised examples (see ``normalised_pairs`` for their keys)
    pairs: list = field(default_factory=list)
    #: index in the file's records of each example (for OASST, of its tree: several examples may share one)
    source_indices: list = field(default_factory=list)
    #: one message per problem (each names the file, the records and the key)
    problems: list = field(default_factory=list)
    #: indices of records dropped for an empty, whitespace-only or null question or answer
    empty: list = field(default_factory=list)
    #: indices of records dropped for repeating an earlier prompt
    duplicates: list = field(default_factory=list)
    #: the record format read: one of ``DATA_FORMATS`` but ``auto``
    data_format: str = ""
    #: indices of conversations whose trailing user turn (no answer to learn) was dropped
    trailing_user_turns: list = field(default_factory=list)
    #: indices of OASST trees left out for another ``lang``
    other_languages: list = field(default_factory=list)
    #: indices of OASST trees whose first prompt has no assistant reply left (none, or all deleted)
    unanswered: list = field(default_factory=list)


#: Why ``normalised_pairs`` leaves a record out, in the order they are reported: the reason's key in
#: ``left_out_summary`` and the ``NormalisedPairs`` field holding its record indices.
LEFT_OUT_REASONS = {
    "empty_question_or_answer": "empty",
    "repeated_prompt": "duplicates",
    "trailing_user_turn": "trailing_user_turns",
    "oasst_tree_without_reply": "unanswered",
    "other_language": "other_languages",
}
_REASON_WORDS = {
    "empty_question_or_answer": "with an empty or null question or answer",
    "repeated_prompt": "repeating an earlier prompt (same earlier turns and question)",
    "trailing_user_turn": "ending on a user turn with no answer (that turn dropped, the conversation kept)",
    "oasst_tree_without_reply": "OASST tree(s) whose first prompt has no assistant reply",
    "other_language": "OASST tree(s) in another language than lang",
}


def left_out_summary(found: NormalisedPairs, record_count: int) -> dict:
    """What ``normalised_pairs`` left out, by reason: ``{"records": n, "examples": k, "reasons": {reason:
    {"count": c, "records": [i, ...]}}}``, every reason of ``LEFT_OUT_REASONS`` (count 0 included), with the
    0-based indices of the first ``MAX_LISTED_RECORDS`` records in the source's records."""
    reasons = {reason: {"count": len(getattr(found, name)), "records": getattr(found, name)[:MAX_LISTED_RECORDS]}
               for reason, name in LEFT_OUT_REASONS.items()}
    return {"records": record_count, "examples": len(found.pairs), "reasons": reasons}


def left_out_line(summary: dict) -> str:
    """One line naming the records left out by reason with their first indices (``left_out_summary``;
    ``""`` when none was)."""
    parts = []
    for reason, done in summary["reasons"].items():
        if done["count"]:
            more = ", ..." if done["count"] > len(done["records"]) else ""
            parts.append(f"{done['count']} {_REASON_WORDS[reason]} (record{'s' if done['count'] > 1 else ''} "
                         f"{', '.join(map(str, done['records']))}{more})")
    if not parts:
        return ""
    return (f"{summary['records']} record(s) read, {summary['examples']} example(s) kept; left out: "
            + "; ".join(parts) + ".")


class _BadRecord(Exception):
    """One record's problem: ``kind`` groups records with the same problem into one message, ``detail``
    is this record's particulars (``", key 'messages' turn 2 has no key 'content' (...)"``), ``hint`` what
    to do."""

    def __init__(self, kind: tuple, detail: str, hint: str):
        super().__init__(detail)
        self.kind, self.detail, self.hint = kind, detail, hint


class _Grouped:
    """Records that share a problem, one message per kind: the first record in full, the others by index."""

    def __init__(self) -> None:
        self._found: dict = {}

    def add(self, kind: Any, index: int, detail: str, hint: str = "") -> None:
        self._found.setdefault(kind, (hint, detail, []))[2].append(index)

    def lines(self, data_path: str, hint: str = "") -> list:
        return [f"{data_path}: record {indices[0]}{detail}{_also(indices[1:])}; {own or hint}."
                for own, detail, indices in self._found.values()]


@dataclass(frozen=True)
class _ChatFormat:
    """Where a chat format keeps its turns: the record key, each turn's role and text keys, and the role
    names of the file mapped to OpenAI's."""

    turns_key: str
    role_key: str
    text_key: str
    roles: dict
    role_names: str


_CHAT_FORMATS = {
    # OpenAI chat messages, as TRL's SFTTrainer and the chat templates of transformers take them.
    "messages": _ChatFormat("messages", "role", "content",
                            {"system": "system", "user": "user", "assistant": "assistant"},
                            "system, user or assistant"),
    # ShareGPT, as FastChat and Axolotl read it ("from": "human"/"gpt").
    "sharegpt": _ChatFormat("conversations", "from", "value",
                            {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                             "assistant": "assistant"},
                            "system, human or gpt (or user, assistant)"),
}
_CHAT_FORMAT_NAMES = ("messages", "sharegpt", "oasst")


def detected_format(record: dict, input_text_key: Optional[str] = None, output_text_key: Optional[str] = None) -> str:
    """The format ``data_format="auto"`` reads a file in, from its first record: ``messages`` (a
    ``messages`` key), ``sharegpt`` (``conversations``), ``oasst`` (a ``prompt`` object with ``replies``,
    or a bare message with ``replies`` and ``role``), else ``alpaca`` when no keys are given and ``pairs``
    when they are."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    prompt = record.get("prompt")
    if (isinstance(prompt, dict) and "replies" in prompt) or ("replies" in record and "role" in record):
        return "oasst"
    return "alpaca" if input_text_key is None and output_text_key is None else "pairs"


def _setting_problems(data_path: str, data_format: str, found: str, input_text_key: Optional[str],
                      output_text_key: Optional[str], prompt_template: Optional[str], lang: Optional[str]) -> list:
    """Inputs that do not fit the records' format ``found`` (read with ``data_format``)."""
    origin = f"data_format={data_format!r}" if data_format != "auto" else "data_format 'auto' found them in record 0"
    keys = f"input_text_key/output_text_key ({flag('input_text_key')}, {flag('output_text_key')})"
    problems = []
    if found in _CHAT_FORMAT_NAMES:
        if input_text_key is not None or output_text_key is not None:
            problems.append(f"{data_path}: {keys} name the question and answer keys of question/answer records, but "
                            f"it holds {found} records ({origin}), whose turns carry them; unset both.")
        if prompt_template is not None:
            problems.append(f"{data_path}: prompt_template ({flag('prompt_template')}) renders question/answer "
                            f"records, but it holds {found} records ({origin}), whose turns are the prompt; unset "
                            "prompt_template.")
    if data_format == "alpaca" and (input_text_key is not None or output_text_key is not None):
        problems.append(f"{data_path}: data_format='alpaca' reads the keys instruction, input and output, but {keys} "
                        "are set; unset them, or use data_format 'pairs'.")
    if prompt_template is not None and input_text_key is not None:
        problems.append(f"{data_path}: prompt_template ({flag('prompt_template')}) builds the prompt from the "
                        f"record's keys, so input_text_key={input_text_key!r} ({flag('input_text_key')}) is not "
                        "used; unset input_text_key.")
    if lang is not None and found != "oasst":
        problems.append(f"{data_path}: lang={lang!r} ({flag('lang')}) keeps the OASST trees of one language, but it "
                        f"holds {found} records ({origin}); unset lang.")
    return problems


def _template_fields(template: str, data_path: str) -> tuple[list, list]:
    """The record keys ``template`` names, in order of first use, and its problems (``str.format`` syntax:
    https://docs.python.org/3/library/string.html#format-string-syntax)."""
    where = f"{data_path}: prompt_template={template!r} ({flag('prompt_template')})"
    example = "'### Question:\\n{question}\\n\\n### Answer:'"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        return [], [f"{where} is not a valid format string ({error}); write each record key in braces, e.g. "
                    f"{example}, and a literal brace twice ({{{{ or }}}})."]
    fields = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return [], [f"{where} has the positional placeholder {{{name}}}; name a record key in the braces, e.g. "
                        f"{example}."]
        if "." in name or "[" in name:
            key = re.split(r"[.\[]", name)[0] or "question"
            return [], [f"{where}: placeholder {{{name}}} reads an attribute or an index; name a plain record key, "
                        f"e.g. {{{key}}}."]
        if "{" in (spec or ""):
            return [], [f"{where}: placeholder {{{name}}} has a nested field in its format spec; name plain record "
                        "keys only."]
        fields.append(name)
    if not fields:
        return [], [f"{where} names no record key; put the key of the question in braces, e.g. {example}."]
    fields = list(dict.fromkeys(fields))
    try:
        template.format_map({name: "x" for name in fields})
    except (ValueError, TypeError, KeyError) as error:
        return [], [f"{where} cannot be rendered ({error}); write placeholders as {{key}} without a format spec."]
    return fields, []


def _keep(result: NormalisedPairs, seen: set, index: int, record: dict, category_key: str, question: str,
          answer: str, context: list, group: str) -> None:
    """Adds one example to ``result``, or counts it as empty or as a repeated prompt (same ``context`` and
    question up to case and whitespace). Without a category under ``category_key`` it gets the school
    named first in the question, else the answer, else the earlier turns."""
    if not question or not answer:
        result.empty.append(index)
        return
    context_text = json.dumps(context, ensure_ascii=False)
    prompt_key = (context_text, " ".join(question.lower().split()))
    if prompt_key in seen:
        result.duplicates.append(index)
        return
    seen.add(prompt_key)
    category = record.get(category_key)
    if not isinstance(category, str) or not category.strip():
        category = _school_in_text(question, answer, *(message["content"] for message in context)) or UNKNOWN_CATEGORY
    result.pairs.append({"input_text": question, "output_text": answer, "category": category.strip(),
                         "context": context_text, "group": group})
    result.source_indices.append(index)


def _question_answer_pairs(raw_records: list, data_path: str, result: NormalisedPairs, seen: set, category_key: str,
                           input_text_key: Optional[str], output_text_key: Optional[str],
                           prompt_template: Optional[str], fields: list) -> None:
    """Single-turn records: alpaca, ``pairs`` under ``input_text_key``/``output_text_key``, or any keys
    rendered through ``prompt_template``."""
    alpaca = result.data_format == "alpaca" and prompt_template is None
    question_key = "instruction" if input_text_key is None else input_text_key
    answer_key = "output" if output_text_key is None else output_text_key
    if prompt_template is not None and answer_key in fields:
        result.problems.append(
            f"{data_path}: prompt_template={prompt_template!r} ({flag('prompt_template')}) puts the answer key "
            f"{{{answer_key}}} in the prompt, so the model would be shown the answer it is trained to write; render "
            f"the question only (the answer follows the prompt) and name the answer's key with output_text_key "
            f"({flag('output_text_key')}).")
        return
    needed = tuple(dict.fromkeys((*fields, answer_key))) if prompt_template is not None else (question_key, answer_key)
    text_keys = (question_key, "input", answer_key) if alpaca else needed
    missing, not_text = _Grouped(), _Grouped()
    for index, record in enumerate(raw_records):
        absent = tuple(key for key in needed if key not in record)
        if absent:
            missing.add(absent, index, f" has no key {' and no key '.join(map(repr, absent))} (keys present: "
                                       f"{sorted(record)})")
        wrong = [key for key in text_keys if not _is_text(record.get(key))]
        for key in wrong:
            not_text.add(key, index, f", key {key!r} holds a {type(record[key]).__name__}")
        if absent or wrong:
            continue
        answer = _text(record[answer_key])
        if prompt_template is not None:
            values = {name: _text(record[name]) for name in fields}
            question = prompt_template.format_map(values) if any(values.values()) else ""
        else:
            question = _text(record[question_key])
            extra_input = _text(record.get("input")) if alpaca else ""
            if extra_input and question:
                question = f"{question}\n\n{extra_input}"
        _keep(result, seen, index, record, category_key, question, answer, [], "")
    if prompt_template is not None:
        hint = f"check prompt_template ({flag('prompt_template')}) and output_text_key ({flag('output_text_key')})"
    elif alpaca:
        hint = "set input_text_key/output_text_key to the keys of your question and answer"
    else:
        hint = "check input_text_key/output_text_key"
    result.problems += missing.lines(data_path, hint) + not_text.lines(data_path, "it must be a string")


def _chat_turns(record: dict, chat: _ChatFormat) -> tuple[list, bool]:
    """A chat record's turns as ``{"role", "content"}`` messages (OpenAI roles, contents stripped),
    ending on an assistant turn, and whether a trailing user turn was dropped.

    :raises _BadRecord: no turns, a turn that is not an object or lacks its role or text, an unknown role,
        a text that is not a string, a system message after the first turn, user and assistant turns out
        of order, no assistant turn.
    """
    key, role_key, text_key = chat.turns_key, chat.role_key, chat.text_key
    if key not in record:
        raise _BadRecord(("no-key", key), f" has no key {key!r} (keys present: {sorted(record)})",
                         f"give each record its list of turns under {key!r}, or set data_format "
                         f"({flag('data_format')})")
    turns = record[key]
    shape = f"each {{{role_key!r}: ..., {text_key!r}: ...}}"
    if not isinstance(turns, list):
        raise _BadRecord(("not-list", key), f", key {key!r} holds a {type(turns).__name__}",
                         f"it must be a list of turns, {shape}")
    if not turns:
        raise _BadRecord(("no-turns", key), f", key {key!r} holds no turns",
                         "give the conversation, or remove the record")
    messages, previous = [], None
    for number, turn in enumerate(turns):
        where = f", key {key!r} turn {number}"
        if not isinstance(turn, dict):
            raise _BadRecord(("turn-not-object", key), f"{where} is a {type(turn).__name__}",
                             f"each turn must be an object, {shape}")
        absent = tuple(name for name in (role_key, text_key) if name not in turn)
        if absent:
            missing = " and no key ".join(map(repr, absent))
            raise _BadRecord(("turn-no-key", key, absent),
                             f"{where} has no key {missing} (keys present: {sorted(turn)})",
                             f"each turn needs {role_key!r} and {text_key!r}")
        name, text = turn[role_key], turn[text_key]
        role = chat.roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise _BadRecord(("unknown-role", key), f"{where} has {role_key} {name!r}", f"use {chat.role_names}")
        if not _is_text(text):
            raise _BadRecord(("turn-not-text", key), f"{where}, key {text_key!r} holds a {type(text).__name__}",
                             "it must be a string")
        if role == "system":
            if number:
                raise _BadRecord(("system-not-first", key), f"{where} is a system message after turn 0",
                                 "a system message may only open the conversation")
        else:
            expected = "user" if sum(m["role"] != "system" for m in messages) % 2 == 0 else "assistant"
            if role != expected:
                after = f"after {previous!r}" if previous is not None else "as the first turn"
                raise _BadRecord(("out-of-order", key), f"{where} is {name!r} {after}",
                                 "turns must alternate user and assistant, starting with user after an optional "
                                 "leading system message")
        messages.append({"role": role, "content": _text(text)})
        previous = name
    trailing = messages[-1]["role"] == "user" and any(m["role"] == "assistant" for m in messages)
    if trailing:
        messages.pop()
    if messages[-1]["role"] != "assistant":
        raise _BadRecord(("no-answer", key), f", key {key!r} has no assistant turn",
                         "a conversation must end with the assistant's answer to learn")
    return messages, trailing


def _chat_pairs(raw_records: list, data_path: str, result: NormalisedPairs, seen: set, category_key: str) -> None:
    """``messages`` and ``sharegpt`` records: one example per conversation, its last exchange the question
    and answer, the turns before them the context."""
    chat, bad = _CHAT_FORMATS[result.data_format], _Grouped()
    for index, record in enumerate(raw_records):
        try:
            messages, trailing = _chat_turns(record, chat)
        except _BadRecord as problem:
            bad.add(problem.kind, index, problem.detail, problem.hint)
            continue
        if trailing:
            result.trailing_user_turns.append(index)
        _keep(result, seen, index, record, category_key, messages[-2]["content"], messages[-1]["content"],
              messages[:-2], "")
    result.problems += capped_lines(bad.lines(data_path), "kinds of record problems")


_OASST_ROLES = ("prompter", "assistant")


def _oasst_root(record: dict) -> tuple[dict, str]:
    """A tree record's root message and where it is (``"prompt"``; ``""`` for a bare root message)."""
    if "prompt" in record:
        root = record["prompt"]
        if not isinstance(root, dict):
            raise _BadRecord(("prompt-not-object",), f", key 'prompt' holds a {type(root).__name__}",
                             "it must be the tree's root message, an object with 'role', 'text' and 'replies'")
        return root, "prompt"
    if "replies" in record and "role" in record:
        return record, ""
    raise _BadRecord(("no-prompt",), f" has no key 'prompt' (keys present: {sorted(record)})",
                     "each record of an OASST trees file is a tree with its root message under 'prompt' (or a root "
                     f"message with 'role' and 'replies'); or set data_format ({flag('data_format')})")


def _check_tree(root: dict, root_where: str) -> None:
    """Checks every message of a tree but deleted ones (and their replies).

    :raises _BadRecord: a message that is not an object, lacks ``role`` or ``text``, has another role than
        prompter/assistant, the same role as the message it replies to, a root that is not a prompter, a
        text that is not a string, a rank that is not a number or null, ``replies`` that are not a list.
    """
    stack = [(root, root_where, None)]
    while stack:
        message, where, parent_role = stack.pop()
        label = f", message {where}" if where else ", the root message"
        if not isinstance(message, dict):
            raise _BadRecord(("message-not-object",), f"{label} is a {type(message).__name__}",
                             "every reply must be a message object with 'role', 'text' and 'replies'")
        if message.get("deleted"):
            continue
        if message.get("message_id") is not None:
            label += f" (message_id {message['message_id']!r})"
        absent = tuple(name for name in ("role", "text") if name not in message)
        if absent:
            raise _BadRecord(("message-no-key", absent), f"{label} has no key {' and no key '.join(map(repr, absent))} "
                                                         f"(keys present: {sorted(message)})",
                             "every OASST message needs 'role' ('prompter' or 'assistant') and 'text'")
        role = message["role"]
        if role not in _OASST_ROLES:
            raise _BadRecord(("message-role",), f"{label} has role {role!r}", "use 'prompter' or 'assistant'")
        if parent_role is None and role != "prompter":
            raise _BadRecord(("root-not-prompter",), f"{label} has role {role!r}, not 'prompter'",
                             "an OASST tree must start with a prompter message, the first question")
        if role == parent_role:
            raise _BadRecord(("message-order",), f"{label} is a {role!r} reply to a {role!r} message",
                             "replies alternate: a prompter message gets assistant replies, an assistant message "
                             "prompter replies")
        if not _is_text(message["text"]):
            raise _BadRecord(("message-text",), f"{label}, key 'text' holds a {type(message['text']).__name__}",
                             "it must be a string")
        rank = message.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
            raise _BadRecord(("message-rank",), f"{label}, key 'rank' holds {rank!r}",
                             "it must be an integer (0 is the best reply) or null")
        replies = message.get("replies")
        if replies is not None and not isinstance(replies, list):
            raise _BadRecord(("replies-not-list",), f"{label}, key 'replies' holds a {type(replies).__name__}",
                             "it must be a list of reply messages")
        for number in reversed(range(len(replies or []))):
            stack.append((replies[number], f"{where}.replies[{number}]" if where else f"replies[{number}]", role))


def _rank_order(position_and_message: tuple) -> tuple:
    """Best reply first: lowest ``rank`` (0 is best), unranked (null or NaN) after ranked, then file order."""
    position, message = position_and_message
    rank = message.get("rank")
    unranked = rank is None or rank != rank
    return unranked, 0 if unranked else rank, position


def _live_replies(message: dict, role: str) -> list:
    return [reply for reply in message.get("replies") or [] if reply.get("role") == role and not reply.get("deleted")]


def _best_paths(root: dict) -> list:
    """The conversations of a checked tree: at each prompter message its best-ranked assistant reply
    (``_rank_order``), then every prompter reply to that, deleted messages skipped; each maximal path,
    cut after its last assistant message, once. :return: lists of messages, prompter first, in file order."""
    if root.get("deleted"):
        return []
    paths, seen, stack = [], set(), [(root, [])]
    while stack:
        prompter, history = stack.pop()
        answers = _live_replies(prompter, "assistant")
        if not answers:  # the path ends on an unanswered prompt: it is kept up to the answer before it
            if history and tuple(map(id, history)) not in seen:
                seen.add(tuple(map(id, history)))
                paths.append(history)
            continue
        best = min(enumerate(answers), key=_rank_order)[1]
        path = [*history, prompter, best]
        follow_ups = _live_replies(best, "prompter")
        if not follow_ups:
            seen.add(tuple(map(id, path)))
            paths.append(path)
        stack.extend((follow_up, path) for follow_up in reversed(follow_ups))
    return paths


def _oasst_pairs(raw_records: list, data_path: str, result: NormalisedPairs, seen: set, category_key: str,
                 lang: Optional[str]) -> None:
    """OASST1 message trees (https://huggingface.co/datasets/OpenAssistant/oasst1, ``*.trees.jsonl``): one
    example per conversation of ``_best_paths``; every example of a tree gets its tree id as ``group``."""
    bad, languages = _Grouped(), set()
    for index, record in enumerate(raw_records):
        try:
            root, where = _oasst_root(record)
            _check_tree(root, where)
        except _BadRecord as problem:
            bad.add(problem.kind, index, problem.detail, problem.hint)
            continue
        languages.add(root.get("lang"))
        if lang is not None and root.get("lang") != lang:
            result.other_languages.append(index)
            continue
        paths = _best_paths(root)
        if not paths:
            result.unanswered.append(index)
            continue
        group = str(record.get("message_tree_id") or root.get("message_id") or f"tree {index}")
        for path in paths:
            messages = [{"role": "user" if message["role"] == "prompter" else "assistant",
                         "content": _text(message["text"])} for message in path]
            _keep(result, seen, index, record, category_key, messages[-2]["content"], messages[-1]["content"],
                  messages[:-2], group)
    result.problems += capped_lines(bad.lines(data_path), "kinds of record problems")
    if lang is not None and not result.pairs and result.other_languages and not result.problems:
        shown = sorted(languages, key=str)
        result.problems.append(f"{data_path}: no OASST tree has lang={lang!r} ({flag('lang')}); its trees' languages "
                               f"are {shown}: give one of them, or unset lang for every language.")


def normalised_pairs(
    raw_records: list[dict],
    data_path: str,
    input_text_key: Optional[str] = None,
    output_text_key: Optional[str] = None,
    category_key: str = "school",
    data_format: str = "auto",
    prompt_template: Optional[str] = None,
    lang: Optional[str] = None,
) -> NormalisedPairs:
    """Every record checked and normalised (see ``loading.instruction_records`` for the formats), with all
    problems collected.

    Each example is ``{"input_text", "output_text", "category", "context", "group"}``, all strings:
    ``context`` is ``json.dumps`` (``ensure_ascii=False``) of the ``{"role", "content"}`` messages before
    the final user turn (``"[]"`` for a single-turn record), ``group`` the key of records that must share a
    split (an OASST tree's id; ``""`` for none). A prompt (context and question, the question up to case and
    whitespace) seen before is kept once.

    Problems are grouped: one message per kind of problem (a missing key, a key holding a non-string
    value, an unknown role...), each naming the first record in full (with its turn or message) and the
    others by index; a record's first problem only is reported. Inputs that do not fit the format (a
    template for chat records, ``lang`` for non-OASST records, a malformed template) are reported alone.
    """
    result, seen = NormalisedPairs(), set()
    if data_format not in DATA_FORMATS:
        result.problems.append(f"data_format={data_format!r} ({flag('data_format')}): must be one of "
                               f"{list(DATA_FORMATS)}; the default is 'auto'.")
        return result
    result.data_format = (detected_format(raw_records[0] if raw_records else {}, input_text_key, output_text_key)
                          if data_format == "auto" else data_format)
    result.problems = _setting_problems(data_path, data_format, result.data_format, input_text_key, output_text_key,
                                        prompt_template, lang)
    fields = []
    if prompt_template is not None and not result.problems:
        fields, result.problems = _template_fields(prompt_template, data_path)
    if result.problems:
        return result
    if result.data_format in _CHAT_FORMATS:
        _chat_pairs(raw_records, data_path, result, seen, category_key)
    elif result.data_format == "oasst":
        _oasst_pairs(raw_records, data_path, result, seen, category_key, lang)
    else:
        _question_answer_pairs(raw_records, data_path, result, seen, category_key, input_text_key, output_text_key,
                               prompt_template, fields)
    if not result.pairs and not result.problems:
        check = "." if result.data_format in _CHAT_FORMAT_NAMES else ", or check input_text_key/output_text_key."
        result.problems.append(
            f"{data_path}: no record has both a question and an answer ({len(result.empty) + len(result.unanswered)} "
            f"of {len(raw_records)} have an empty, whitespace-only or null one); fill them in{check}"
        )
    return result
