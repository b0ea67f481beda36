"""Preflight: every check of a run's inputs that can be made before a model is loaded, with all
problems reported at once.

``check_run_inputs(inputs, start)`` returns the problems; ``preflight(inputs, start)`` raises them as one
``InputProblems`` (a ``ValueError``) whose message has one line per problem, each naming the file,
record, key or input (with its ``philo-dataflow`` flag) and what to do. ``philo-dataflow`` calls it before it writes
anything; library users call it before ``dr.execute``::

    from philo_dataflow import preflight
    preflight.preflight({"data_path": "qa.jsonl", "output_dir": "outputs/x"}, start="base")

It reads the data file, the tokenizer and the config of the model, the headers of a presaved adapter's
safetensors file and, when a judge is configured, the judge endpoint's model list; it reads no model
weights and writes nothing. What the run derives from its inputs without weights (the prompt format, the
template in use, a presaved run's manifest and log history) it takes from the dataflow's own nodes, run
through a driver (``graph_values``), so a new ``@config.when`` variant needs no change here. What it checks, in order:

1. inputs in range (the rules of ``lib.inputs.INPUTS``, plus: the two split fractions sum to less than
   1; ``num_train_epochs`` > 0 unless ``max_steps`` > 0), and the package of every tracker ``report_to``
   names installed;
2. ``output_dir``: a directory, or one that can be created, writable, and not holding another run's
   files unless ``overwrite`` (or a resumed run) asks for it;
3. the data: readable UTF-8, valid for its suffix, keys present and holding strings (every bad record
   named, see ``lib.records``), every labelled category with ``splitting.MIN_CATEGORY_RECORDS`` records or
   more, no split left empty;
4. the model: the base model available (a local directory with config, safetensors weights and
   tokenizer, the local Hugging Face cache, or a reachable hub; ``lib.model_sources``), or the
   presaved adapter intact and made for its base model;
   LoRA target modules and layers present in the model; 4-bit loading possible; every conversation
   renderable in the prompt format; with ``overlong_policy="error"``, every prompt shorter than
   ``max_seq_length`` so that each example keeps at least one supervised answer token; the longest hold-out
   or validation prompt plus ``max_new_tokens`` within the model's context window (``lib.context_window``:
   its config's position limit, else its tokenizer's; ``max_seq_length`` above it is capped, not refused);
5. ``resume_from_checkpoint`` a complete checkpoint;
6. when every check before it passed: free space on ``output_dir``'s filesystem for what the run will
   write (``disk_space_problems``, from the model's weightless skeleton);
7. the LLM judge, when ``judge_model`` is set: one process only (not under torchrun or accelerate
   launch), settings valid, endpoint reachable (``GET /models``), the model listed there;
8. the Hamilton UI, when ``hamilton_ui_url`` is set: ``hamilton_sdk`` installed, the server answering
   (``lib.hamilton_ui.server_problems``).

The nodes of ``loading``, ``splitting``, ``tokenization``, ``modeling``, ``training`` and ``prediction``
raise the same messages for the inputs they take, so ``dr.execute`` without a preflight fails with a
``ValueError`` there too, only later: ``training_args`` and the generation nodes check the Trainer's and
generation's settings with ``lib.inputs.raise_hyperparameter_problems`` (a bad ``max_new_tokens`` is found
there only after training, by ``hold_out_prompt_ids`` and ``validation_prompt_ids`` for the context window too).
The output directory, the judge endpoint and the prompt lengths of every record at once are checked here only.
"""

import contextlib
import difflib
import functools
import inspect
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy
import openai
import torch

from .dataflow import build_driver, resolved_config
from .stages import modeling, splitting, training
from .lib.artifacts import PREVIOUS_RUN_FILES, output_dir_write_problem, read_manifest
from .lib.context_window import ContextWindow, GenerationPrompt, answer_room_problems, capped_max_seq_length
from .lib.disk_space import (
    bytes_text,
    checkpoints_saved,
    export_bytes,
    free_bytes,
    human_bytes,
    tokenizer_bytes,
    training_run_bytes,
)
from .lib.distributed import launched_processes
from .lib.inputs import (
    DEFAULTS,
    RULES,
    START_MODES,
    hyperparameter_problems,
    out_of_range,
    raise_hyperparameter_problems,
)
from .lib.hamilton_ui import server_problems as hamilton_ui_server_problems
from .lib.html_report import page_bytes
from .lib.judge_client import JudgeClient, is_loopback, make_judge_client
from .lib.judge_protocol import RESPONSE_FORMATS, check_judge_settings
from .lib.model_sources import (
    layer_indices,
    lora_target_problems,
    model_skeleton,
    model_source_problems,
    presaved_adapter_problems,
    quantization_problems,
    tokenizer_without_weights,
)
from .lib.problems import (
    InputProblems,
    Problem,
    capped_lines,
    flag,
    listed,
    problems_of,
)
from .lib.prompts import no_room_for_an_answer, prompt_token_ids, split_prompt_ids
from .lib.records import NormalisedPairs, normalised_pairs, read_records
from .lib.trackers import missing_tracker_problems
from .lib.trainer import checked_resume_checkpoint, torch_compile_problems

logger = logging.getLogger(__name__)

#: Seconds the judge endpoint has to answer ``GET /models`` in the preflight (no retries).
JUDGE_PROBE_TIMEOUT_SECONDS = 10.0

__all__ = [
    "InputProblems", "Problem", "RULES", "check_run_inputs", "disk_space_problems", "estimated_output_bytes", "flag",
    "hyperparameter_problems", "library_defaults", "preflight", "raise_hyperparameter_problems",
]


def library_defaults() -> dict:
    """The default of every input that has one (``lib.inputs.DEFAULTS``)."""
    return dict(DEFAULTS)


def output_dir_problems(output_dir: Any, overwrite: bool = False, presaved_model_dir: Optional[str] = None) -> list:
    """Problems of the run directory: not a directory, not creatable or not writable (the filesystem asked by
    making and removing an empty directory: ``_output_dir_write_problems``), holding another run's files
    (``PREVIOUS_RUN_FILES``) without ``overwrite``, or being the presaved adapter's own run. Leaves nothing
    behind."""
    where = f"output_dir={output_dir!r} ({flag('output_dir')})"
    if not isinstance(output_dir, str) or not output_dir.strip():
        return [Problem("output_dir", f"{where}: give the path of the run directory.")]
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return [Problem("output_dir", f"{where} is a file; give a directory.")]
    if presaved_model_dir and not overwrite and path.resolve() == Path(presaved_model_dir).resolve().parent:
        return [Problem("output_dir", f"{where} holds the presaved adapter's own run; give another output_dir for "
                                      f"the re-evaluation, or overwrite ({flag('overwrite')}).")]
    if path.is_dir():
        previous = [name for name in PREVIOUS_RUN_FILES if (path / name).exists()]
        if previous and not overwrite:
            return [Problem("output_dir", f"{where} holds another run's files ({', '.join(previous)}); choose a new "
                                          f"output_dir or pass overwrite ({flag('overwrite')}).")]
    else:
        existing = next(parent for parent in path.absolute().parents if parent.exists())
        if not existing.is_dir():
            return [Problem("output_dir", f"{where} cannot be created: {existing} is a file; give a directory path.")]
    return _output_dir_write_problems(output_dir, where)


def _output_dir_write_problems(output_dir: str, where: str) -> list:
    """What the filesystem says when a directory is made in ``output_dir`` (or where it would be created) and
    removed again (``lib.artifacts.output_dir_write_problem``): permission denied, a read-only or a virtual
    filesystem (``/proc``), each with its own advice; the permission bits alone tell root nothing."""
    problem = output_dir_write_problem(output_dir, where)
    return [Problem("output_dir", problem)] if problem else []


def _sparse_category_problems(raw_records: list, found: NormalisedPairs, data_path: str,
                              category_key: str) -> list:
    """Categories labelled in the data (under ``category_key``) with too few records to reach the
    validation and hold-out splits. Categories found in the text are left alone: a school named in a
    handful of unlabelled questions is no mistake of the data."""
    labelled = defaultdict(list)
    for pair, index in zip(found.pairs, found.source_indices):
        label = raw_records[index].get(category_key)
        if isinstance(label, str) and label.strip():
            labelled[pair["category"]].append(index)
    lines = [
        f"{data_path}: category {category!r} (key {category_key!r}) has {len(indices)} record(s) (record "
        f"{listed(indices)}); each category needs {splitting.MIN_CATEGORY_RECORDS} or more to reach the "
        "validation and hold-out splits: add records, correct the label, or drop it."
        for category, indices in sorted(labelled.items())
        if len(indices) < splitting.MIN_CATEGORY_RECORDS
    ]
    return [Problem("data_path", line) for line in capped_lines(lines, "categories")]


def data_problems(values: dict, bad_inputs: set, start: str = "base") -> tuple:
    """Problems of the data file and of its split (see the module docstring, item 3).

    :param values: the run's inputs with defaults filled in.
    :param bad_inputs: inputs already found out of range; checks that use them are skipped.
    :param start: the driver's ``start``: a presaved run renders prompts with its adapter's template.
    :return: ``(problems, found)``; ``found`` is the file's ``NormalisedPairs``, or None when the
        records could not be read or normalised.
    """
    data_path = values.get("data_path")
    if not isinstance(data_path, str) or not data_path.strip():
        return [Problem("data_path", f"data_path={data_path!r} ({flag('data_path')}): give a .json, .jsonl, .csv or "
                                     ".parquet file of question/answer records, a save_to_disk directory or a hub "
                                     "dataset id.")], None
    try:
        raw_records = read_records(data_path)
    except ValueError as error:
        return problems_of("data_path", error), None
    if bad_inputs & {"input_text_key", "output_text_key", "category_key", "data_format", "prompt_template", "lang"}:
        return [], None
    prompt_template = values.get("prompt_template")
    if start == "presaved" and values.get("presaved_model_dir") is not None:
        try:
            read_manifest(values["presaved_model_dir"])
        except ValueError:
            pass  # model_problems reports the adapter directory's problems
        else:
            try:
                prompt_template = graph_values(values, start, ("prompt_template_in_use",))["prompt_template_in_use"]
            except ValueError as error:
                return problems_of("prompt_template", error), None
    found = normalised_pairs(raw_records, data_path, values.get("input_text_key"), values.get("output_text_key"),
                             values["category_key"], values["data_format"], prompt_template, values.get("lang"))
    if found.problems:
        return [Problem("data_path", line) for line in found.problems], None
    problems = _sparse_category_problems(raw_records, found, data_path, values["category_key"])
    if not bad_inputs & {"validation_fraction", "hold_out_fraction", "seed", "near_duplicate_threshold"}:
        try:
            splitting.data_splits(found.pairs, data_path, values["validation_fraction"], values["hold_out_fraction"],
                                  values["seed"], near_duplicate_threshold=values["near_duplicate_threshold"])
        except ValueError as error:
            dropped = (f" ({len(found.duplicates)} record(s) repeating an earlier prompt and {len(found.empty)} "
                       "with an empty question or answer were dropped)") if found.duplicates or found.empty else ""
            problems += [Problem("data_path", line + dropped) for line in str(error).splitlines()]
    return problems, found


def _supervision_problems(tokenizer, prompt_format: str, found: NormalisedPairs, data_path: str,
                          max_seq_length: int, overlong_policy: str, prompt_template: Optional[str]) -> list:
    """Records that cannot become a training example: with ``overlong_policy="error"``, prompts of
    ``max_seq_length`` tokens or more, which would leave no supervised answer token (one problem naming
    every such record); under every policy, conversations the prompt format cannot render (a system
    prompt or earlier turns without a chat template)."""
    too_long, unrenderable = [], []
    for pair, index in zip(found.pairs, found.source_indices):
        context = pair.get("context", "[]")
        try:
            length = len(prompt_token_ids(tokenizer, prompt_format, pair["input_text"], context))
        except ValueError as error:
            unrenderable.append((index, str(error)))
            continue
        if overlong_policy == "error" and length >= max_seq_length:
            too_long.append((index, length, pair["input_text"]))
    problems = []
    if unrenderable:
        index, error = unrenderable[0]
        others = f" (and {len(unrenderable) - 1} more: records {listed([i for i, _ in unrenderable[1:]])})" \
            if len(unrenderable) > 1 else ""
        problems.append(Problem("data_path", f"{data_path} record {index}: {error}{others}"))
    if not too_long:
        return problems
    if len(too_long) == 1:
        index, length, question = too_long[0]
        return problems + [Problem("max_seq_length", f"{data_path} record {index} ({question[:60]!r}...): "
                                                     f"{no_room_for_an_answer(length, max_seq_length)}")]
    longest = max(length for _, length, _ in too_long)
    return problems + [Problem(
        "max_seq_length",
        f"{data_path}: {len(too_long)} of {len(found.pairs)} prompts are max_seq_length={max_seq_length} tokens or "
        f"longer (records {listed([index for index, _, _ in too_long])}; the longest is {longest} tokens), "
        f"leaving no answer token to supervise: raise max_seq_length ({flag('max_seq_length')}) above {longest}, "
        f"shorten those questions, or choose overlong_policy ({flag('overlong_policy')}) truncate_prompt or drop.",
    )]


def model_problems(values: dict, start: str, found: Optional[NormalisedPairs], bad_inputs: set) -> list:
    """Problems of the model, the LoRA targets and the prompt lengths (module docstring, item 4)."""
    allow_pickle, trust_remote_code = bool(values.get("allow_pickle")), bool(values.get("trust_remote_code"))
    if start == "presaved":
        adapter_dir = values.get("presaved_model_dir")
        if adapter_dir is None:
            return [Problem("presaved_model_dir", f"presaved_model_dir ({flag('presaved_model_dir')}) is required with "
                                                  "start='presaved': give the 'adapter' directory of a base run.")]
        try:
            manifest = read_manifest(adapter_dir)
        except ValueError:
            manifest = {}  # presaved_adapter_problems names the manifest's problem
        check = (model_source_problems(adapter_dir) if manifest.get("finetuning_method") == "full"
                 else presaved_adapter_problems(adapter_dir, allow_pickle, trust_remote_code))
        problems = [Problem("presaved_model_dir", line) for line in check]
        if problems:
            return problems
        try:
            graph_values(values, start, ("presaved_log_history",))
        except ValueError as error:
            return problems_of("presaved_model_dir", error)
        tokenizer_source = adapter_dir
    else:
        model_id = values.get("model_id")
        problems = [Problem("model_id", line) for line in model_source_problems(model_id, allow_pickle)]
        problems += [Problem("load_in_4bit", line)
                     for line in quantization_problems(bool(values.get("load_in_4bit")), modeling.device())]
        problems += [Problem("torch_compile", line)
                     for line in torch_compile_problems(values.get("torch_compile"), modeling.device())]
        if problems:
            return problems
        problems += _lora_problems(values, model_id, bad_inputs)
        tokenizer_source = model_id
    try:
        tokenizer = tokenizer_without_weights(tokenizer_source, trust_remote_code)
    except ValueError as error:
        return problems + problems_of("model_id", error)
    if found is None:
        return problems
    try:
        prompt = graph_values(values, start, ("prompt_format", "prompt_template_in_use", "model_context_window"),
                              {"tokenizer": tokenizer})
    except ValueError as error:
        return problems + problems_of("model_id", error)
    problems += _answer_room_problems(values, start, tokenizer, prompt["prompt_format"],
                                      prompt["model_context_window"], bad_inputs)
    if bad_inputs & {"max_seq_length", "overlong_policy"}:
        return problems
    max_seq_length, _ = capped_max_seq_length(values["max_seq_length"], prompt["model_context_window"])
    return problems + _supervision_problems(tokenizer, prompt["prompt_format"], found, values["data_path"],
                                            max_seq_length, values["overlong_policy"],
                                            prompt["prompt_template_in_use"])


def _answer_room_problems(values: dict, start: str, tokenizer, prompt_format: str, window: ContextWindow,
                          bad_inputs: set) -> list:
    """``max_new_tokens`` and the prompts the run answers (hold-out and validation) against the model's context
    window (``lib.context_window.answer_room_problems``, as ``prediction.hold_out_prompt_ids`` checks them):
    one line for the two splits, naming the longest prompt of both. ``max_seq_length`` above the window is
    no problem: ``max_seq_length_in_use`` caps it, with one warning line when the run tokenizes."""
    if "max_new_tokens" in bad_inputs:
        return []
    try:
        splits = graph_values(values, start, ("hold_out_set", "validation_set"), {"tokenizer": tokenizer})
    except ValueError:
        return []  # data_problems names what is wrong with the data or its split
    prompts = [GenerationPrompt(name, index, question, len(ids))
               for name in ("hold_out_set", "validation_set")
               for index, (question, ids) in enumerate(zip(splits[name]["input_text"],
                                                           split_prompt_ids(splits[name], tokenizer, prompt_format)))]
    return [Problem(name, line) for name, line in answer_room_problems(window, prompts, values["max_new_tokens"])]


def graph_values(values: dict, start: str, names: tuple, overrides: Optional[dict] = None,
                 finetuning_method: Optional[str] = None) -> dict:
    """The values of the dataflow's own nodes ``names`` (nodes that load no weights: the prompt format, the
    template in use, the presaved manifest; the model summary of a weightless skeleton), computed by a
    driver built for ``start`` and the run's model or presaved adapter (``dataflow.resolved_config``), so
    the preflight checks what the run will do.

    :param values: the run's inputs, defaults filled in (None values are left out).
    :param overrides: values given for nodes instead of computing them (a tokenizer read without weights).
    :param finetuning_method: the driver's config, when given (else read off the model or manifest).
    :raises ValueError: a node's own message; the model's config or the manifest cannot be read.
    """
    source = {"presaved_model_dir": values.get("presaved_model_dir")} if start == "presaved" else {
        "model_id": values.get("model_id"), "trust_remote_code": bool(values.get("trust_remote_code"))}
    chosen = {"finetuning_method": finetuning_method} if finetuning_method is not None else {}
    config = resolved_config({"start": start, **chosen, **source})
    inputs = {name: value for name, value in values.items() if value is not None}
    # A node's error is the preflight's finding, not a crash: no Hamilton traceback banner in the log.
    hamilton_logger = logging.getLogger("hamilton")
    level = hamilton_logger.level
    hamilton_logger.setLevel(logging.CRITICAL)
    try:
        return _driver(tuple(sorted(config.items()))).execute(list(names), inputs=inputs, overrides=overrides)
    finally:
        hamilton_logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def _driver(config: tuple):
    return build_driver(dict(config))


def _lora_problems(values: dict, model_id: str, bad_inputs: set) -> list:
    """LoRA target modules and layers the base model lacks, checked on its weightless skeleton."""
    targets, layers = values.get("lora_target_modules"), values.get("lora_layers_to_transform", "all")
    if bad_inputs & {"lora_target_modules", "lora_layers_to_transform"} or (targets, layers) == ("all-linear", "all"):
        return []
    try:
        skeleton = model_skeleton(model_id, bool(values.get("trust_remote_code")))
    except ValueError as error:
        return problems_of("model_id", error)
    problems = [Problem("lora_target_modules", line) for line in lora_target_problems(targets, skeleton)]
    try:
        layer_indices(layers, skeleton.config.num_hidden_layers)
    except ValueError as error:
        problems.append(Problem("lora_layers_to_transform", str(error)))
    return problems


@contextlib.contextmanager
def _global_random_states_kept():
    """Python's, numpy's and torch's global random states as they were before the ``with`` block."""
    python, numpy_state = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python)
    numpy.random.set_state(numpy_state)


def disk_space_problems(values: dict, start: str, found: NormalisedPairs, finetuning_method: Optional[str] = None,
                        export: Optional[dict] = None) -> list:
    """``output_dir``'s filesystem (or its nearest existing parent's) with fewer bytes free
    (``lib.disk_space.free_bytes``) than the run will write (``estimated_output_bytes``): one problem naming
    ``output_dir``, both byte counts and the parts of the estimate. None where the estimate cannot be made
    (what cannot be read is left to the run).

    :param found: the run's records (``data_problems``).
    :param finetuning_method: the driver's config (None: read off the model or manifest).
    :param export: see ``estimated_output_bytes``.
    """
    try:
        estimate = estimated_output_bytes(values, start, found, finetuning_method, export)
        free = free_bytes(values["output_dir"])
    except (ValueError, OSError) as error:
        logger.info("preflight: disk space not estimated (%s)", error)
        return []
    total = estimate["total"]
    if free >= total:
        return []
    if "checkpoint" in estimate:
        count = estimate["checkpoints_at_peak"]
        parts = [f"{count} checkpoint{'s' if count > 1 else ''} of {human_bytes(estimate['checkpoint'])} at the peak",
                 f"the {estimate['saved']} {human_bytes(estimate['adapter'])}"]
    elif "merged" in estimate:
        parts = [f"the merged model {human_bytes(estimate['merged'])}"]
        parts += [f"the f32 GGUF copy {human_bytes(estimate['gguf'])}"] if estimate["gguf"] else []
        parts += [f"{kind} {human_bytes(size)}" for kind, size in estimate["quantized"].items()]
    else:
        parts = []
    parts.append(f"the report page {human_bytes(estimate['page'])}")
    writer = "the export" if "merged" in estimate else "the run"
    return [Problem("output_dir", f"output_dir={values['output_dir']!r} ({flag('output_dir')}): {writer} will write "
                                  f"about {total:,} bytes ({human_bytes(total)}: {', '.join(parts)}), but its "
                                  f"filesystem has {bytes_text(free)} free; free space there, or give an output_dir "
                                  "on a larger filesystem.")]


def estimated_output_bytes(values: dict, start: str, found: NormalisedPairs, finetuning_method: Optional[str] = None,
                           export: Optional[dict] = None) -> dict:
    """The bytes a run will write under ``output_dir``, estimated without weights (the formulas:
    ``lib.disk_space``).

    A base run: its checkpoints, adapter (or whole model) and report page, ``lib.disk_space.training_run_bytes``
    of the parameters it trains (the dataflow's own ``model_summary`` of the base model's weightless
    skeleton: PEFT's ``get_peft_model`` for LoRA), its tokenizer's ``tokenizer.json`` and the checkpoints it
    saves (``lib.disk_space.checkpoints_saved``, the train split taken as the records less the validation and
    hold-out fractions; ``training.CHECKPOINTS_KEPT`` kept). A presaved run: its report page; with ``export``
    (``{"gguf": bool, "quantizations": (type, ...)}``, what ``philo-dataflow export`` writes), the merged
    model and GGUF files besides (``lib.disk_space.export_bytes``). Files already in ``output_dir`` are left
    out: neither the room a run frees by overwriting them nor a resumed run's checkpoints count.

    :param values: the run's inputs, defaults filled in.
    :param found: the run's records (``data_problems``).
    :param finetuning_method: the driver's config (None: read off the model or manifest).
    :return: a base run's ``training_run_bytes`` with ``"saved"`` (``"adapter"`` or ``"fine-tuned model"``);
        with ``export``, ``export_bytes``; else ``{"page", "total"}``; in bytes.
    :raises ValueError: the model's config, tokenizer or the presaved manifest cannot be read.
    """
    trust_remote_code = bool(values.get("trust_remote_code"))
    page = page_bytes()
    if start == "base":
        skeleton = model_skeleton(values["model_id"], trust_remote_code)
        with _global_random_states_kept():  # peft_model seeds and draws them (the LoRA initialisation)
            summary = graph_values(values, start, ("model_summary",), {"base_model": skeleton},
                                   finetuning_method)["model_summary"]
        shares = 1 - values["validation_fraction"] - values["hold_out_fraction"]
        saves = checkpoints_saved(
            round(len(found.pairs) * shares),
            values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] * launched_processes(),
            values["num_train_epochs"], values["max_steps"], values["eval_steps"])
        tokenizer = tokenizer_without_weights(values["model_id"], trust_remote_code)
        estimate = training_run_bytes(summary["trainable_parameters"], tokenizer_bytes(tokenizer), page, saves,
                                      training.CHECKPOINTS_KEPT)
        return {**estimate, "saved": "adapter" if summary["trainable_share"] < 1 else "fine-tuned model"}
    if export is None:
        return {"page": page, "total": page}
    adapter_dir = values["presaved_model_dir"]
    manifest = read_manifest(adapter_dir)
    full = manifest.get("finetuning_method") == "full"
    skeleton = model_skeleton(adapter_dir if full else manifest["inputs"]["model_id"], trust_remote_code)
    return export_bytes(sum(p.numel() for p in skeleton.parameters()),
                        tokenizer_bytes(tokenizer_without_weights(adapter_dir, trust_remote_code)), page,
                        export["gguf"], tuple(export.get("quantizations", ())))


def resume_problems(values: dict) -> list:
    """Problems of ``resume_from_checkpoint``: not a complete checkpoint (``lib.trainer.checked_resume_checkpoint``)."""
    try:
        checked_resume_checkpoint(values.get("output_dir", "outputs"), values.get("resume_from_checkpoint"))
    except ValueError as error:
        return problems_of("resume_from_checkpoint", error)
    return []


def _arguments(function, values: dict) -> dict:
    return {name: values[name] for name in inspect.signature(function).parameters if name in values}


def judge_problems(values: dict) -> list:
    """Problems of the LLM-judge settings and endpoint; none when ``judge_model`` is unset.

    The client is built by ``lib.judge_client.make_judge_client`` (a missing key fails there), then ``GET /models`` is
    asked once, without retries, within ``JUDGE_PROBE_TIMEOUT_SECONDS``: the endpoint must answer, accept
    the key, and list ``judge_model`` when it lists models. A loopback server listing a single model is
    taken to serve any name (llama.cpp's server does). The key never appears in a message. With several
    processes (``WORLD_SIZE`` > 1: torchrun, accelerate launch) the judge is refused outright: it runs in one
    process, afterwards, on the saved adapter.
    """
    if values.get("judge_model") is None:
        return []
    if launched_processes() > 1:
        return [Problem("judge_model", f"judge_model={values['judge_model']!r} ({flag('judge_model')}): the LLM judge "
                                       f"runs in one process, not under torchrun or accelerate launch ({launched_processes()} "
                                       "processes); train without it, then judge in one process: philo-dataflow --start "
                                       "presaved --presaved-model-dir OUTPUT_DIR/adapter --judge-model NAME.")]
    try:
        judge = make_judge_client(**_arguments(make_judge_client, values))
    except ValueError as error:
        return problems_of("judge_model", error)
    problems = []
    try:
        check_judge_settings(**_arguments(check_judge_settings, values))
    except ValueError as error:
        problems += problems_of("judge_settings", error)
    response_format = values.get("judge_response_format", "auto")
    if response_format not in RESPONSE_FORMATS:
        problems.append(out_of_range("judge_response_format", response_format,
                                      f"one of {list(RESPONSE_FORMATS)}"))
    return problems + _judge_endpoint_problems(judge, values.get("judge_timeout", JUDGE_PROBE_TIMEOUT_SECONDS))


def _judge_endpoint_problems(judge: JudgeClient, timeout: float) -> list:
    client = judge.client.with_options(timeout=min(timeout, JUDGE_PROBE_TIMEOUT_SECONDS), max_retries=0)
    where = f"judge_base_url={judge.public_base_url!r} ({flag('judge_base_url')})"
    try:
        listed = [model.id for model in client.models.list().data]
    except openai.AuthenticationError:
        return [Problem("judge_api_key_env", f"{where}: the endpoint rejected the API key (HTTP 401); export a "
                                             "valid key in the variable named by judge_api_key_env "
                                             f"({flag('judge_api_key_env')}).")]
    except openai.APIConnectionError as error:
        reason = judge.scrubbed(str(error.__cause__ or error)).strip().split("\n")[0][:160] or type(error).__name__
        return [Problem("judge_base_url", f"{where}: the judge endpoint cannot be reached ({reason}); start the "
                                          "server or correct the URL.")]
    except openai.APIStatusError as error:
        if error.status_code >= 500:
            return [Problem("judge_base_url", f"{where}: the endpoint answered HTTP {error.status_code} to GET /models; "
                                              "check the server.")]
        logger.info("judge endpoint does not list models (HTTP %d); judge_model not checked", error.status_code)
        return []
    if not listed or judge.model in listed or (len(listed) == 1 and is_loopback(judge.base_url)):
        return []
    close = difflib.get_close_matches(judge.model, listed, n=3)
    hint = f"did you mean {close}?" if close else f"it lists {listed[:5]}{' ...' if len(listed) > 5 else ''}."
    return [Problem("judge_model", f"judge_model={judge.model!r} ({flag('judge_model')}): {judge.public_base_url} does "
                                   f"not list it among its {len(listed)} models; {hint}")]


def check_run_inputs(inputs: dict, start: str = "base", overwrite: bool = False,
                     finetuning_method: Optional[str] = None, export: Optional[dict] = None) -> list:
    """Every problem of a run's inputs that can be found before a model is loaded (see the module
    docstring for the checks). Reads, never writes; loads no model weights.

    :param inputs: the inputs ``dr.execute`` will get (missing ones take the library defaults).
    :param start: the driver's ``start`` config, ``"base"`` or ``"presaved"``.
    :param overwrite: the run may replace another run's files in ``output_dir`` (implied by
        ``resume_from_checkpoint``).
    :param finetuning_method: the driver's config, for the disk-space estimate (None: read off the model).
    :param export: what ``philo-dataflow export`` writes besides (``disk_space_problems``), or None.
    :return: list of ``Problem``, empty when the inputs look right.
    """
    if start not in START_MODES:
        return [Problem("start", f"start={start!r} ({flag('start')}): use one of {list(START_MODES)}.")]
    values = {**DEFAULTS, **inputs}
    problems = hyperparameter_problems(values)
    resuming = start == "base" and values.get("resume_from_checkpoint") is not None
    problems += output_dir_problems(values.get("output_dir"), overwrite or resuming,
                                    values.get("presaved_model_dir") if start == "presaved" else None)
    if "report_to" not in {problem.input for problem in problems}:
        problems += [Problem("report_to", line) for line in missing_tracker_problems(values["report_to"])]
    found_problems, found = _data_and_model_problems(values, start, {problem.input for problem in problems})
    problems += found_problems
    if resuming:
        problems += resume_problems(values)
    if not problems and found is not None:
        problems += disk_space_problems(values, start, found, finetuning_method, export)
    problems += judge_problems(values)
    if values.get("hamilton_ui_url") is not None and "hamilton_ui_url" not in {problem.input for problem in problems}:
        problems += [Problem("hamilton_ui_url", line) for line in hamilton_ui_server_problems(values["hamilton_ui_url"])]
    logger.info("preflight: %d problem(s)", len(problems))
    return problems


def _data_and_model_problems(values: dict, start: str, bad_inputs: set) -> tuple:
    found_problems, found = data_problems(values, bad_inputs, start)
    return found_problems + model_problems(values, start, found, bad_inputs), found


def check_data_and_model(inputs: dict, start: str = "base") -> list:
    """The checks 1, 3 and 4 of ``check_run_inputs``: the inputs in range, the data and the model, without
    the output directory, a checkpoint to resume or the judge (what ``philo-dataflow preview`` needs).
    Reads, never writes; loads no model weights.

    :return: list of ``Problem``, empty when the data and the model look right.
    """
    if start not in START_MODES:
        return [Problem("start", f"start={start!r} ({flag('start')}): use one of {list(START_MODES)}.")]
    values = {**DEFAULTS, **inputs}
    problems = hyperparameter_problems(values)
    return problems + _data_and_model_problems(values, start, {problem.input for problem in problems})[0]


def preflight(inputs: dict, start: str = "base", overwrite: bool = False) -> None:
    """``check_run_inputs``, raising what it finds.

    :raises InputProblems: (a ValueError) one line per problem.
    """
    problems = check_run_inputs(inputs, start, overwrite)
    if problems:
        raise InputProblems(problems)
