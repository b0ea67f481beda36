"""Comparison of several models on one hold-out set: the base model and each compared model (a run of ours,
a PEFT adapter of any trainer, a model directory or hub id, a GGUF file: ``compared_models``) answer the
same questions greedily, and are scored with ROUGE, EOS-stop rate, answer length and the repetition
measures of ``lib.scores``, with a paired bootstrap CI of every pair's difference. What ``philo-dataflow
compare`` (``cli.compare``) runs.

A run's loading and generation go through the library's own ``presaved`` dataflow (``build_driver``), as
``philo-dataflow --start presaved`` would load the adapter and answer; other models through the ``base``
dataflow (``compared_models.hf_answers``) or llama.cpp. The hold-out set of a data file is the dataflow's
``hold_out_set`` under the first run's manifest split inputs (the defaults when no run is compared), or
its ``instruction_records`` whole. Library code, not a stage module: the driver is never given it.
"""

import ast
import gc
import html
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Optional

import plotly.graph_objects as go
import torch
from datasets import Dataset

from .compared_models import Model, Run
from .dataflow import build_driver, resolved_config
from .lib import html_report
from .lib.artifacts import (
    ADAPTER_DIR,
    MANIFEST_INPUTS,
    PREDICTIONS_JSONL_FILE,
    sha256_of_file,
)
from .lib.formatting import fmt, one_line, pct
from .lib.generation import GREEDY, answer_columns
from .lib.inputs import DEFAULTS
from .lib.judge_protocol import pairwise_metrics
from .lib.near_duplicates import conversation_text, leaked_questions
from .lib.records import read_records
from .lib.scores import REPETITION_MEASURES, ROUGE_TYPES, TIE_TOLERANCE, has_loop, verdict
from .lib.trainer import ready_for_generation
from .stages.loading import instruction_records
from .stages.splitting import SPLIT_COLUMNS

logger = logging.getLogger(__name__)

#: How every compared model answers: the run defaults' decoding (greedy, no repeated 4-grams), the same
#: for all, whatever each run was evaluated with.
COMPARE_DECODING = {name: DEFAULTS[name] for name in GREEDY}
#: The key of the base model among the compared models.
BASE = "base"
#: Questions each pair lists as won and lost by most (``comparison.json``'s ``most_changed``).
MOST_CHANGED_QUESTIONS = 3
#: The keys of each hold-out question in ``hold_out_predictions.jsonl`` that a comparison reads.
HOLD_OUT_KEYS = ("question", "category", "reference")
#: Manifest settings shown per run where the runs differ in them (``differing_settings``).
_TRAINING_ARGS_SHOWN = (
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "warmup_ratio", "weight_decay", "lr_scheduler_type", "neftune_noise_alpha",
)
_LORA_CONFIG_SHOWN = ("r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform")


def _name_parts(model: Model) -> tuple:
    if model.run is not None:
        run = model.run
        return (run.run_dir if run.adapter_dir.name == ADAPTER_DIR else run.adapter_dir).resolve().parts
    path = Path(model.path)
    return path.resolve().parts if path.exists() else tuple(model.path.split("/"))


def model_labels(models: list[Model]) -> list[str]:
    """A short, unique name for each model: the last component of its path (a run's ``run_dir``, or its
    adapter directory when that is not named ``adapter``; a hub id's name), or as many of the last
    components as make the names unique (and unlike ``BASE``)."""
    parts = [_name_parts(model) for model in models]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) and BASE not in labels:
            return labels
    return [model.path for model in models]


def predicted_hold_out(run: Run) -> list[dict]:
    """The hold-out questions the run answered, from its ``hold_out_predictions.jsonl``: one dict of
    ``HOLD_OUT_KEYS`` per question, in the run's order.

    :raises ValueError: one line naming the file: missing, not JSON lines, a row without those keys.
    """
    path = run.run_dir / PREDICTIONS_JSONL_FILE
    advice = "pass --data-path FILE to score every run on that file's hold-out split instead."
    if not path.is_file():
        raise ValueError(f"{run.run_dir}: holds no {PREDICTIONS_JSONL_FILE} (the run did not finish); {advice}")
    rows = []
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in HOLD_OUT_KEYS):
                    raise ValueError(f"line {number} lacks {', '.join(HOLD_OUT_KEYS)}")
                rows.append({key: row[key] for key in HOLD_OUT_KEYS})
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read ({str(error).splitlines()[0][:120]}); {advice}") from None
    if not rows:
        raise ValueError(f"{path}: holds no question; {advice}")
    return rows


def hold_out_difference(a: list[dict], b: list[dict]) -> Optional[str]:
    """How two hold-out sets differ in their questions and references (None when they are the same):
    ``"6 vs 7 questions"`` or ``"question 3 differs"`` (1-based)."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} questions"
    for number, (x, y) in enumerate(zip(a, b), start=1):
        if (x["question"], x["reference"]) != (y["question"], y["reference"]):
            return f"question {number} differs"
    return None


def _presaved_driver(run: Run):
    return build_driver(resolved_config({"start": "presaved", "presaved_model_dir": str(run.adapter_dir)}))


def split_inputs(run: Run) -> dict:
    """The run's manifest values (``MANIFEST_INPUTS``) of the inputs its hold-out set depends on in the
    presaved dataflow (data reading and split: ``seed``, the fractions, the keys...), ``data_path``
    included; unset ones left out."""
    needed = {v.name for v in _presaved_driver(run).what_is_upstream_of("hold_out_set") if v.is_external_input}
    recorded = run.manifest["inputs"]
    return {name: recorded[name] for name in MANIFEST_INPUTS if name in needed and recorded.get(name) is not None}


def data_hold_out_set(run: Optional[Run], data_path: str, whole: bool = False, base: Optional[str] = None,
                      prompt_template: Optional[str] = None) -> Dataset:
    """The hold-out split of ``data_path`` made as a run would make it: the presaved dataflow's
    ``hold_out_set`` under ``run``'s manifest split inputs (``split_inputs``) and prompt template; without a
    run, the ``base`` dataflow's under the defaults, for model ``base``, with ``prompt_template``. With
    ``whole`` (``--hold-out all``), every usable record of the file instead (the dataflow's
    ``instruction_records``), in file order.

    :return: a ``Dataset`` with the columns of ``splitting.SPLIT_COLUMNS``.
    :raises ValueError: the data file's problems, as the dataflow reports them.
    """
    node = "instruction_records" if whole else "hold_out_set"
    if run is not None:
        inputs = {**split_inputs(run), "data_path": data_path, "presaved_model_dir": str(run.adapter_dir)}
        value = _presaved_driver(run).execute([node], inputs=inputs)[node]
    else:
        inputs = {"data_path": data_path, "model_id": base,
                  **({"prompt_template": prompt_template} if prompt_template else {})}
        value = build_driver(resolved_config({"start": "base", "model_id": base})).execute([node], inputs=inputs)[node]
    if whole:
        value = Dataset.from_dict({column: [record.get(column, "[]" if column == "context" else "") for record in value]
                                   for column in SPLIT_COLUMNS})
    return value


def runs_split_otherwise(runs: list[Run], data_path: str) -> list[int]:
    """Indices of the runs whose own split differs from the hold-out split of ``data_path`` under the first
    run's split inputs (``data_hold_out_set``): another data file (by SHA-256) or other split inputs. Such a
    run may have trained on some of those hold-out questions."""
    data_sha = sha256_of_file(data_path) if Path(data_path).is_file() else None
    wanted = {name: value for name, value in split_inputs(runs[0]).items() if name != "data_path"}
    return [index for index, run in enumerate(runs)
            if run.manifest.get("data_sha256") != data_sha or data_sha is None
            or {name: value for name, value in split_inputs(run).items() if name != "data_path"} != wanted]


def predicted_hold_out_set(run: Run, rows: list[dict]) -> Dataset:
    """The hold-out set of ``rows`` (``predicted_hold_out``) as a ``Dataset`` the generation nodes take.

    ``hold_out_predictions.jsonl`` does not keep a question's earlier turns (``context``): when the run's
    data file is still there unchanged (its manifest's ``data_sha256``), the hold-out set is rebuilt from
    it (``data_hold_out_set``) so multi-turn questions keep their conversation; otherwise every question
    is asked alone, which is the run's own prompt for single-turn data.
    """
    data_path = run.manifest["inputs"].get("data_path")
    recorded_sha = run.manifest.get("data_sha256")
    if isinstance(data_path, str) and recorded_sha and Path(data_path).is_file():
        try:
            if sha256_of_file(data_path) == recorded_sha:
                rebuilt = data_hold_out_set(run, data_path)
                as_rows = [{"question": q, "reference": r} for q, r in zip(rebuilt["input_text"], rebuilt["output_text"])]
                if hold_out_difference(rows, as_rows) is None:
                    return rebuilt
        except (OSError, ValueError) as error:
            logger.info("%s: hold-out set not rebuilt from %s (%s); questions asked without context",
                        run.run_dir, data_path, str(error).splitlines()[0][:200])
    return Dataset.from_dict({
        "input_text": [r["question"] for r in rows], "output_text": [r["reference"] for r in rows],
        "category": [r["category"] for r in rows], "context": ["[]"] * len(rows),
    })


def model_answers(run: Run, hold_out_set: Dataset, max_new_tokens: int, generation_batch_size: int,
                  with_base: bool, decoding: Optional[dict] = None) -> dict:
    """Answers (``decoding``, by default ``COMPARE_DECODING``) of the run's fine-tuned model (and, with ``with_base``, of its base model) to every
    ``hold_out_set`` question, by the presaved dataflow's ``finetuned_model_hold_out_generations`` and
    ``base_model_hold_out_generations`` (``prediction``).

    The model is loaded by the dataflow's ``trainable_model`` and made ready for generation as the
    ``finetuned_model`` node makes it, without that node's evaluation of the validation set (which would
    need the data file and the training inputs). The weights are released before returning.

    :return: ``{"finetuned": [...], "base": [...]}`` (``base`` only with ``with_base``), each one dict per
        question (``text``, ``token_ids``, ``ended_on_eos``; see ``lib.generation.generate_answers``).
    :raises ValueError: a model or adapter that cannot be loaded; settings out of range.
    """
    dr = _presaved_driver(run)
    inputs = {"presaved_model_dir": str(run.adapter_dir), "max_new_tokens": max_new_tokens,
              "generation_batch_size": generation_batch_size, **(decoding or COMPARE_DECODING)}
    loaded = dr.execute(["trainable_model", "tokenizer", "prompt_format"], inputs=inputs)
    overrides = {"hold_out_set": hold_out_set, "finetuned_model": ready_for_generation(loaded.pop("trainable_model")),
                 **loaded}
    wanted = {"finetuned": "finetuned_model_hold_out_generations"}
    if with_base:
        wanted[BASE] = "base_model_hold_out_generations"
    result = dr.execute(list(wanted.values()), inputs=inputs, overrides=overrides)
    del overrides, loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {key: result[node] for key, node in wanted.items()}


def comparison_scores(hold_out: list[dict], answers: dict, seed: int) -> dict:
    """Scores of every model's answers to the ``hold_out`` questions, and of every pair's differences, by
    ``lib.scores.verdict``: the main job's own scoring.

    :param hold_out: one dict per question with ``reference`` and ``category``.
    :param answers: model name -> its generations (``model_answers``), in ``hold_out`` order; pairs are
        taken in this order.
    :param seed: seed of the bootstrap resampling.
    :return: ``lib.scores.verdict`` of the answers (``TIE_TOLERANCE``, ``MOST_CHANGED_QUESTIONS``), each pair's
        ``most_changed`` questions written out, ``{"won": [...], "lost": [...]}``, each ``{"question",
        "category", "rougeL_a", "rougeL_b", "answer_a", "answer_b"}``.
    """
    given = {name: answer_columns(gens) for name, gens in answers.items()}
    scored = verdict([row["reference"] for row in hold_out], [row["category"] for row in hold_out], given, seed,
                     TIE_TOLERANCE, MOST_CHANGED_QUESTIONS)
    rouge_l = scored["rougeL_per_question"]
    for pair in scored["pairs"]:
        a, b = pair["a"], pair["b"]
        pair["most_changed"] = {kind: [{"question": hold_out[i]["question"], "category": hold_out[i]["category"],
                                        "rougeL_a": rouge_l[a][i], "rougeL_b": rouge_l[b][i],
                                        "answer_a": answers[a][i]["text"], "answer_b": answers[b][i]["text"]}
                                       for i in indices] for kind, indices in pair["most_changed"].items()}
    return scored


def differing_settings(runs: dict) -> dict:
    """The training settings in which the runs differ, per run: manifest inputs, ``finetuning_method``,
    LoRA settings and the Trainer's schedule (``_TRAINING_ARGS_SHOWN``).

    :param runs: run name -> ``Run``.
    :return: ``{name: {setting: value}}`` with the same settings for every run (empty when they agree).
    """
    flat = {}
    for name, run in runs.items():
        manifest = run.manifest
        settings = {f"inputs.{key}": value for key, value in manifest["inputs"].items()}
        settings["finetuning_method"] = manifest.get("finetuning_method", "lora")
        lora = manifest.get("lora_config") or {}
        settings.update({f"lora.{key}": lora.get(key) for key in _LORA_CONFIG_SHOWN})
        training = manifest.get("training_args") or {}
        settings.update({f"training.{key}": training.get(key) for key in _TRAINING_ARGS_SHOWN})
        flat[name] = {key: _comparable(value) for key, value in settings.items()}
    keys = sorted({key for settings in flat.values() for key in settings})
    differing = [key for key in keys if len({json.dumps(s.get(key), sort_keys=True, default=str)
                                             for s in flat.values()}) > 1]
    return {name: {key: settings.get(key) for key in differing} for name, settings in flat.items()}


def _comparable(value):
    """A setting as the manifest holds it, with a set PEFT saved as its text (``target_modules``) back as a
    sorted list, so two runs of the same modules do not differ by the set's order."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return sorted(parsed) if isinstance(parsed, (set, frozenset)) else value
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def answer_rows(hold_out: list[dict], answers: dict, scores: dict) -> list[dict]:
    """One row per question for ``answers.jsonl``: ``question``, ``category``, ``reference`` and
    ``answers``: ``{model: {"text", "rougeL", "ended_on_eos", "new_tokens", "loop"}}``."""
    rows = []
    for index, row in enumerate(hold_out):
        rows.append({**{key: row[key] for key in HOLD_OUT_KEYS}, "answers": {
            name: {"text": gens[index]["text"], "rougeL": scores["rougeL_per_question"][name][index],
                   "ended_on_eos": gens[index]["ended_on_eos"], "new_tokens": len(gens[index]["token_ids"]),
                   "loop": has_loop(gens[index]["text"])}
            for name, gens in answers.items()
        }})
    return rows


def json_ready(value):
    """``value`` with every NaN or infinite float replaced by None, so it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def _value_or_nan(value) -> float:
    return float("nan") if value is None else value


def rouge_l_figure(comparison: dict) -> go.Figure:
    """Mean hold-out ROUGE-L F-measure (0–1) of each model (bars)."""
    names = list(comparison["models"])
    values = [_value_or_nan(comparison["models"][n]["scores"]["rougeL"]) for n in names]
    figure = go.Figure(go.Bar(x=names, y=values, text=[fmt(v) for v in values], textposition="outside"))
    figure.update_layout(title=f"Hold-out ROUGE-L ({comparison['hold_out']['questions']} questions)",
                         xaxis_title="model", yaxis_title="mean ROUGE-L F-measure", yaxis_range=[0, 1.05],
                         template="plotly_white")
    return figure


def loop_rate_figure(comparison: dict) -> go.Figure:
    """Share of each model's hold-out answers with a loop (``lib.scores.has_loop``), as bars."""
    names = list(comparison["models"])
    values = [_value_or_nan(comparison["models"][n]["scores"]["loop_rate"]) for n in names]
    figure = go.Figure(go.Bar(x=names, y=values, text=[pct(v) for v in values], textposition="outside",
                              marker_color="#d62728"))
    figure.update_layout(title="Answers that loop (a word 4-gram 3 or more times)", xaxis_title="model",
                         yaxis_title="share of answers", yaxis_tickformat=".0%", yaxis_range=[0, 1.05],
                         template="plotly_white")
    return figure


def rouge_l_difference_figure(comparison: dict) -> go.Figure:
    """Matrix of mean per-question ROUGE-L differences, column model minus row model, each cell
    annotated with its paired bootstrap 95% CI (``comparison_scores``)."""
    names = list(comparison["models"])
    cells = {}
    for pair in comparison["pairs"]:
        d = {key: _value_or_nan(pair["rougeL_difference"][key]) for key in ("mean", "ci95_low", "ci95_high")}
        cells[(pair["a"], pair["b"])] = (d["mean"], d["ci95_low"], d["ci95_high"])
        # 0.0 - x, not -x: a zero difference reads +0.000 both ways, not -0.000.
        cells[(pair["b"], pair["a"])] = (0.0 - d["mean"], 0.0 - d["ci95_high"], 0.0 - d["ci95_low"])
    z, text = [], []
    for row in names:
        z.append([cells.get((row, column), (float("nan"),))[0] for column in names])
        text.append([f"{cells[(row, column)][0]:+.3f}<br>[{cells[(row, column)][1]:+.3f}, {cells[(row, column)][2]:+.3f}]"
                     if (row, column) in cells else "" for column in names])
    figure = go.Figure(go.Heatmap(z=z, x=names, y=names, text=text, texttemplate="%{text}", colorscale="RdBu",
                                  zmid=0, colorbar={"title": "ROUGE-L<br>difference"},
                                  hovertemplate="%{x} minus %{y}: %{text}<extra></extra>"))
    figure.update_layout(title="ROUGE-L difference b − a: column minus row (paired bootstrap 95% CI)",
                         xaxis_title="b", yaxis_title="a (subtracted)", yaxis_autorange="reversed",
                         template="plotly_white")
    return figure


def _interval(difference: dict) -> str:
    values = [_value_or_nan(difference[key]) for key in ("mean", "ci95_low", "ci95_high")]
    if any(math.isnan(v) for v in values):
        return "n/a"
    return f"{values[0]:+.3f} [{values[1]:+.3f}, {values[2]:+.3f}]"


def _outcome_cell(pair: dict) -> str:
    return "{wins} / {ties} / {losses}".format(**pair["rougeL_outcomes"])


def _leakage_html(comparison: dict) -> str:
    leaked = comparison.get("leakage")
    if leaked is None:
        return ""
    text = (f"<p>{leaked['count']} of {comparison['hold_out']['questions']} hold-out questions have an exact or near "
            f"duplicate in the training data {html.escape(leaked['train_data'])} (content-word Jaccard "
            f"&ge; {leaked['threshold']:g}).</p>\n")
    if not leaked["pairs_without"]:
        return text
    rows = [[pair["a"], pair["b"], _interval(pair["rougeL_difference"]), _outcome_cell(pair)]
            for pair in leaked["pairs_without"]]
    return text + "<h3>Without those questions</h3>\n" + html_report.table(
        ["a", "b", "ROUGE-L b − a", "b wins / ties / loses"], rows, table_id="pairs-without-leaked")


def _detectable_note(pair: dict) -> str:
    """``"; smallest detectable difference 0.031"``, or that the pair's verdict is not conclusive
    (``lib.scores.conclusiveness``); ``""`` for a comparison written without it."""
    conclusion = pair.get("rougeL_verdict")
    if conclusion is None:
        return ""
    if not conclusion["conclusive"]:
        return f"; NOT CONCLUSIVE: {conclusion['reason']}"
    return f"; smallest detectable difference {fmt(conclusion['detectable_difference'])} (95% level, 80% power)"


def _most_changed_html(comparison: dict) -> str:
    """Per pair, the questions b won and lost by most, both answers side by side (``comparison_scores``)."""
    columns = [("category", "category"), ("question", "question"), ("answer_a", "answer of a"),
               ("answer_b", "answer of b"), ("change", "ROUGE-L a → b")]
    parts = []
    for number, pair in enumerate(comparison["pairs"]):
        for kind, verb in (("won", "won"), ("lost", "lost")):
            rows = [{**row, "change": f"{fmt(row['rougeL_a'])} → {fmt(row['rougeL_b'])}"}
                    for row in pair["most_changed"][kind]]
            if rows:
                parts.append(f"<h3>{html.escape(pair['b'])} {verb} by most against {html.escape(pair['a'])}</h3>\n"
                             + html_report.answers_table(rows, columns, table_id=f"most-{kind}-{number}"))
    return html_report.section("Questions that changed most", "".join(parts) or "<p>No question changed.</p>\n",
                               "most-changed-section")


def _judge_html(comparison: dict) -> str:
    judge = comparison.get("judge")
    if judge is None:
        return ""
    pairs = judge["pairs"]
    summary = html_report.table(
        ["a", "b", "b wins / ties / loses", "failed", "position consistency"],
        [[p["a"], p["b"], f"{p['wins']} / {p['ties']} / {p['losses']}", p["failed"],
          pct(_value_or_nan(p["position_consistency"]))] for p in pairs], table_id="judge-pairs")
    questions = html_report.table(
        ["question", *(f"{p['b']} vs {p['a']}" for p in pairs)],
        [[pairs[0]["per_question"][i]["question"], *(p["per_question"][i]["outcome"] for p in pairs)]
         for i in range(len(pairs[0]["per_question"]) if pairs else 0)], table_id="judge-questions")
    text = (f"<p>The judge <code>{html.escape(judge['model'])}</code> compared every pair's answers to each "
            "question in both orders; b wins a question only when preferred in both (any disagreement is a tie; "
            "Zheng et al. 2023). Position consistency is the share of questions whose two verdicts agree.</p>\n")
    return html_report.section("LLM judge", text + summary + "<h3>Question by question</h3>\n" + questions,
                               "judge-section")


def report_html(comparison: dict, rows: list[dict]) -> str:
    """The comparison's page (``lib.html_report``): what was compared, the models' scores, the three
    figures, every pair's differences with CIs, and every answer side by side with a category filter.

    :param comparison: the content of ``comparison.json`` (``compared``).
    :param rows: ``answer_rows``.
    """
    names = list(comparison["models"])
    hold_out, generation = comparison["hold_out"], comparison["generation"]
    intro = (
        f"<p>Base model <code>{html.escape(comparison['base_model_id'])}</code>; "
        f"{hold_out['questions']} hold-out questions from {html.escape(hold_out['source'])}. "
        f"Greedy answers, at most {generation['max_new_tokens']} new tokens; bootstrap seed {comparison['seed']}.</p>\n"
    )
    if hold_out["runs_split_otherwise"]:
        intro += (f"<p><strong>Note:</strong> {html.escape(', '.join(hold_out['runs_split_otherwise']))} split "
                  "another data file or with other split inputs, so may have trained on some of these questions.</p>\n")
    score_rows = [[name, entry["kind"], entry.get("run_dir") or entry.get("path") or entry.get("model_id") or "",
                   entry.get("prompt_format") or "", *(fmt(entry["scores"][k]) for k in ROUGE_TYPES),
                   pct(_value_or_nan(entry["scores"]["eos_stop_rate"])), fmt(entry["scores"]["mean_answer_words"], 1),
                   fmt(entry["scores"]["mean_new_tokens"], 1), pct(_value_or_nan(entry["scores"]["loop_rate"])),
                   fmt(entry["scores"]["distinct_1"]), fmt(entry["scores"]["distinct_2"])]
                  for name, entry in comparison["models"].items()]
    scores_table = html_report.table(
        ["model", "kind", "path", "prompt format", *ROUGE_TYPES, "ends on EOS", "mean words", "mean new tokens", "loop rate", "distinct-1",
         "distinct-2"], score_rows, table_id="scores")
    settings = {name: entry["settings"] for name, entry in comparison["models"].items() if "settings" in entry}
    keys = sorted({key for values in settings.values() for key in values})
    settings_html = html_report.table(["setting", *settings], [[key, *(json.dumps(settings[n].get(key), default=str)
                                                                       for n in settings)] for key in keys],
                                      table_id="settings") if keys else (
        "<p>The runs' recorded settings agree.</p>\n" if settings else "<p>No run of ours is compared: no recorded "
                                                                       "training settings.</p>\n")
    pair_rows = [[pair["a"], pair["b"], *(_interval(pair[f"{m}_difference"]) for m in ("rougeL", *REPETITION_MEASURES)),
                  _outcome_cell(pair), _detectable_note(pair).removeprefix("; ")]
                 for pair in comparison["pairs"]]
    pairs_table = html_report.table(["a", "b", "ROUGE-L b − a", "loop rate b − a", "distinct-1 b − a",
                                     "distinct-2 b − a", "b wins / ties / loses", "ROUGE-L verdict"], pair_rows,
                                    table_id="pairs")
    categories = comparison["per_category"]
    category_table = html_report.table(
        ["category", "questions", *names],
        [[category, next(iter(by_model.values()))["count"], *(fmt(by_model[n]["rougeL"]) for n in names)]
         for category, by_model in categories.items()], table_id="categories")
    answers = [{"question": r["question"], "category": r["category"], "reference": r["reference"],
                **{f"answer-{i}": r["answers"][name]["text"] for i, name in enumerate(names)}} for r in rows]
    columns = [("question", "question"), ("reference", "reference"),
               *((f"answer-{i}", name) for i, name in enumerate(names))]
    body = (
        "<h1>Comparison of fine-tuned models</h1>\n" + intro
        + html_report.section("Scores", scores_table, "scores-section")
        + html_report.section("Settings that differ", settings_html, "settings-section")
        + html_report.section("ROUGE-L", html_report.figure_div(rouge_l_figure(comparison), "rouge-l-figure")
                              + "<h3>Mean ROUGE-L by category</h3>\n" + category_table, "rouge-l-section")
        + html_report.section(
            "Pairwise differences",
            html_report.figure_div(rouge_l_difference_figure(comparison), "rouge-l-difference-figure")
            + "<p class=\"muted\">Each difference is b minus a, the mean over the questions with its 95% paired "
              "percentile bootstrap interval (2,000 resamples of the questions). Question by question, b wins where "
              f"its ROUGE-L is more than {TIE_TOLERANCE:g} above a's, loses where it is more than {TIE_TOLERANCE:g} "
              "below, and ties otherwise.</p>\n" + pairs_table + _leakage_html(comparison),
            "pairs-section")
        + html_report.section("Loops", html_report.figure_div(loop_rate_figure(comparison), "loop-rate-figure"),
                              "loops-section")
        + _most_changed_html(comparison)
        + _judge_html(comparison)
        + html_report.section("Answers", html_report.answers_table(answers, columns, table_id="answers"),
                              "answers-section")
    )
    return html_report.page("philo_dataflow comparison", body)


def train_questions(train_data: str) -> list[str]:
    """The conversations of the data a model was tuned on (any format ``stages.loading.instruction_records``
    reads, keys detected), each its earlier turns and question (``lib.near_duplicates.conversation_text``;
    a single-turn record's is its question), for ``leakage``.

    :raises ValueError: the file cannot be read or holds no question/answer records (one line per problem,
        naming the file).
    """
    return [conversation_text(pair["input_text"], pair["context"])
            for pair in instruction_records(read_records(train_data), train_data, None)]


def leakage(hold_out: list[dict], answers: dict, seed: int, train_data: str, questions: list[str],
            threshold: float, hold_out_texts: Optional[list[str]] = None) -> dict:
    """The hold-out questions with an exact or near duplicate among ``questions`` (the training data of the
    compared models, ``train_questions``: content-word Jaccard ``threshold`` or more,
    ``lib.near_duplicates.leaked_questions``, the split's own measure) and every pair's verdict on the other
    questions.

    :param hold_out_texts: what is compared of each hold-out question, its conversation
        (``lib.near_duplicates.conversation_text``); default: each row's ``question``.

    :return: ``{"train_data", "threshold", "questions": [indices], "count", "pairs_without": [...]}``;
        ``pairs_without`` is ``comparison_scores``' ``pairs`` on the questions left (empty when none is
        left or none leaked).
    """
    leaked = leaked_questions(hold_out_texts or [row["question"] for row in hold_out], questions, threshold)
    kept = [index for index in range(len(hold_out)) if index not in set(leaked)]
    pairs_without = comparison_scores([hold_out[i] for i in kept], {name: [gens[i] for i in kept]
                                                                    for name, gens in answers.items()},
                                      seed)["pairs"] if leaked and kept else []
    return {"train_data": train_data, "threshold": threshold, "questions": leaked, "count": len(leaked),
            "pairs_without": pairs_without}


def judged_pairs(hold_out: list[dict], answers: dict, judge_inputs: dict) -> list[dict]:
    """The LLM judge's pairwise verdict on every pair of models, by the main job's own ``pairwise_judgments``
    node (a ``judge=True`` driver): each question asked in both orders, a model winning only when preferred
    in both (Zheng et al. 2023), with the judge's position consistency.

    :param judge_inputs: the judge inputs (``lib.inputs.JUDGE_INPUTS``: ``judge_model``, ``judge_base_url``...)
        and ``output_dir`` (the judge cache's default home).
    :return: one dict per pair, in ``comparison_scores``' pair order: ``a``, ``b``, the summary of
        ``lib.judge_protocol.pairwise_metrics`` for ``b`` against ``a`` (``wins``, ``ties``, ``losses``,
        ``win_rate``..., ``position_consistency``, ``per_school``) and ``per_question``, one
        ``{"question", "category", "outcome", "position_consistent", "preferred"}`` per question (``outcome``
        for ``b``: ``"win"``, ``"tie"``, ``"loss"`` or ``"failed"``; ``preferred`` per order, by model name).
    :raises ValueError: the judge's settings or endpoint (the judge client's one-line messages).
    """
    driver = build_driver({"judge": True})
    judged = []
    for a, b in itertools.combinations(answers, 2):
        rows = [{**{key: row[key] for key in HOLD_OUT_KEYS}, "base_prediction": answers[a][i]["text"],
                 "finetuned_prediction": answers[b][i]["text"]} for i, row in enumerate(hold_out)]
        records = driver.execute(["pairwise_judgments"], inputs=judge_inputs,
                                 overrides={"hold_out_set_predictions": rows})["pairwise_judgments"]
        named = {"base": a, "finetuned": b, "tie": "tie", None: None}
        judged.append({"a": a, "b": b, **pairwise_metrics(records), "per_question": [
            {"question": r["question"], "category": r["category"], "outcome": r["outcome"],
             "position_consistent": r["position_consistent"],
             "preferred": {f"{named[first]}_first": named[preferred] for (first, preferred) in
                           (("base", r["preferred"]["base_first"]), ("finetuned", r["preferred"]["finetuned_first"]))}}
            for r in records]})
    return judged


def summary_lines(comparison: dict) -> list[str]:
    """A plain-text summary of ``comparison``: each model's ROUGE-L and loop rate, each pair's ROUGE-L
    difference with its CI."""
    lines = [f"{'model':<28} ROUGE-L  loop rate  ends on EOS"]
    for name, entry in comparison["models"].items():
        s = entry["scores"]
        lines.append(f"{one_line(name)[:28]:<28} {fmt(s['rougeL']):>7}  {pct(_value_or_nan(s['loop_rate'])):>9}  "
                     f"{pct(_value_or_nan(s['eos_stop_rate'])):>11}")
    for pair in comparison["pairs"]:
        outcomes = pair["rougeL_outcomes"]
        lines.append(f"ROUGE-L {pair['b']} minus {pair['a']}: {_interval(pair['rougeL_difference'])}; question by "
                     f"question {outcomes['wins']} won, {outcomes['ties']} tied, {outcomes['losses']} lost "
                     f"(±{outcomes['tolerance']:g}){_detectable_note(pair)}")
    for pair in comparison.get("judge", {}).get("pairs", []):
        lines.append(f"judge {comparison['judge']['model']}, {pair['b']} against {pair['a']}: {pair['wins']} won, "
                     f"{pair['ties']} tied, {pair['losses']} lost of {pair['judged']} judged in both orders "
                     f"({pair['failed']} failed); position consistency {pct(_value_or_nan(pair['position_consistency']))}")
    leaked = comparison.get("leakage")
    if leaked is not None:
        lines.append(f"{leaked['count']} of {comparison['hold_out']['questions']} hold-out questions have a near "
                     f"duplicate in {leaked['train_data']} (content-word Jaccard >= {leaked['threshold']:g})"
                     + ("; without them:" if leaked["pairs_without"] else ""))
        lines += [f"  ROUGE-L {pair['b']} minus {pair['a']}: {_interval(pair['rougeL_difference'])}"
                  for pair in leaked["pairs_without"]]
    return lines
