"""Disk space: the bytes a run will write (the estimate the preflight compares with the free space of
``output_dir``), the free space of a path's filesystem, and a full disk told apart from other write errors
and reported as one line (``NoSpaceLeft``: the file, the bytes it needed, the bytes free). Imports nothing of
the package."""

import errno
import math
import shutil
from pathlib import Path
from typing import Callable, Optional

#: Bytes a trained weight takes on disk: the run trains fp32 weights (``modeling.base_model`` loads the model
#: in fp32; LoRA weights take their base layer's dtype, and PEFT's ``prepare_model_for_kbit_training`` keeps
#: them fp32 on a 4-bit base too), and saves them as they are.
WEIGHT_BYTES = 4
#: Bytes of optimizer state a checkpoint holds per trained weight: AdamW's ``exp_avg`` and ``exp_avg_sq``
#: (the Trainer's default ``adamw_torch``), each of the weight's dtype, fp32.
OPTIMIZER_BYTES = 8
#: Bits per weight of llama.cpp's GGUF tensor types: ggml's block sizes (``ggml-common.h``: ``block_q8_0``
#: 34 bytes per 32 weights, ``block_q6_K`` 210 per 256, ``block_q5_K`` 176 per 256, ``block_q4_K`` 144 per
#: 256, ``block_q4_0`` 18 per 32). A lower bound for a whole file: the ``_m`` mixes keep some tensors in a
#: larger type, and k-quants fall back to one where a row is not a multiple of 256 weights.
GGUF_BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.5, "q4_k_m": 4.5,
                        "q4_0": 4.5}

#: What the messages of a full disk say, whatever raised them: Python's ``OSError`` (``[Errno 28]``), Rust's
#: ``io::Error`` (safetensors, tokenizers: ``(os error 28)``) and the C library's text.
_NO_SPACE_SIGNS = ("[Errno 28]", "(os error 28)", "No space left on device")
#: What writers that report no errno say when a write fails: ``torch.save``'s C++ stream writer
#: (``inline_container.cc``: "unexpected pos ...", then "basic_ios::clear: iostream error"), llama.cpp's
#: quantizer (the same C++ stream error) and numpy's ``tofile`` in llama.cpp's GGUF converter ("N requested
#: and M written").
_SILENT_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed",
                          "requested and")


def human_bytes(count: int) -> str:
    """``count`` bytes with their decimal unit: ``"3.1 MB"``, ``"820 kB"``, ``"512 bytes"``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.{0 if unit == 'kB' else 1}f} {unit}"
    return f"{count} bytes"


def bytes_text(count: int) -> str:
    """``"3,145,728 bytes (3.1 MB)"``: the exact count, then ``human_bytes``."""
    return f"{count:,} bytes" + (f" ({human_bytes(count)})" if count >= 1000 else "")


def existing_ancestor(path) -> Path:
    """``path`` when it exists, else its nearest existing parent (a directory a run would create lies on
    that parent's filesystem)."""
    path = Path(path).absolute()
    return next((candidate for candidate in (path, *path.parents) if candidate.exists()), Path("/"))


def free_bytes(path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``path`` (or its nearest
    existing parent): ``shutil.disk_usage(...).free``, statvfs's ``f_bavail`` blocks."""
    return shutil.disk_usage(existing_ancestor(path)).free


def _chain(error: BaseException) -> list:
    links, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        links.append(error)
        error = error.__cause__ or error.__context__
    return links


def is_out_of_space(error: BaseException, path=None, needed: Optional[int] = None, silent_writer: bool = False) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a full disk: an ``OSError`` with errno
    ``ENOSPC``, or a message holding ``_NO_SPACE_SIGNS`` (safetensors raises ``SafetensorError`` and
    tokenizers a plain ``Exception``, both with Rust's "(os error 28)"); or, when ``path`` and ``needed``
    are given, a write error that names no cause (``torch.save``'s ``RuntimeError``, an ``OSError`` without
    errno; with ``silent_writer``, any ``Exception``: a writer whose errors never say why) while the
    filesystem of ``path`` has fewer than ``needed`` bytes free."""
    links = _chain(error)
    for link in links:
        if isinstance(link, NoSpaceLeft) or (isinstance(link, OSError) and link.errno == errno.ENOSPC):
            return True
        if any(sign in str(link) for sign in _NO_SPACE_SIGNS):
            return True
    if path is None or needed is None:
        return False
    silent = (silent_writer and isinstance(error, Exception)) or any(
        (isinstance(link, OSError) and link.errno is None)
        or (isinstance(link, RuntimeError) and any(sign in str(link) for sign in _SILENT_WRITE_FAILURES))
        for link in links)
    try:
        return silent and free_bytes(path) < needed
    except OSError:
        return False


class NoSpaceLeft(ValueError):
    """A write that failed for want of space: one line naming the file (``path``), what it is (``what``),
    the bytes it needed (``needed``, an estimate where the writer cannot know them in advance) and the bytes
    free on its filesystem afterwards (``free``: once what was half-written is removed), what was done about
    it (``done``), and how to run again once there is room (``rerun``, words to follow "run again", from
    their leading space or colon). A ``ValueError``, so the commands print it as their one ``error:``
    line."""

    def __init__(self, path, needed: int, free: int, what: str = "the file", done: str = "", rerun: str = ""):
        self.path, self.needed, self.free, self.what = str(path), int(needed), int(free), what
        self.done, self.rerun = done, rerun
        about = "" if what == "the file" else "about "
        #: The line without ``rerun``.
        self.head = (f"no space left on device writing {self.path}: {what} needs {about}{bytes_text(self.needed)}, "
                     f"and {bytes_text(self.free)} are free on its filesystem" + (f"; {done}" if done else ""))
        super().__init__(self.head + (f"; once there is room, run again{rerun}" if rerun else "") + ".")


def raise_if_out_of_space(error: BaseException, path, needed: int, what: str = "the file", done: str = "",
                          rerun: str = "", where=None, cleanup: Optional[Callable[[], None]] = None,
                          silent_writer: bool = False) -> None:
    """Runs ``cleanup`` (removing what was half-written), then raises ``error`` as a ``NoSpaceLeft`` naming
    ``path`` (with ``what``, ``needed``, ``done``, ``rerun``: see there) when it is a full disk; returns when
    it is not (the caller re-raises ``error``).

    A full disk is told (``is_out_of_space``) before ``cleanup``, on ``where``'s filesystem (default:
    ``path``'s), while the half-written file still fills it; the free bytes reported are read after, so they
    are what the write had. An ``error`` that already is a ``NoSpaceLeft`` is left as it is.
    ``silent_writer``: see ``is_out_of_space``.
    """
    where = path if where is None else where
    full = not isinstance(error, NoSpaceLeft) and is_out_of_space(error, where, needed, silent_writer)
    if cleanup is not None:
        cleanup()
    if full:
        try:
            free = free_bytes(where)
        except OSError:
            free = 0
        raise NoSpaceLeft(path, needed, free, what, done, rerun) from error


def newest_file(directory) -> Optional[Path]:
    """The file under ``directory`` modified last (the one being written when a write into the directory
    failed), or None when it holds none."""
    files = [path for path in Path(directory).rglob("*") if path.is_file()] if Path(directory).is_dir() else []
    return max(files, key=lambda path: path.stat().st_mtime_ns, default=None)


def tokenizer_bytes(tokenizer) -> int:
    """Bytes of the ``tokenizer.json`` that ``save_pretrained`` writes for a fast tokenizer (its backend's
    JSON, pretty-printed as saved); 0 for a tokenizer without one (its files are a few kB to a few MB)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return len(backend.to_str(pretty=True).encode("utf-8")) if backend is not None else 0


def checkpoints_saved(train_examples: int, examples_per_step: int, num_train_epochs: float, max_steps: int,
                      eval_steps: Optional[int]) -> int:
    """How many checkpoints the Trainer saves: one per evaluation (``save_steps`` = ``eval_steps``, or once
    per epoch) and one at the last step.

    Optimizer steps = ``max_steps`` when > 0, else ceil(``num_train_epochs`` x steps per epoch), with steps
    per epoch = ceil(``train_examples`` / ``examples_per_step``) (batch x gradient accumulation x processes).
    Saves = ceil(steps / ``eval_steps``), or ceil(steps / steps per epoch) when evaluating once per epoch.
    Early stopping may end sooner (fewer saves).
    """
    per_epoch = max(1, math.ceil(train_examples / max(1, examples_per_step)))
    steps = max_steps if max_steps > 0 else math.ceil(num_train_epochs * per_epoch)
    return max(1, math.ceil(steps / (eval_steps or per_epoch)))


def training_run_bytes(trainable_parameters: int, tokenizer_bytes: int, page_bytes: int, saves: int,
                       checkpoints_kept: int) -> dict:
    """The bytes a training run writes under ``output_dir``, from its trained parameter count.

    With W = ``WEIGHT_BYTES`` x trainable parameters (the adapter's, or every weight for full fine-tuning)
    and T = ``tokenizer_bytes`` (saved beside every copy of the weights):

    - a checkpoint C = W + ``OPTIMIZER_BYTES`` x trainable parameters + T (its scheduler, RNG and trainer
      state are a few kB);
    - during training the Trainer writes a new checkpoint before deleting the oldest beyond
      ``checkpoints_kept`` (``save_total_limit``): min(``saves``, kept + 1) x C at the peak;
    - at the end, min(``saves``, kept) x C stay beside the saved adapter (W + T) and the report page
      (``page_bytes``: its inlined plotly.js); the predictions, metrics and Markdown report are a few kB per
      hold-out question and left out.

    :return: ``{"checkpoint", "checkpoints_at_peak", "adapter", "page", "total"}`` in bytes (checkpoints at the
        peak as a count); ``total`` is the larger of the peak and the end.
    """
    weights = WEIGHT_BYTES * trainable_parameters
    checkpoint = weights + OPTIMIZER_BYTES * trainable_parameters + tokenizer_bytes
    at_peak = min(saves, checkpoints_kept + 1)
    end = min(saves, checkpoints_kept) * checkpoint + weights + tokenizer_bytes + page_bytes
    return {"checkpoint": checkpoint, "checkpoints_at_peak": at_peak, "adapter": weights + tokenizer_bytes,
            "page": page_bytes, "total": max(at_peak * checkpoint, end)}


def export_bytes(total_parameters: int, tokenizer_bytes: int, page_bytes: int, gguf: bool,
                 quantizations: tuple = ()) -> dict:
    """The bytes ``philo-dataflow export`` writes: the merged model in fp32 (``WEIGHT_BYTES`` x every
    parameter, tied ones once, + ``tokenizer_bytes``), unless ``gguf`` is False the f32 GGUF copy and each
    quantized copy (``GGUF_BITS_PER_WEIGHT`` / 8 x parameters: lower bounds, their vocabulary left out), and
    the report page (``page_bytes``).

    :return: ``{"merged", "gguf", "quantized": {type: bytes}, "page", "total"}`` in bytes.
    """
    merged = WEIGHT_BYTES * total_parameters + tokenizer_bytes
    copies = {kind: math.ceil(GGUF_BITS_PER_WEIGHT[kind] / 8 * total_parameters)
              for kind in ("f32", *quantizations) if gguf and kind in GGUF_BITS_PER_WEIGHT}
    gguf_bytes = copies.pop("f32", 0)
    return {"merged": merged, "gguf": gguf_bytes, "quantized": copies, "page": page_bytes,
            "total": merged + gguf_bytes + sum(copies.values()) + page_bytes}


def full_disk_line(error: BaseException, output_dir: str, kept: list, flag: str = "--output-dir",
                   rerun: str = "") -> str:
    """The one line a command prints for a full disk met while writing under ``output_dir``: ``error``'s own
    (a ``NoSpaceLeft``'s names the file and the bytes; for a writer that did not say, the file the error
    names, or the directory, and its free bytes), then the complete outputs ``kept`` (paths under
    ``output_dir``) and what to do: free space or choose another ``flag``, and run again (``error``'s
    ``rerun``, else ``rerun``: words to follow "run again", see ``NoSpaceLeft``)."""
    if isinstance(error, NoSpaceLeft):
        line, rerun = error.head, error.rerun or rerun
    else:
        filename = next((link.filename for link in _chain(error) if getattr(link, "filename", None)), None)
        try:
            free = bytes_text(free_bytes(filename or output_dir))
        except OSError:
            free = "no bytes"
        line = f"no space left on device writing {filename or f'under {output_dir}'}: {free} are free on its filesystem"
    if kept:
        line += f"; complete and kept in {output_dir}: {', '.join(str(Path(path).relative_to(output_dir)) for path in kept)}"
    return f"{line}; free space there, or give {flag} on a larger filesystem, then run again{rerun}."
