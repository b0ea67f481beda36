"""Hamilton's cache for the dataflow (``driver.Builder().with_cache``, https://hamilton.apache.org/concepts/caching/):
the fingerprints of the values Hamilton cannot version itself, and a result store that keeps data, not models.

Hamilton keys a node's cached result by its code and the *data versions* (fingerprints) of its inputs. Its
default fingerprint of an object it does not know hashes ``__dict__``, which for a torch module sees the
structure but not the weights; registered here instead:

- ``torch.Tensor`` and ``torch.nn.Module``: SHA-256 of every state-dict tensor's bytes, dtype and shape, the
  module's class, its ``config`` and PEFT config, and which parameters train.
- ``datasets.Dataset``: its Arrow table (and index mapping), features and format.
- tokenizers: class, ``repr`` (vocabulary size, special and added tokens, padding side), the fast tokenizer's
  serialised model and the chat template.
- ``transformers.Trainer``: its model, arguments (less ``output_dir``: where checkpoints go does not change what
  is learnt), data sets, collator, callbacks and scalar settings. A re-run in another output directory
  therefore reuses the trained weights.
- ``torch.device`` and classes: their names.

``DataResultStore`` stores pickled results like Hamilton's ``FileResultStore``, but never writes a value that
holds a model, a Trainer or a tokenizer, nor one pickle cannot write (a client holding locks or sockets): such
nodes run again, from cached inputs, in seconds. It writes each file atomically, and turns an unreadable entry into a recomputation (``ResultRetrievalError``) instead of a failure.

``InterruptsPassTheCache`` lets an interrupt (Ctrl-C, a stop signal's ``lib.stopping.StopRequested``) leave a
node of a cached run as it was raised.
"""

import functools
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset
from hamilton.caching import fingerprinting
from hamilton.lifecycle import NodeExecutionHook
from hamilton.caching.stores.base import ResultRetrievalError, StoredResult
from hamilton.caching.stores.file import FileResultStore
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

#: Types a cached result never holds: rebuilding them is cheap, pickling them is not (or impossible).
UNSTORED_TYPES = (torch.nn.Module, Trainer, PreTrainedTokenizerBase)


def _digest(*chunks) -> str:
    hasher = hashlib.sha256()  # SHA-NI makes it about twice SHA-256's speed on x86
    for chunk in chunks:
        hasher.update(chunk if isinstance(chunk, (bytes, memoryview)) else str(chunk).encode("utf-8"))
    return hasher.hexdigest()


def _tensor_chunks(tensor: torch.Tensor):
    tensor = tensor.detach()
    yield f"{tensor.dtype}{tuple(tensor.shape)}"
    if tensor.numel():
        yield memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


@fingerprinting.hash_value.register(torch.Tensor)
def hash_tensor(obj: torch.Tensor, *args, **kwargs) -> str:
    """SHA-256 of the tensor's dtype, shape and bytes."""
    return _digest(*_tensor_chunks(obj))


#: Each module's last digest, with the identities and in-place version counters of its tensors then.
_MODULE_DIGESTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _sorted_sets(value: Any) -> Any:
    """``value`` with every set (at any depth of dicts, lists and tuples) as a sorted list."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, dict):
        return {key: _sorted_sets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sorted_sets(item) for item in value]
    return value


def _peft_description(peft_config: dict) -> str:
    """The adapters' PEFT configs as text that is the same in every process: ``repr`` of a config prints
    its ``target_modules`` set, whose order follows the per-process string hash seed (``PYTHONHASHSEED``),
    so a second run of the same inputs would miss the cache."""
    return json.dumps({name: _sorted_sets(config.to_dict()) for name, config in peft_config.items()},
                      sort_keys=True, default=str)


@fingerprinting.hash_value.register(torch.nn.Module)
def hash_module(obj: torch.nn.Module, *args, **kwargs) -> str:
    """SHA-256 of a module's weights and buffers (each name, dtype, shape and bytes), its class, its
    ``config``, its PEFT config, its mode and the names of the parameters that train. Remembered per module
    while none of its tensors is replaced or changed in place (torch's ``Tensor._version`` counter: an
    optimizer step or ``load_state_dict`` moves it), so one model seen by several nodes is hashed once."""
    state = obj.state_dict(keep_vars=True)
    config = getattr(obj, "config", None)
    peft_config = getattr(obj, "peft_config", None)
    described = (type(obj).__qualname__, config.to_json_string() if hasattr(config, "to_json_string") else "",
                 _peft_description(peft_config) if peft_config else "", obj.training,
                 ",".join(name for name, parameter in obj.named_parameters() if parameter.requires_grad))
    versions = (described, tuple((name, id(tensor), tensor._version) for name, tensor in state.items()))
    remembered = _MODULE_DIGESTS.get(obj)
    if remembered is not None and remembered[0] == versions:
        return remembered[1]
    chunks = list(described)
    for name, tensor in state.items():
        chunks.append(name)
        chunks.extend(_tensor_chunks(tensor))
    digest = _digest(*chunks)
    _MODULE_DIGESTS[obj] = (versions, digest)
    return digest


@fingerprinting.hash_value.register(Dataset)
def hash_dataset(obj: Dataset, *args, **kwargs) -> str:
    """SHA-256 of the data set's Arrow table (and index mapping, after ``select`` or ``shuffle``) in IPC
    form, its features and its format."""
    import pyarrow as pa

    chunks = [repr(obj.features), repr(obj.format)]
    for table in (obj.data.table, obj._indices.table if obj._indices is not None else None):
        if table is None:
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        chunks.append(memoryview(sink.getvalue()))
    return _digest(*chunks)


@fingerprinting.hash_value.register(PreTrainedTokenizerBase)
def hash_tokenizer(obj: PreTrainedTokenizerBase, *args, **kwargs) -> str:
    """SHA-256 of the tokenizer's class and ``repr`` less its ``name_or_path`` (vocabulary size, special and
    added tokens, padding and truncation sides), its fast model (``backend_tokenizer.to_str()``) or vocabulary, and its chat
    template."""
    backend = getattr(obj, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else repr(sorted(obj.get_vocab().items()))
    described = repr(obj).replace(repr(obj.name_or_path), "''")  # where it was loaded from is not what it is
    return _digest(type(obj).__qualname__, described, model, obj.chat_template or "")


@fingerprinting.hash_value.register(TrainingArguments)
def hash_training_arguments(obj: TrainingArguments, *args, **kwargs) -> str:
    """Hash of every argument (``to_dict()``)."""
    return fingerprinting.hash_value(obj.to_dict())


def _scalars(obj: Any) -> dict:
    return {key: value for key, value in vars(obj).items()
            if isinstance(value, (bool, int, float, str, type(None))) and not key.startswith("__")}


@fingerprinting.hash_value.register(Trainer)
def hash_trainer(obj: Trainer, *args, **kwargs) -> str:
    """Hash of what a Trainer learns from: its class, model, arguments less ``output_dir``, training and
    evaluation sets, data collator, the callbacks (class and settings, less TensorBoard's ``logging_dir``)
    and its own scalar settings (e.g. ``compile_decoder_layers``)."""
    arguments = {key: value for key, value in obj.args.to_dict().items() if key not in ("output_dir", "logging_dir")}
    collator = obj.data_collator
    parts = {
        "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "model": hash_module(obj.model),
        "args": fingerprinting.hash_value(arguments),
        "train_dataset": fingerprinting.hash_value(obj.train_dataset),
        "eval_dataset": fingerprinting.hash_value(obj.eval_dataset),
        "processing_class": fingerprinting.hash_value(obj.processing_class),
        "collator": [type(collator).__qualname__, fingerprinting.hash_value(_scalars(collator))],
        "callbacks": [[type(callback).__qualname__, fingerprinting.hash_value(
                          {key: value for key, value in _scalars(callback).items() if key != "logging_dir"})]
                      for callback in obj.callback_handler.callbacks],
        "settings": fingerprinting.hash_value(_scalars(obj)),
    }
    return fingerprinting.hash_value(parts)


@fingerprinting.hash_value.register(torch.device)
def hash_device(obj: torch.device, *args, **kwargs) -> str:
    return fingerprinting.hash_primitive(str(obj))


@fingerprinting.hash_value.register(type)
def hash_class(obj: type, *args, **kwargs) -> str:
    return fingerprinting.hash_primitive(f"{obj.__module__}.{obj.__qualname__}")


def holds_unstored(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is, or holds within dicts, lists and tuples (three levels deep), one of
    ``UNSTORED_TYPES``."""
    if isinstance(value, UNSTORED_TYPES):
        return True
    if depth >= 3:
        return False
    if isinstance(value, dict):
        return any(holds_unstored(item, depth + 1) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_unstored(item, depth + 1) for item in value[:16])
    return False


class DataResultStore(FileResultStore):
    """Hamilton's ``FileResultStore`` (one pickle file per data version under ``path``), except that:
    a value holding a model, Trainer or tokenizer (``holds_unstored``), or one that pickle cannot write (an
    HTTP client's locks), is not written, so its node runs again next time (Hamilton logs a missing result); each file is written to a temporary name and renamed,
    so an interrupted run leaves no partial file; an entry that cannot be read back (truncated, corrupt,
    written by an incompatible library) raises ``ResultRetrievalError``, on which Hamilton deletes it and
    recomputes the node."""

    def set(self, data_version: str, result: Any, saver_cls=None, loader_cls=None) -> None:
        if saver_cls is None and holds_unstored(result):
            return
        if saver_cls is not None:
            return super().set(data_version, result, saver_cls, loader_cls)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            payload = StoredResult.new(value=result).save()
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError):
            return  # not picklable (an OpenAI client's locks...): the node runs again next time
        descriptor, temporary = tempfile.mkstemp(prefix=".partial-", dir=self.path)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(payload)
            os.replace(temporary, self._path_from_data_version(data_version))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, data_version: str) -> Optional[Any]:
        try:
            return super().get(data_version)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
                ValueError, io.UnsupportedOperation) as error:
            raise ResultRetrievalError(f"cached result {data_version} cannot be read back ({error})") from error


class InterruptsPassTheCache(NodeExecutionHook):
    """A lifecycle adapter, given to the driver before the cache's, that lets a ``KeyboardInterrupt`` (and so
    ``lib.stopping.StopRequested``) leave a node as it was raised. Hamilton (1.90,
    ``execution.graph_functions.execute_lifecycle_for_node``) counts a node successful unless it raised an
    ``Exception``, so after an interrupt it calls the cache adapter's ``post_node_execute`` as for a result;
    that asserts the node's data version, and its ``AssertionError`` took the interrupt's place (a
    traceback instead of the stop). This hook runs first and raises the interrupt in flight again, so the
    cache stores nothing for the node."""

    def run_before_node_execution(self, **future_kwargs: Any) -> None:
        pass

    def run_after_node_execution(self, **future_kwargs: Any) -> None:
        interrupt = sys.exc_info()[1]  # in Hamilton's ``finally``, the exception under way
        if isinstance(interrupt, KeyboardInterrupt):
            raise interrupt


@functools.cache
def code_fingerprint() -> str:
    """A short SHA-256 of the package's source files and of the versions of the libraries its results
    depend on: the cache lives in a sub-directory named by it, so an edited or upgraded library (whose
    helper functions Hamilton's per-node code versions do not see) never reuses another's results. Taken
    once per process: the code a process runs is the code it imported."""
    import accelerate
    import datasets
    import hamilton.version
    import peft
    import transformers

    package = Path(__file__).resolve().parent.parent
    chunks = [torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__,
              datasets.__version__, ".".join(map(str, hamilton.version.VERSION))]
    for source in sorted(package.rglob("*.py")):
        chunks += [str(source.relative_to(package)), source.read_bytes()]
    return _digest(*chunks)[:16]


def cache_path(cache_dir: str) -> Path:
    """The directory of this code's cache within ``cache_dir`` (``<cache_dir>/<code_fingerprint()>``)."""
    return Path(os.path.expanduser(cache_dir)) / code_fingerprint()
