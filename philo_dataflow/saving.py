"""Stage 6 / edges — write the adapter, predictions, metrics, figures and report under ``output_dir``.

Every file is written to a temporary name and renamed into place, and the adapter directory is built
in a temporary directory and swapped in, so a failed run never leaves a half-written output or a
previous run's files half-overwritten.
"""

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import plotly.graph_objects as go
from peft import LoraConfig, PeftModel
from transformers import PreTrainedTokenizerBase, TrainingArguments

from .modeling import MANIFEST_FILE
from .training import LOG_HISTORY_FILE

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
#: Read once: ``os.umask`` can only be read by setting it, which is not thread-safe (judge threads write).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_VERSIONED = ("philo_dataflow", "torch", "transformers", "peft", "datasets", "apache-hamilton", "rouge_score")


def _library_versions() -> dict:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomically(path: Path, text: str) -> str:
    """Writes ``text`` to ``path`` through a temporary file in the same directory and a rename, so
    ``path`` holds either its previous content or all of ``text``, never part of it (a full disk or a
    crash mid-write leaves the previous file and no temporary file). The file gets the usual
    permissions (0666 minus the umask), not ``mkstemp``'s owner-only 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return str(path)


def run_manifest(
    base_model_id: str,
    data_path: str,
    prompt_format: str,
    lora_config: LoraConfig,
    training_args: TrainingArguments,
    split_summary: dict,
    fit_trainer_eval_metrics: dict,
    max_seq_length: int = 512,
    max_new_tokens: int = 160,
    seed: int = 42,
    validation_fraction: float = 0.1,
    hold_out_fraction: float = 0.1,
    input_text_key: str | None = None,
    output_text_key: str | None = None,
    category_key: str = "school",
) -> dict:
    """What made the adapter: resolved inputs, LoRA and Trainer settings, library versions, the data
    file's SHA-256, split sizes and the validation metrics of the kept checkpoint."""
    return {
        "inputs": {
            "model_id": base_model_id,
            "data_path": data_path,
            "input_text_key": input_text_key,
            "output_text_key": output_text_key,
            "category_key": category_key,
            "max_seq_length": max_seq_length,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "validation_fraction": validation_fraction,
            "hold_out_fraction": hold_out_fraction,
        },
        "prompt_format": prompt_format,
        "lora_config": json.loads(json.dumps(lora_config.to_dict(), default=str)),
        "training_args": json.loads(training_args.to_json_string()),
        "library_versions": _library_versions(),
        "data_sha256": _sha256(data_path),
        "splits": {name: s["total"] for name, s in split_summary.items()},
        "validation_metrics": fit_trainer_eval_metrics,
    }


def save_best_models(
    finetuned_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    run_manifest: dict,
    training_log_history: list,
    output_dir: str = "outputs",
) -> dict:
    """Saves the kept adapter (not the base model), tokenizer, manifest (with the prompt format) and
    loss history to ``<output_dir>/adapter``; that directory is what ``presaved_model_dir`` takes.

    Everything is written into a temporary directory beside it, which then takes the place of a
    previous ``adapter`` by two renames (the previous one is restored if the second fails), so an error
    while saving (a full disk, say) leaves the previous adapter as it was and no temporary directory.

    :return: ``{"status": "success", "adapter_dir": path, "files": [...]}``.
    """
    target = Path(output_dir) / ADAPTER_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}.", dir=target.parent))
    try:
        finetuned_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST_FILE).write_text(json.dumps(run_manifest, indent=2, default=str), encoding="utf-8")
        (staging / LOG_HISTORY_FILE).write_text(json.dumps(training_log_history, indent=2), encoding="utf-8")
        # mkdtemp and safetensors make owner-only entries; an adapter is shared like any saved model.
        os.chmod(staging, 0o777 & ~_UMASK)
        for path in staging.iterdir():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
        if target.exists():
            retired = target.with_name(f".{ADAPTER_DIR}.previous")
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved adapter to %s", target)
    return {"status": "success", "adapter_dir": str(target), "files": sorted(p.name for p in target.iterdir())}


def saved_hold_out_predictions(hold_out_set_predictions: list[dict], output_dir: str = "outputs") -> dict:
    """Writes the side-by-side hold-out predictions as ``hold_out_predictions.jsonl`` and ``.csv``.

    :return: ``{"jsonl": path, "csv": path}``.
    """
    jsonl = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in hold_out_set_predictions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(hold_out_set_predictions[0]))
    writer.writeheader()
    writer.writerows(hold_out_set_predictions)
    out = Path(output_dir)
    return {
        "jsonl": write_text_atomically(out / "hold_out_predictions.jsonl", jsonl),
        "csv": write_text_atomically(out / "hold_out_predictions.csv", buffer.getvalue()),
    }


def saved_metrics(run_metrics: dict, output_dir: str = "outputs") -> str:
    """Writes ``run_metrics`` to ``<output_dir>/metrics.json``; returns the path."""
    return write_text_atomically(Path(output_dir) / "metrics.json", json.dumps(run_metrics, indent=2, default=str))


def saved_figures(loss_curve_figure: go.Figure, rouge_comparison_figure: go.Figure, output_dir: str = "outputs") -> dict:
    """Writes the figures as self-contained interactive HTML (plotly.js inlined, works offline).

    :return: ``{"loss_curve": path, "rouge_comparison": path}``.
    """
    out = Path(output_dir)
    return {
        "loss_curve": write_text_atomically(out / "loss_curve.html", loss_curve_figure.to_html(include_plotlyjs=True)),
        "rouge_comparison": write_text_atomically(
            out / "rouge_comparison.html", rouge_comparison_figure.to_html(include_plotlyjs=True)
        ),
    }


def saved_report(report_markdown: str, output_dir: str = "outputs") -> str:
    """Writes the Markdown report to ``<output_dir>/report.md``; returns the path."""
    return write_text_atomically(Path(output_dir) / "report.md", report_markdown)
