"""The models ``philo-dataflow compare`` scores, of any trainer: what each given path is, the base model they are
compared with, and each model's answers to a hold-out set.

Kinds (``KINDS``), told apart by their files:

- ``run``: a run of ours (its ``output_dir`` or ``adapter`` directory, holding the manifest); it answers
  through the ``presaved`` dataflow (``comparison.model_answers``) with the prompt format it was trained with;
- ``adapter``: a PEFT adapter directory saved by any trainer (TRL, Unsloth, Axolotl, LLaMA-Factory...),
  ``adapter_config.json`` and weights; its base is ``--base`` or the config's ``base_model_name_or_path``;
- ``model``: a full (or merged) model directory written by ``save_pretrained``, or a hub id found in the
  local Hugging Face cache (nothing is downloaded);
- ``gguf``: a GGUF file, answered by llama.cpp (``lib.gguf_export.gguf_answers``) with the chat template
  embedded in it.

The ``adapter`` and ``model`` kinds answer through the ``base`` dataflow: its ``base_model``, ``tokenizer``
and ``prompt_format`` nodes load the model and pick its prompt format (its own chat template, or the given
``prompt_template``), and ``finetuned_model_hold_out_generations`` / ``base_model_hold_out_generations``
answer, as the main job answers its hold-out set. Library code, not a stage module.
"""

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoTokenizer

from .dataflow import build_driver, resolved_config
from .lib.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_DIR, MANIFEST_FILE, TOKENIZER_FILES, read_manifest
from .lib.gguf_export import gguf_answers, is_gguf_file, llama_cpp_missing
from .lib.model_sources import (
    adapter_files,
    adapter_fit_problems,
    model_source_problems,
    resolve_model_path,
)
from .lib.trainer import ready_for_generation

logger = logging.getLogger(__name__)

#: The kinds of model ``compare`` takes (see the module docstring).
KINDS = ("run", "adapter", "model", "gguf")
#: How a transformers model's answers are made, as ``comparison.json`` records it (GGUF files: llama.cpp's).
TRANSFORMERS_DECODING = "transformers generate"
#: What ``compare`` accepts, for its messages.
ACCEPTED = ("a run's output_dir, a PEFT adapter directory, a model directory, a hub id in the local cache "
            "or a .gguf file")


@dataclass(frozen=True)
class Run:
    """A finished run: its ``output_dir`` (``run_dir``), its adapter directory, and the adapter's manifest."""

    run_dir: Path
    adapter_dir: Path
    manifest: dict

    @property
    def base_model_id(self) -> str:
        return self.manifest["inputs"]["model_id"]


def run_of(path: str) -> Run:
    """The run at ``path``: a run's ``output_dir`` or its ``adapter`` directory.

    :raises ValueError: one line naming ``path``: no such directory, no manifest, an unreadable one.
    """
    given = Path(path)
    if not given.is_dir():
        raise ValueError(f"{path}: no such directory; give a run's output_dir (or its {ADAPTER_DIR} directory).")
    if (given / ADAPTER_DIR / MANIFEST_FILE).is_file():
        run_dir, adapter_dir = given, given / ADAPTER_DIR
    elif (given / MANIFEST_FILE).is_file():
        run_dir, adapter_dir = given.parent, given
    else:
        raise ValueError(f"{path}: holds no {ADAPTER_DIR}/{MANIFEST_FILE}; give the output_dir of a finished run "
                         f"(or its {ADAPTER_DIR} directory).")
    try:
        manifest = read_manifest(str(adapter_dir))
    except ValueError as error:
        raise ValueError(f"{path}: {str(error).splitlines()[0]}") from None
    return Run(run_dir, adapter_dir, manifest)


@dataclass(frozen=True)
class Model:
    """A model to compare: the ``path`` (or hub id) as given, its ``kind`` (``KINDS``), the base model it was
    tuned from when its files say (``tuned_from``), and for a run of ours its ``comparison.Run``."""

    path: str
    kind: str
    tuned_from: Optional[str] = None
    run: Optional[Run] = None


def model_of(path: str) -> Model:
    """What ``path`` is (``KINDS``), from its files; nothing is loaded.

    :raises ValueError: one line naming ``path``: not there, a file that is not GGUF, a directory of none
        of the kinds, an unreadable manifest or ``adapter_config.json``, a hub id not in the local cache.
    """
    given = Path(path)
    if given.is_file():
        if not is_gguf_file(given):
            raise ValueError(f"{path}: is a file but not a GGUF file; give {ACCEPTED}.")
        missing = llama_cpp_missing()
        if missing:
            raise ValueError(f"{path}: a GGUF file is answered through llama.cpp, but {missing}")
        return Model(path, "gguf")
    if given.is_dir():
        if (given / MANIFEST_FILE).is_file() or (given / ADAPTER_DIR / MANIFEST_FILE).is_file():
            run = run_of(path)
            return Model(path, "run", run.base_model_id, run)
        if (given / ADAPTER_CONFIG_FILE).is_file():
            try:
                config = json.loads((given / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise ValueError(f"{path}: its {ADAPTER_CONFIG_FILE} cannot be read ({str(error).splitlines()[0][:120]}); "
                                 "copy the adapter directory again.") from None
            named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
            return Model(path, "adapter", named if isinstance(named, str) and named.strip() else None)
        if (given / "config.json").is_file():
            return Model(path, "model")
        raise ValueError(f"{path}: holds no {MANIFEST_FILE}, {ADAPTER_CONFIG_FILE} or config.json; give {ACCEPTED}.")
    if path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") != 1:
        raise ValueError(f"{path}: no such file or directory; give {ACCEPTED}.")
    problems = model_source_problems(path)
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    return Model(path, "model")


def same_model(a: str, b: str) -> bool:
    """Whether model ids ``a`` and ``b`` name the same model: equal, or local paths to one directory."""
    if a == b:
        return True
    try:
        return Path(resolve_model_path(a)).resolve() == Path(resolve_model_path(b)).resolve()
    except (OSError, ValueError):
        return False


def base_and_problems(models: list[Model], base: Optional[str]) -> tuple[Optional[str], list[str]]:
    """The base model the ``models`` are compared with, and what stops the comparison (one line each).

    The base is ``base`` (``--base``) when given, else the first model's ``tuned_from`` (a run's manifest
    ``model_id``, an adapter's ``base_model_name_or_path``). Refused: no base known; a base that cannot be
    loaded here (not found, or a hub id not in the local cache); a run or adapter tuned from another base
    than the one compared (``--base`` stands for every adapter's base, so only runs can differ then).
    """
    problems = []
    given = base is not None
    if base is None:
        first = next((m for m in models if m.tuned_from), None)
        if models and models[0].kind in ("model", "gguf") or first is None:
            named = models[0].path if models else "the model"
            return None, [f"{named}: its base model is not known; give --base MODEL (the model it was tuned from: "
                          "a model directory, a hub id in the local cache, or a run's base)."]
        base = first.tuned_from
    unavailable = model_source_problems(base)
    if unavailable:
        where = "--base" if given else f"{next(m.path for m in models if m.tuned_from == base)}: its base model"
        source = "" if given else f" (named in its {ADAPTER_CONFIG_FILE if models[0].kind == 'adapter' else MANIFEST_FILE})"
        problems.append(f"{where} {base!r}{source} cannot be loaded here ({unavailable[0]}); "
                        + ("give another --base." if given else "give it with --base MODEL."))
        return None, problems
    for model in models:
        if model.kind == "run" and not same_model(model.tuned_from, base):
            problems.append(f"{model.path} was trained on base model {model.tuned_from!r} but the base compared is "
                            f"{base!r}; compare models of one base model.")
        elif model.kind == "adapter" and not given and model.tuned_from and not same_model(model.tuned_from, base):
            problems.append(f"{model.path} was tuned from base model {model.tuned_from!r} ({ADAPTER_CONFIG_FILE}) but "
                            f"the base compared is {base!r}; compare models of one base model, or give --base.")
        elif model.kind == "adapter" and not given and not model.tuned_from:
            problems.append(f"{model.path}: its {ADAPTER_CONFIG_FILE} names no base_model_name_or_path; give --base MODEL.")
    return base, problems


def _tokenizer_of_adapter(adapter_dir: str):
    """The tokenizer a trainer saved beside its adapter (it may carry added tokens or another chat
    template than the base's), None when it saved none."""
    if not any((Path(adapter_dir) / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def hf_answers(model_id: str, adapter_dir: Optional[str], hold_out_set: Dataset, inputs: dict) -> tuple[list[dict], str]:
    """Answers of ``model_id`` (with the PEFT adapter in ``adapter_dir`` when given) to every ``hold_out_set``
    question, through the ``base`` dataflow: ``base_model``, ``tokenizer`` (the adapter's own when it has
    one) and ``prompt_format``, then ``finetuned_model_hold_out_generations`` (adapter) or
    ``base_model_hold_out_generations``.

    :param inputs: the dataflow inputs of answering: ``max_new_tokens``, ``generation_batch_size``, the
        decoding settings, and ``prompt_template`` when one is given.
    :return: ``(generations, prompt_format)``; a generation is ``lib.generation.generate_answers``' dict.
    :raises ValueError: a model that cannot be loaded; an adapter whose matrices do not fit the base.
    """
    driver = build_driver(resolved_config({"start": "base", "model_id": model_id}))
    inputs = {**inputs, "model_id": model_id}
    overrides = {}
    if adapter_dir is not None:
        problems, shapes = adapter_files(adapter_dir)
        if problems:
            raise ValueError("\n".join(p.replace(f"presaved_model_dir={adapter_dir!r}", adapter_dir) for p in problems))
        own = _tokenizer_of_adapter(adapter_dir)
        if own is not None:
            overrides["tokenizer"] = own
    loaded = driver.execute(["base_model", "tokenizer", "prompt_format"], inputs=inputs, overrides=overrides)
    model = loaded.pop("base_model")
    node, key = "base_model_hold_out_generations", "base_answer_model"
    if adapter_dir is not None:
        misfits = adapter_fit_problems(shapes, model, adapter_dir, model_id)
        if misfits:
            raise ValueError(misfits[0].replace(f"presaved_model_dir={adapter_dir!r}", adapter_dir)
                             .replace(f" (named in its {MANIFEST_FILE})", ""))
        model = PeftModel.from_pretrained(model, adapter_dir)
        node, key = "finetuned_model_hold_out_generations", "finetuned_model"
    overrides = {"hold_out_set": hold_out_set, key: ready_for_generation(model), **loaded}
    generations = driver.execute([node], inputs=inputs, overrides=overrides)[node]
    prompt_format = loaded["prompt_format"]
    del overrides, loaded, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return generations, prompt_format


def answers_of(model: Model, base: str, hold_out_set: Dataset, inputs: dict, seed: int) -> tuple[list[dict], dict]:
    """Answers of an ``adapter``, ``model`` or ``gguf`` ``model`` (runs: ``comparison.model_answers``) to every
    ``hold_out_set`` question, and how they were made.

    :param base: the compared base model (an adapter's base).
    :param inputs: see ``hf_answers``; a GGUF file takes ``max_new_tokens`` and whether a
        ``prompt_template`` rendered the questions.
    :return: ``(generations, answering)``; ``answering`` holds ``prompt_format`` and ``decoding``.
    """
    if model.kind == "gguf":
        generations, prompt_format = gguf_answers(
            model.path, list(hold_out_set["input_text"]), list(hold_out_set["context"]), inputs["max_new_tokens"],
            bool(inputs.get("prompt_template")), seed)
        return generations, {"prompt_format": prompt_format, "decoding": "llama.cpp greedy (no repeat penalty)"}
    adapter_dir = model.path if model.kind == "adapter" else None
    generations, prompt_format = hf_answers(base if adapter_dir else model.path, adapter_dir, hold_out_set, inputs)
    return generations, {"prompt_format": prompt_format, "decoding": TRANSFORMERS_DECODING}
