"""Report: the run's metrics in one dict (``metrics.json``) and a Markdown report for people, with an
LLM-judge section when the run was judged."""

import datetime
from typing import Optional

from hamilton.function_modifiers import tag

from .lib.formatting import fmt, one_line, pct
from .lib.judge_protocol import CRITERIA
from .lib.scores import ROUGE_TYPES


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
    judge_results: Optional[dict],
) -> dict:
    """Everything ``metrics.json`` holds: validation loss and training facts, hold-out ROUGE / EOS /
    length for base and fine-tuned (overall, per category, ROUGE-L difference CI), the model summary,
    tokenization and split statistics, the generation settings, what ``overlong_policy`` did
    (``overlong``), and ``judge`` (``judging.judge_metrics``) when the run was judged."""
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


@tag(output="final")
def report_markdown(run_metrics: dict, hold_out_set_predictions: list[dict], report_examples: int = 3) -> str:
    """A Markdown report: hold-out comparison, per-category ROUGE-L, validation loss, sample answers, and
    the LLM judge's results when ``run_metrics`` holds them.

    :param report_examples: hold-out questions shown with both answers.
    """
    hold_out, validation = run_metrics["hold_out"], run_metrics["validation"]
    base, tuned, diff = hold_out["base"], hold_out["finetuned"], hold_out["rougeL_difference"]
    verdict = (
        "better than" if diff["ci95_low"] > 0 else "worse than" if diff["ci95_high"] < 0 else "not distinguishable from"
    )
    lines = [
        f"# Fine-tuning report: {run_metrics['model_id']}",
        "",
        f"Data: `{run_metrics['data_path']}`; splits: "
        + ", ".join(f"{name} {s['total']}" for name, s in run_metrics["splits"].items())
        + f". Created {run_metrics['created']}.",
        "",
        _decoding_line(run_metrics["generation_settings"]),
        *_overlong_lines(run_metrics["overlong"]),
        "",
        f"On {base['count']} hold-out questions the fine-tuned model is **{verdict}** the base model by ROUGE-L: "
        f"difference {fmt(diff['mean'])} (bootstrap 95% CI {fmt(diff['ci95_low'])} to {fmt(diff['ci95_high'])}).",
        "",
        "| hold-out | " + " | ".join(ROUGE_TYPES) + " | EOS-stop rate | mean words | mean new tokens |",
        "|---|" + "---|" * (len(ROUGE_TYPES) + 3),
    ]
    for name, summary in (("base", base), ("fine-tuned", tuned)):
        lines.append(
            f"| {name} | " + " | ".join(fmt(summary[t]) for t in ROUGE_TYPES)
            + f" | {fmt(summary['eos_stop_rate'], 2)} | {fmt(summary['mean_answer_words'], 1)}"
            + f" | {fmt(summary['mean_new_tokens'], 1)} |"
        )
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
        f"Validation loss of the kept checkpoint: {fmt(validation.get('eval_loss'), 4)} "
        f"(steps {validation.get('global_step', 'n/a')}, stopped early: {validation.get('stopped_early', 'n/a')}).",
        f"Trainable parameters: {run_metrics['model_summary']['trainable_parameters']:,} of "
        f"{run_metrics['model_summary']['total_parameters']:,}.",
        "",
        "## Sample hold-out answers",
    ]
    for row in hold_out_set_predictions[:report_examples]:
        # Answers may hold blank lines; joined, each stays inside its Markdown list item.
        lines += [
            "",
            f"**Q ({row['category']}):** {one_line(row['question'])}",
            "",
            f"- *reference:* {one_line(row['reference'])}",
            f"- *base:* {one_line(row['base_prediction'])}",
            f"- *fine-tuned:* {one_line(row['finetuned_prediction'])}",
        ]
    report = "\n".join(lines) + "\n"
    return _judge_section(report, run_metrics["judge"]) if "judge" in run_metrics else report


def _judge_section(report_markdown: str, judge_metrics: dict) -> str:
    """``report_markdown`` with an "LLM judge" section: rubric means with answer lengths, per-school
    means, pairwise win / tie / loss, position consistency, and how the judge was asked."""
    settings, rubric, pairwise = judge_metrics["settings"], judge_metrics["rubric"], judge_metrics["pairwise"]
    calls = judge_metrics["calls"]
    lines = [
        "",
        "## LLM judge",
        "",
        f"Judge `{settings['model']}` at `{settings['base_url']}`, prompt {settings['prompt_version']}, temperature "
        f"{settings['temperature']}, response format {settings['response_format']}. {calls['judgments']} judgments, "
        f"{calls['failed']} failed (recorded in `judgments.jsonl`), {calls['replies_from_cache']} of "
        f"{calls['replies']} replies from the cache.",
        "",
        "| rubric (mean 1–5) | " + " | ".join(c.replace("_", " ") for c in CRITERIA) + " | judged | failed | mean words |",
        "|---|" + "---|" * (len(CRITERIA) + 3),
    ]
    for model, name in (("base", "base"), ("finetuned", "fine-tuned")):
        s = rubric[model]
        lines.append(f"| {name} | " + " | ".join(fmt(s[c], 2) for c in CRITERIA)
                     + f" | {s['judged']} | {s['failed']} | {fmt(s['mean_answer_words'], 1)} |")
    d = rubric["finetuned_minus_base"]
    lines.append("| fine-tuned − base | " + " | ".join(fmt(d[c], 2) for c in CRITERIA)
                 + f" | {d['paired_questions']} pairs | | |")
    lines += ["", "| school | model | " + " | ".join(c.replace("_", " ") for c in CRITERIA) + " | mean words |",
              "|---|---|" + "---|" * (len(CRITERIA) + 1)]
    for school, pair in rubric["per_school"].items():
        for model, name in (("base", "base"), ("finetuned", "fine-tuned")):
            s = pair[model]
            lines.append(f"| {school} | {name} | " + " | ".join(fmt(s[c], 2) for c in CRITERIA)
                         + f" | {fmt(s['mean_answer_words'], 1)} |")
    words = pairwise["mean_answer_words"]
    lines += [
        "",
        f"Pairwise, asked in both orders (a win only when both orders agree; Zheng et al. 2023), on "
        f"{pairwise['judged']} of {pairwise['questions']} questions: fine-tuned **wins {pct(pairwise['win_rate'])}, "
        f"ties {pct(pairwise['tie_rate'])}, loses {pct(pairwise['loss_rate'])}** "
        f"({pairwise['wins']} / {pairwise['ties']} / {pairwise['losses']}). Position consistency of the judge: "
        f"{pct(pairwise['position_consistency'])} (answer shown first preferred in both orders: "
        f"{pct(pairwise['first_position_preferred_rate'])}, second: {pct(pairwise['second_position_preferred_rate'])}). "
        f"Mean answer words: base {fmt(words['base'], 1)}, fine-tuned {fmt(words['finetuned'], 1)}; the longer "
        f"answer won {pct(pairwise['longer_answer_won_share'])} of decisive pairs.",
    ]
    return report_markdown.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
