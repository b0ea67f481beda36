"""Stage 10 — the run's metrics in one dict and a Markdown report for people."""

import datetime
import math

from .metrics import ROUGE_TYPES


def run_metrics(
    training_and_validation_set_metrics: dict,
    model_summary: dict,
    tokenization_stats: dict,
    split_summary: dict,
    base_model_id: str,
    data_path: str,
) -> dict:
    """Everything ``metrics.json`` holds: validation loss and training facts, hold-out ROUGE / EOS /
    length for base and fine-tuned (overall, per category, ROUGE-L difference CI), the model summary,
    tokenization and split statistics."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_id": base_model_id,
        "data_path": data_path,
        **training_and_validation_set_metrics,
        "model_summary": model_summary,
        "tokenization": tokenization_stats,
        "splits": split_summary,
    }


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def report_markdown(run_metrics: dict, hold_out_set_predictions: list[dict], report_examples: int = 3) -> str:
    """A Markdown report: hold-out comparison, per-category ROUGE-L, validation loss, sample answers.

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
        f"On {base['count']} hold-out questions the fine-tuned model is **{verdict}** the base model by ROUGE-L: "
        f"difference {_fmt(diff['mean'])} (bootstrap 95% CI {_fmt(diff['ci95_low'])} to {_fmt(diff['ci95_high'])}).",
        "",
        "| hold-out | " + " | ".join(ROUGE_TYPES) + " | EOS-stop rate | mean words | mean new tokens |",
        "|---|" + "---|" * (len(ROUGE_TYPES) + 3),
    ]
    for name, summary in (("base", base), ("fine-tuned", tuned)):
        lines.append(
            f"| {name} | " + " | ".join(_fmt(summary[t]) for t in ROUGE_TYPES)
            + f" | {_fmt(summary['eos_stop_rate'], 2)} | {_fmt(summary['mean_answer_words'], 1)}"
            + f" | {_fmt(summary['mean_new_tokens'], 1)} |"
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
            [_fmt(pair["base"]["rougeL"]), _fmt(pair["finetuned"]["rougeL"]),
             f"{pair['finetuned']['rougeL'] - pair['base']['rougeL']:+.3f}"] if pair else ["—", "—", "—"]
        )
        counts = [str(splits[name]["per_category"].get(category, 0)) for name in split_names]
        lines.append(f"| {category} | " + " | ".join(counts + scores) + " |")
    lines += [
        "",
        f"Validation loss of the kept checkpoint: {_fmt(validation.get('eval_loss'), 4)} "
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
            f"**Q ({row['category']}):** {_one_line(row['question'])}",
            "",
            f"- *reference:* {_one_line(row['reference'])}",
            f"- *base:* {_one_line(row['base_prediction'])}",
            f"- *fine-tuned:* {_one_line(row['finetuned_prediction'])}",
        ]
    return "\n".join(lines) + "\n"
