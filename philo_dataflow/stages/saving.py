"""Saving: every file a run writes under ``output_dir``, each by one node, once (names in
``lib.artifacts``). Every such node is a Hamilton data saver (``@datasaver``): it returns what it wrote
(path, bytes, and a file's SHA-256: ``lib.artifacts.file_metadata``), which Hamilton's trackers
(the Hamilton UI) record as the node's metadata. Every file is written to a temporary name and renamed into place, and the adapter
directory is built in a temporary directory and swapped in, so a failed run never leaves a half-written
output or a previous run's files half-overwritten. A full disk is raised as ``lib.disk_space.NoSpaceLeft``
(a ValueError), one line naming the file, the bytes it needed and the bytes free.
"""

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import yaml
from hamilton.function_modifiers import cache, datasaver, tag
from peft import PeftModel, get_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from ..lib.artifacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    CONFIG_FILE,
    EXPORT_REPORT_FILE,
    EXPORT_REPORT_MARKDOWN_FILE,
    GGUF_FILE,
    JUDGMENTS_FILE,
    LOG_HISTORY_FILE,
    MANIFEST_FILE,
    MERGED_DIR,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODELFILE_FILE,
    PREDICTIONS_CSV_FILE,
    PREDICTIONS_JSONL_FILE,
    REPORT_FILE,
    REPORT_HTML_FILE,
    UMASK,
    library_versions,
    saved_directory_metadata,
    file_metadata,
    write_text_atomically,
)
from ..lib.disk_space import GGUF_BITS_PER_WEIGHT, newest_file, raise_if_out_of_space, tokenizer_bytes
from ..lib.distributed import is_main_process, wait_for_everyone
from ..lib.generation import generation_config
from ..lib.gguf_export import (
    GGUF_OUTTYPE,
    GGUFConversionError,
    convert_to_gguf,
    converter_missing,
    gguf_metadata,
    quantize_gguf,
    quantized_gguf_file,
)
from ..lib.model_sources import portable_model_name
from ..lib.stopping import stop_held
from ..lib.switches import when

logger = logging.getLogger(__name__)


@cache(behavior="recompute")
def run_manifest(
    base_model_id: str,
    data_path: str,
    data_source: dict,
    prompt_format: str,
    trainable_model: PreTrainedModel,
    training_args: TrainingArguments,
    split_summary: dict,
    fit_trainer_eval_metrics: dict,
    prompt_template_in_use: Optional[str],
    generation_settings: dict,
    max_seq_length: int = 512,
    overlong_policy: str = "truncate_prompt",
    max_new_tokens: int = 160,
    seed: int = 42,
    validation_fraction: float = 0.1,
    hold_out_fraction: float = 0.1,
    near_duplicate_threshold: float = 0.8,
    input_text_key: str | None = None,
    output_text_key: str | None = None,
    category_key: str = "school",
    data_format: str = "auto",
    lang: Optional[str] = None,
    finetuning_method: str = "lora",
    architecture: str = "causal",
) -> dict:
    """What made the adapter (or the fully fine-tuned model): resolved inputs, the driver's
    ``finetuning_method`` and ``architecture`` config, the prompt format and template, LoRA (None for full
    fine-tuning) and Trainer settings, generation settings, library versions, the data file's SHA-256 as the
    data loader read it (``data_source``; None for a hub dataset or a directory), split sizes and the
    validation metrics of the kept checkpoint."""
    lora_config = getattr(trainable_model, "peft_config", {}).get("default")
    return {
        "inputs": {
            "model_id": base_model_id,
            "data_path": data_path,
            "input_text_key": input_text_key,
            "output_text_key": output_text_key,
            "category_key": category_key,
            "data_format": data_format,
            "lang": lang,
            "max_seq_length": max_seq_length,
            "overlong_policy": overlong_policy,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "validation_fraction": validation_fraction,
            "hold_out_fraction": hold_out_fraction,
            "near_duplicate_threshold": near_duplicate_threshold,
            **generation_settings,
        },
        "finetuning_method": finetuning_method,
        "architecture": architecture,
        "prompt_format": prompt_format,
        "prompt_template": prompt_template_in_use,
        "lora_config": json.loads(json.dumps(lora_config.to_dict(), default=str)) if lora_config else None,
        "training_args": json.loads(training_args.to_json_string()),
        "library_versions": library_versions(),
        "data_sha256": data_source["sha256"],
        "splits": {name: s["total"] for name, s in split_summary.items()},
        "validation_metrics": fit_trainer_eval_metrics,
    }


@tag(output="default")
@datasaver()
def save_best_models(
    finetuned_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    run_manifest: dict,
    training_log_history: list,
    output_dir: str = "outputs",
) -> dict:
    """Saves the kept adapter (not the base model; with full fine-tuning, the whole model as
    safetensors), tokenizer, manifest (with the prompt format) and loss history to
    ``<output_dir>/adapter``; that directory is what ``presaved_model_dir`` takes.

    Everything is written into a temporary directory beside it, which then takes the place of a
    previous ``adapter`` by two renames (the previous one is restored if the second fails), so an error
    while saving (a full disk, say) leaves the previous adapter as it was and no temporary directory.

    :return: ``{"status": "success", "adapter_dir": path, "files": [names], "path", "bytes", "file_bytes"}``
        (``lib.artifacts.saved_directory_metadata``).
    :raises lib.disk_space.NoSpaceLeft: the disk is full (the bytes needed: the weights', the tokenizer's and
        the manifest's and log's).
    """
    target = Path(output_dir) / ADAPTER_DIR
    manifest = json.dumps(run_manifest, indent=2, default=str)
    history = json.dumps(training_log_history, indent=2)

    def build(staging: Path) -> None:
        finetuned_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_adapter_config(staging, run_manifest["inputs"]["model_id"])
        (staging / MODEL_CARD_FILE).unlink(missing_ok=True)  # PEFT's blank template: saved_model_card writes ours
        (staging / MANIFEST_FILE).write_text(manifest, encoding="utf-8")
        (staging / LOG_HISTORY_FILE).write_text(history, encoding="utf-8")

    needed = _weights_bytes(finetuned_model) + tokenizer_bytes(tokenizer) + len(manifest) + len(history)
    what = "the adapter" if isinstance(finetuned_model, PeftModel) else "the fine-tuned model"
    _swap_in_directory(target, build, needed, what)
    logger.info("saved adapter to %s", target)
    return {"status": "success", "adapter_dir": str(target), "files": sorted(p.name for p in target.iterdir()),
            **saved_directory_metadata(str(target))}


def _portable_adapter_config(adapter_dir: Path, model_id: str) -> None:
    """Names the base model in ``adapter_dir``'s ``adapter_config.json`` (when there is one) by
    ``lib.model_sources.portable_model_name``: PEFT writes the path the base was loaded from, a path of this
    machine (the embedded default's dense copy in ``~/.cache``)."""
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = portable_model_name(model_id)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@tag(output="default")
@datasaver()
def saved_model_card(model_card: str, save_best_models: dict) -> dict:
    """Writes ``model_card`` as ``README.md`` into the saved adapter's (or fully fine-tuned model's)
    directory, atomically, once the run's verdict is known.

    :return: ``lib.artifacts.file_metadata`` of the card.
    """
    return file_metadata(write_text_atomically(Path(save_best_models["adapter_dir"]) / MODEL_CARD_FILE, model_card))


@tag(output="default")
@datasaver()
def saved_hold_out_predictions(hold_out_set_predictions: list[dict], output_dir: str = "outputs") -> dict:
    """Writes the side-by-side hold-out predictions as ``hold_out_predictions.jsonl`` and ``.csv``.

    :return: ``{"jsonl": path, "csv": path, "rows": count, "files": [file_metadata, ...]}``.
    """
    jsonl = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in hold_out_set_predictions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(hold_out_set_predictions[0]))
    writer.writeheader()
    writer.writerows(hold_out_set_predictions)
    out = Path(output_dir)
    paths = {
        "jsonl": write_text_atomically(out / PREDICTIONS_JSONL_FILE, jsonl),
        "csv": write_text_atomically(out / PREDICTIONS_CSV_FILE, buffer.getvalue()),
    }
    return {**paths, "rows": len(hold_out_set_predictions),
            "files": [file_metadata(path) for path in paths.values()]}


@tag(output="default")
@datasaver()
def saved_metrics(run_metrics: dict, output_dir: str = "outputs") -> dict:
    """Writes ``run_metrics`` to ``<output_dir>/metrics.json``.

    :return: ``lib.artifacts.file_metadata`` of the file (``"path"``, ``"bytes"``, ``"sha256"``)."""
    return file_metadata(
        write_text_atomically(Path(output_dir) / METRICS_FILE, json.dumps(run_metrics, indent=2, default=str)))


@tag(output="default")
@datasaver()
def saved_report(report_markdown: str, output_dir: str = "outputs") -> dict:
    """Writes the Markdown report to ``<output_dir>/report.md``; returns its ``file_metadata``."""
    return file_metadata(write_text_atomically(Path(output_dir) / REPORT_FILE, report_markdown))


@tag(output="default")
@datasaver()
def saved_report_html(report_html: str, output_dir: str = "outputs") -> dict:
    """Writes the HTML report (one self-contained page, figures included) to ``<output_dir>/report.html``;
    returns its ``file_metadata``."""
    return file_metadata(write_text_atomically(Path(output_dir) / REPORT_HTML_FILE, report_html))


@when(judge=True)
@tag(output="judge")
@datasaver()
def saved_judgments(rubric_judgments: list[dict], pairwise_judgments: list[dict], output_dir: str = "outputs") -> dict:
    """Writes every judgment, failures with their raw replies included, to ``<output_dir>/judgments.jsonl``:
    the rubric records, then the pairwise records (see ``rubric_judgments`` / ``pairwise_judgments``);
    returns its ``file_metadata``."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*rubric_judgments, *pairwise_judgments])
    return file_metadata(write_text_atomically(Path(output_dir) / JUDGMENTS_FILE, text))


@tag(output="run")
@datasaver()
def saved_run_config(run_config: dict, output_dir: str = "outputs") -> dict:
    """Writes the resolved configuration of a run (every input, with defaults filled in, and the
    ``start`` and ``judge`` config) to ``<output_dir>/config.yaml``, which ``philo-dataflow --config`` takes back to
    reproduce the run.

    :param run_config: input and config names -> values (``philo-dataflow`` passes it).
    :return: the file's ``file_metadata``.
    """
    text = yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return file_metadata(write_text_atomically(Path(output_dir) / CONFIG_FILE, text))


def _weights_bytes(model: PreTrainedModel) -> int:
    """Bytes of the tensors ``model.save_pretrained`` writes: a PEFT model's adapter weights, else its state
    dict with tied tensors once."""
    tensors = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    unique = {(t.device, t.data_ptr()): t for t in tensors.values()} if tensors else {}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _swap_in_directory(target: Path, build, needed: int, what: str) -> None:
    """Builds a directory with ``build(staging)`` in a temporary directory beside ``target``, then puts it in
    ``target``'s place by two renames (a previous ``target`` is restored if the second fails), so an error
    leaves the previous directory as it was and no temporary one. A full disk is raised as
    ``lib.disk_space.NoSpaceLeft`` naming the file being written (under ``target``), ``what`` and its
    ``needed`` bytes.

    With several processes (torchrun, accelerate launch) only the main one builds and writes; every
    process then waits for the others (``lib.distributed.wait_for_everyone``, also when building fails),
    so all of them find ``target`` in place when this returns. Every process must call it.

    A stop signal that comes meanwhile waits for the swap (``lib.stopping.stop_held``): the new directory
    is put in place, then ``StopRequested`` is raised.
    """
    try:
        if is_main_process():
            with stop_held():
                _build_and_swap_in(target, build, needed, what)
    finally:
        wait_for_everyone()


def _build_and_swap_in(target: Path, build, needed: int, what: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        # mkdtemp and safetensors make owner-only entries; a saved model is shared like any output.
        os.chmod(staging, 0o777 & ~UMASK)
        for path in staging.iterdir():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)
        if target.exists():
            retired = target.with_name(f".{target.name}.previous")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException as error:
        failed = newest_file(staging)
        raise_if_out_of_space(error, target / failed.relative_to(staging) if failed else target, needed, what,
                              where=target.parent, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True))
        raise


@tag(output="export")
@datasaver()
def saved_merged_model(
    merged_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generation_settings: dict,
    max_new_tokens: int = 160,
    output_dir: str = "outputs",
) -> dict:
    """Writes the merged model (safetensors), its tokenizer with the chat template, and a generation config
    of the run's decoding (greedy unless it sampled, ``max_new_tokens``, EOS and pad token) to
    ``<output_dir>/merged``: a plain transformers model directory, without adapter files.

    Built in a temporary directory and swapped in like ``save_best_models``, so a previous export (its
    GGUF file and report too) is replaced whole or left as it was.

    :return: ``{"merged_dir": path, "files": [names], "path", "bytes", "file_bytes"}``.
    :raises lib.disk_space.NoSpaceLeft: the disk is full.
    """
    def build(staging: Path) -> None:
        merged_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        generation_config(tokenizer, max_new_tokens, generation_settings).save_pretrained(staging)

    target = Path(output_dir) / MERGED_DIR
    _swap_in_directory(target, build, _weights_bytes(merged_model) + tokenizer_bytes(tokenizer), "the merged model")
    logger.info("saved the merged model to %s", target)
    return {"merged_dir": str(target), "files": sorted(p.name for p in target.iterdir()),
            **saved_directory_metadata(str(target))}


@tag(output="export")
@datasaver()
def saved_gguf_model(saved_merged_model: dict, ollama_modelfile: str, architecture: str = "causal") -> dict:
    """Converts the merged model to ``<output_dir>/merged/model.gguf`` with llama.cpp's own converter
    (``lib.gguf_export``; tensors in ``GGUF_OUTTYPE``, f32) and writes the Ollama ``Modelfile`` beside it.

    The converter is a subprocess of this node that writes a temporary file in the merged directory, which
    this node renames into place: the file is still written by ``saving`` alone, once, never half.

    :return: ``{"status": "ok", "gguf": path, "modelfile": path, "bytes" (of the GGUF file), "outtype",
        "architecture", "pre_tokenizer", "tensors"}``; writing nothing, ``{"status": "skipped", "reason": line}`` (no converter here, the line
        says how to get it; an encoder-decoder model) or ``{"status": "failed", "reason": line}`` (the
        converter's last line: an architecture or pre-tokenizer it does not know, say).
    :raises lib.disk_space.NoSpaceLeft: the disk filled up (the temporary file is removed; the merged model
        stays).
    """
    if architecture == "seq2seq":
        return {"status": "skipped", "reason": "GGUF export covers decoder-only models; this one is an "
                                               "encoder-decoder (the merged model is exported)."}
    missing = converter_missing()
    if missing:
        logger.warning("GGUF export skipped: %s", missing)
        return {"status": "skipped", "reason": missing}
    directory = Path(saved_merged_model["merged_dir"])
    merged_bytes = saved_directory_metadata(str(directory))["bytes"]  # the f32 file holds the same weights
    handle, temporary = tempfile.mkstemp(prefix=f".{GGUF_FILE}.", dir=directory)
    os.close(handle)
    try:
        convert_to_gguf(directory, Path(temporary), GGUF_OUTTYPE)
        os.chmod(temporary, 0o666 & ~UMASK)
        os.replace(temporary, directory / GGUF_FILE)
    except BaseException as error:
        raise_if_out_of_space(error, directory / GGUF_FILE, merged_bytes, "the GGUF file",
                              cleanup=lambda: Path(temporary).unlink(missing_ok=True))
        if not isinstance(error, GGUFConversionError):
            raise
        logger.error("GGUF export failed: %s", error)
        return {"status": "failed", "reason": str(error)}
    modelfile = write_text_atomically(directory / MODELFILE_FILE, ollama_modelfile)
    return {"status": "ok", "gguf": str(directory / GGUF_FILE), "modelfile": modelfile,
            "bytes": (directory / GGUF_FILE).stat().st_size, "outtype": GGUF_OUTTYPE,
            **gguf_metadata(directory / GGUF_FILE)}


@tag(output="export")
@datasaver()
def saved_quantized_gguf_models(saved_gguf_model: dict, quantization_types: list[str]) -> dict:
    """Writes a quantized copy of the GGUF file per ``quantization_types`` beside it
    (``<output_dir>/merged/model.q4_k_m.gguf``...), made by llama.cpp's own quantizer from the f32 file
    (``lib.gguf_export.quantize_gguf``), each to a temporary name and renamed into place.

    :return: ``{"status": "ok", "files": {type: lib.artifacts.file_metadata}}``; ``{"status": "none", "files":
        {}}`` when none is asked for; ``{"status": "skipped" | "failed", "reason": line, "files": {...}}`` when
        there is no f32 file or the quantizer failed (the copies made before are kept and listed).
    :raises lib.disk_space.NoSpaceLeft: the disk filled up (the copies made before are kept).
    """
    if not quantization_types:
        return {"status": "none", "files": {}}
    if saved_gguf_model["status"] != "ok":
        return {"status": "skipped", "files": {},
                "reason": f"no GGUF file to quantize ({saved_gguf_model['status']}: {saved_gguf_model.get('reason', '')})"}
    source = Path(saved_gguf_model["gguf"])
    files = {}
    for quantization in quantization_types:
        target = source.with_name(quantized_gguf_file(quantization))
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=source.parent)
        os.close(handle)
        try:
            quantize_gguf(source, Path(temporary), quantization)
            os.chmod(temporary, 0o666 & ~UMASK)
            os.replace(temporary, target)
        except BaseException as error:
            needed = math.ceil(saved_gguf_model["bytes"] * GGUF_BITS_PER_WEIGHT[quantization] / GGUF_BITS_PER_WEIGHT[GGUF_OUTTYPE])
            # llama.cpp's quantizer logs no cause a caller can rely on ("basic_ios::clear: iostream error").
            raise_if_out_of_space(error, target, needed, f"the {quantization} copy",
                                  cleanup=lambda: Path(temporary).unlink(missing_ok=True), silent_writer=True)
            if not isinstance(error, GGUFConversionError):
                raise
            logger.error("GGUF quantization failed: %s", error)
            return {"status": "failed", "reason": str(error), "files": files}
        files[quantization] = file_metadata(str(target))
    return {"status": "ok", "files": files}


@tag(output="export")
@datasaver()
def saved_merged_model_card(merged_model_card: Optional[str], saved_merged_model: dict) -> dict:
    """Writes ``merged_model_card`` as ``README.md`` into the merged model's directory, atomically (nothing
    when the run wrote no card).

    :return: ``lib.artifacts.file_metadata`` of the card, or ``{"status": "skipped", "reason"}``.
    """
    if merged_model_card is None:
        return {"status": "skipped", "reason": "the run wrote no model card (adapter/README.md) to start from"}
    return file_metadata(write_text_atomically(Path(saved_merged_model["merged_dir"]) / MODEL_CARD_FILE,
                                               merged_model_card))


@tag(output="export")
@datasaver()
def saved_export_report(
    export_report: dict, export_report_markdown: str, export_report_html: str, saved_merged_model: dict,
) -> dict:
    """Writes ``export_report`` as ``export_report.json``, ``export_report_markdown`` as ``export_report.md`` and
    ``export_report_html`` as ``export_report.html`` into the merged model's directory.

    :return: ``{"json": path, "markdown": path, "html": path, "files": [file_metadata, ...]}``.
    """
    directory = Path(saved_merged_model["merged_dir"])
    paths = {
        "json": write_text_atomically(directory / EXPORT_REPORT_FILE, json.dumps(export_report, indent=2, default=str)),
        "markdown": write_text_atomically(directory / EXPORT_REPORT_MARKDOWN_FILE, export_report_markdown),
        "html": write_text_atomically(directory / EXPORT_REPORT_MARKDOWN_FILE.replace(".md", ".html"),
                                      export_report_html),
    }
    return {**paths, "files": [file_metadata(path) for path in paths.values()]}
