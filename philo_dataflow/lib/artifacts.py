"""What a run writes and where: the file names under ``output_dir`` and in an adapter directory, the one
reader of an adapter's manifest, atomic writing (by the main process only, when several run), and what a
run left complete. Imports ``distributed``, ``disk_space`` and ``stopping`` only."""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from .disk_space import raise_if_out_of_space
from .distributed import is_main_process
from .stopping import stop_held

# Files and directories under ``output_dir``.
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
#: The Trainer writes this file last into a checkpoint (after the weights, optimizer, scheduler and RNG
#: states); a checkpoint without a readable one was cut off while being saved.
TRAINER_STATE_FILE = "trainer_state.json"
PREDICTIONS_JSONL_FILE = "hold_out_predictions.jsonl"
PREDICTIONS_CSV_FILE = "hold_out_predictions.csv"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
#: One self-contained page: figures, tables and every hold-out answer (``report.report_html``).
REPORT_HTML_FILE = "report.html"
JUDGMENTS_FILE = "judgments.jsonl"
JUDGE_CACHE_DIR = "judge_cache"
DATAFLOW_FILE = "dataflow.png"
#: The resolved configuration of a ``philo-dataflow`` run; ``philo-dataflow --config`` takes it back.
CONFIG_FILE = "config.yaml"
#: Files that mark an output directory as holding a finished run.
PREVIOUS_RUN_FILES = (ADAPTER_DIR, METRICS_FILE, PREDICTIONS_JSONL_FILE)
#: What ``philo-dataflow export`` writes: the merged model (a plain transformers directory), and beside its weights
#: the GGUF copy, its Ollama Modelfile and the report of both checks.
MERGED_DIR = "merged"
GGUF_FILE = "model.gguf"
MODELFILE_FILE = "Modelfile"
EXPORT_REPORT_FILE = "export_report.json"
EXPORT_REPORT_MARKDOWN_FILE = "export_report.md"
#: GGUF tensor type of the export. f32: the merged model is fp32, so the GGUF holds the very same weights
#: and any disagreement measured against it is the conversion's or llama.cpp's, not rounding's (an f16
#: copy is half the size, 270 MB instead of 540 MB for SmolLM2-135M, and can flip near-tied greedy
#: tokens). Quantise the f32 file afterwards (``ollama create --quantize q4_K_M``, ``llama-quantize``).
GGUF_OUTTYPE = "f32"
#: GGUF quantization types ``philo-dataflow export --quantize`` makes (llama.cpp's names, lower case), each
#: llama.cpp's ``LLAMA_FTYPE_MOSTLY_*`` file type; k-quants fall back per tensor where a row is not a
#: multiple of 256 values (llama.cpp's own rule).
QUANTIZATION_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
#: Hold-out questions the GGUF copy re-answers by default (``philo-dataflow export --gguf-questions``).
GGUF_CHECKED_QUESTIONS = 5
#: Files ``philo-dataflow compare`` writes to its output directory; ``COMPARISON_FILE`` marks a finished
#: comparison.
COMPARISON_FILE = "comparison.json"
COMPARISON_ANSWERS_FILE = "answers.jsonl"
COMPARISON_REPORT_FILE = "report.html"
COMPARISON_FILES = (COMPARISON_FILE, COMPARISON_ANSWERS_FILE, COMPARISON_REPORT_FILE)

# Files in an adapter directory (``<output_dir>/adapter``).
#: Records how the adapter was made (``saving.run_manifest``).
MANIFEST_FILE = "philo_dataflow_manifest.json"
#: The Trainer's log history (train and validation loss by step).
LOG_HISTORY_FILE = "training_log_history.json"
#: PEFT's configuration and weights of a saved adapter.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
#: Files of which a model or adapter directory that holds a tokenizer has at least one.
#: The model card beside a saved adapter or model (the Hugging Face hub's name for it).
MODEL_CARD_FILE = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: The inputs a manifest records (``manifest["inputs"]``); a presaved run takes them from there unless given.
MANIFEST_INPUTS = (
    "model_id", "data_path", "input_text_key", "output_text_key", "category_key", "data_format", "lang",
    "max_seq_length", "overlong_policy", "max_new_tokens", "seed", "validation_fraction", "hold_out_fraction",
    "near_duplicate_threshold", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
    "no_repeat_ngram_size",
)

#: Read once: ``os.umask`` can only be read by setting it, which is not thread-safe (judge threads write).
UMASK = os.umask(0o022)
os.umask(UMASK)
_VERSIONED = ("philo_dataflow", "torch", "transformers", "peft", "datasets", "apache-hamilton", "rouge_score")


def library_versions() -> dict:
    """Installed versions of the libraries that decide a run's numbers (None where one is missing)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_of_file(path: str) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_metadata(path: str) -> dict:
    """What a data loader or saver reports of a file it read or wrote, as Hamilton's loader and saver metadata
    (shown by the Hamilton UI): ``{"path", "bytes", "sha256", "file_metadata"}``, the last in Hamilton's own schema
    (``hamilton.io.utils.get_file_metadata``: size, path, modification time). ``bytes`` and ``sha256`` are
    None where the file is absent (a presaved run without a log history; the other processes of a
    multi-process run, which write nothing)."""
    from hamilton.io.utils import get_file_metadata

    present = os.path.isfile(path)
    return {"path": str(path), "bytes": os.path.getsize(path) if present else None,
            "sha256": sha256_of_file(path) if present else None, **get_file_metadata(str(path))}


def saved_directory_metadata(path: str) -> dict:
    """What a saver reports of a directory it wrote: ``{"path", "bytes", "file_bytes": {name: bytes}}``
    (files at its top level; ``bytes`` their sum), ``file_bytes`` empty where it is absent."""
    directory = Path(path)
    sizes = {entry.name: entry.stat().st_size for entry in sorted(directory.iterdir()) if entry.is_file()} \
        if directory.is_dir() else {}
    return {"path": str(path), "bytes": sum(sizes.values()), "file_bytes": sizes}


def write_text_atomically(path: Path, text: str) -> str:
    """Writes ``text`` to ``path`` through a temporary file in the same directory and a rename, so
    ``path`` holds either its previous content or all of ``text``, never part of it (a full disk or a
    crash mid-write leaves the previous file and no temporary file). The file gets the usual
    permissions (0666 minus the umask), not ``mkstemp``'s owner-only 0600. With several processes
    (torchrun, accelerate launch) only the main one writes; the others write nothing and return the
    same path. A stop signal that comes meanwhile waits for the rename (``lib.stopping.stop_held``).

    :return: ``str(path)``.
    :raises lib.disk_space.NoSpaceLeft: (a ValueError) the disk is full; the line names ``path``, the bytes of
        ``text`` and the bytes free.
    :raises lib.stopping.StopRequested: a stop signal came while writing (after ``path`` is written).
    """
    if not is_main_process():
        return str(path)
    with stop_held():
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.chmod(temporary, 0o666 & ~UMASK)
            os.replace(temporary, path)
        except BaseException as error:
            raise_if_out_of_space(error, path, len(text.encode("utf-8")),
                                  cleanup=lambda: Path(temporary).unlink(missing_ok=True))
            Path(temporary).unlink(missing_ok=True)
            raise
    return str(path)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether the Trainer checkpoint directory ``path`` was saved whole: its ``TRAINER_STATE_FILE``, written
    last, is there and reads as JSON."""
    try:
        json.loads((Path(path) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def complete_checkpoints(checkpoints_dir) -> list:
    """The complete Trainer checkpoints (``checkpoint-N``, ``is_complete_checkpoint``) in ``checkpoints_dir``,
    oldest step first ([] when it is missing)."""
    found = [path for path in Path(checkpoints_dir).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", path.name) and is_complete_checkpoint(path)]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def completed_outputs(output_dir: str, since: float) -> list:
    """What a run that began at ``since`` (a ``time.time()``) left complete in ``output_dir``: the entries
    written since then (every file is renamed into place whole, every saved directory swapped in whole;
    a second's margin, as file systems stamp times coarsely), hidden temporary ones left out, with the
    checkpoints directory given as its complete checkpoints.

    :return: paths, sorted (``[]`` when the directory is missing).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    kept = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.stat().st_mtime < since - 1:
            continue
        if entry.name == CHECKPOINTS_DIR and entry.is_dir():
            kept += [str(path) for path in complete_checkpoints(entry)]
        else:
            kept.append(str(entry))
    return kept


def read_manifest(presaved_model_dir: str) -> dict:
    """The manifest a base run saved beside its adapter (``MANIFEST_FILE``).

    :raises ValueError: it is missing, not JSON, or lacks ``inputs.model_id`` or ``prompt_format``; the
        message names the directory and what to do.
    """
    path = Path(presaved_model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(
            f"presaved_model_dir={presaved_model_dir!r} holds no {MANIFEST_FILE}; give the 'adapter' "
            "directory written by save_best_models."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"presaved_model_dir={presaved_model_dir!r}: {MANIFEST_FILE} cannot be read as JSON "
            f"({str(error).splitlines()[0][:120]}); copy the adapter directory again or re-run the base run."
        ) from None
    inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
    if not isinstance(inputs, dict) or not isinstance(inputs.get("model_id"), str) or "prompt_format" not in manifest:
        raise ValueError(
            f"presaved_model_dir={presaved_model_dir!r}: {MANIFEST_FILE} lacks inputs.model_id or prompt_format; "
            "give the 'adapter' directory written by save_best_models."
        )
    return manifest


def output_dir_error(error: OSError, place: Path, where: str) -> str:
    """One line for an ``OSError`` met creating or writing an output directory: ``where`` (the directory and its
    flag, e.g. ``"--output-dir /proc/out"``), what the filesystem said of ``place`` (the directory it was
    created or written in), and what to do, by ``error.errno``."""
    code = error.errno
    if code in (errno.EACCES, errno.EPERM):
        return (f"{where}: cannot be created or written in {place} (permission denied); choose a directory you can "
                "write to.")
    if code == errno.EROFS:
        return f"{where}: {place} is on a read-only filesystem; give a directory on a writable disk."
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{where}: {place} is a file, not a directory; give a directory path."
    if code == errno.ENOENT:
        return (f"{where}: cannot be created in {place}, which takes no new directories (a virtual filesystem such "
                "as /proc or /sys); give a directory on a disk you can write to.")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on the disk of {place}; free some space or give a directory on another disk."
    if code == errno.ENAMETOOLONG:
        return f"{where}: the path is too long for the filesystem; give a shorter one."
    reason = error.strerror or type(error).__name__
    return f"{where}: cannot be created or written in {place} ({reason}); give another directory."


def output_dir_write_problem(output_dir: str, where: str) -> Optional[str]:
    """Why ``output_dir`` cannot be created, or written when it exists, found by making and removing an empty
    directory in it (or in its nearest existing parent): permission bits say nothing to root, nor of a
    read-only or virtual filesystem (``/proc``). Leaves nothing behind; ``output_dir_error``'s line, or None."""
    path = Path(output_dir).absolute()
    place = path if path.exists() else next((parent for parent in path.parents if parent.exists()), Path(path.anchor))
    if not place.is_dir():
        return output_dir_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), place, where)
    try:
        probe = tempfile.mkdtemp(prefix=".philo_dataflow-probe-", dir=place)
    except OSError as error:
        return output_dir_error(error, place, where)
    os.rmdir(probe)
    return None


def output_dir_lock_holder(output_dir: str) -> Optional[str]:
    """Who holds ``output_dir_lock`` on ``output_dir``: ``"pid N: command line"`` read from the kernel's lock
    table (``/proc/locks``, Linux) and ``/proc/N/cmdline``; None when nobody does (or it cannot be told)."""
    try:
        info = os.stat(output_dir)
        wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
        with open("/proc/locks", encoding="utf-8") as table:
            pids = [fields[4] for fields in map(str.split, table) if len(fields) > 5 and fields[1] == "FLOCK"
                    and fields[5] == wanted]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                arguments = handle.read().decode("utf-8", errors="replace").split("\0")
        except OSError:
            continue
        command = " ".join(" ".join([Path(arguments[0]).name, *arguments[1:]]).split())  # one line
        return f"pid {pid}: {command[:300]}"
    return None


@contextlib.contextmanager
def output_dir_lock(output_dir: str, flag: str = "--output-dir"):
    """Holds an exclusive OS-level lock (``fcntl.flock`` on the directory itself, created if need be) on
    ``output_dir`` for the ``with`` block, so that two runs never write one directory. The kernel releases
    the lock when its process ends, killed or not: no lock file is written, so none is ever stale.

    :raises ValueError: another process holds the lock (one line naming ``flag`` and the holder,
        ``output_dir_lock_holder``); the directory cannot be created or opened (``output_dir_error``'s line).
    """
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        descriptor = os.open(output_dir, os.O_RDONLY)
    except OSError as error:
        failed = Path(error.filename) if error.filename else Path(output_dir)
        place = failed if error.errno == errno.EEXIST else failed.parent  # EEXIST: a file stands there
        raise ValueError(output_dir_error(error, place, f"{flag} {output_dir}")) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        holder = output_dir_lock_holder(output_dir) or "another process"
        raise ValueError(f"{flag} {output_dir}: another run is writing there ({holder}); wait for it to end, or "
                         f"give another {flag}.") from None
    try:
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)
