"""Plots: every figure of a run. Nodes return ``plotly.graph_objects.Figure``; ``report.report_html`` puts them on
the run's HTML report."""

import math

import plotly.graph_objects as go
from hamilton.function_modifiers import tag
from plotly.subplots import make_subplots

from ..lib.judge_protocol import CRITERIA
from ..lib.switches import when


@tag(output="final")
def loss_curve_figure(training_log_history: list[dict]) -> go.Figure:
    """Training and validation loss (nats per supervised token) against optimizer step.

    :param training_log_history: the Trainer's log entries (``loss`` / ``eval_loss`` with ``step``).
    """
    figure = go.Figure()
    for key, name in (("loss", "train loss"), ("eval_loss", "validation loss")):
        points = [(e["step"], e[key]) for e in training_log_history if key in e]
        figure.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=name,
        ))
    figure.update_layout(
        title="Training and validation loss", xaxis_title="optimizer step",
        yaxis_title="cross-entropy (nats / supervised token)", template="plotly_white",
    )
    return figure


@tag(output="final")
def learning_rate_figure(training_log_history: list[dict]) -> go.Figure:
    """The learning rate of each logged optimizer step (the scheduler's value, warm-up and decay included).

    :param training_log_history: the Trainer's log entries (``learning_rate`` with ``step``).
    """
    points = [(e["step"], e["learning_rate"]) for e in training_log_history if "learning_rate" in e]
    figure = go.Figure(go.Scatter(
        x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name="learning rate",
    ))
    figure.update_layout(
        title="Learning rate", xaxis_title="optimizer step", yaxis_title="learning rate",
        yaxis_exponentformat="e", template="plotly_white",
    )
    return figure


@tag(output="final")
def answer_length_figure(hold_out_set_predictions: list[dict]) -> go.Figure:
    """Distribution of hold-out answer lengths (whitespace-separated words per answer), base vs
    fine-tuned (overlaid histograms)."""
    figure = go.Figure()
    for model, name in (("base", "base model"), ("finetuned", "fine-tuned")):
        figure.add_trace(go.Histogram(
            x=[len(r[f"{model}_prediction"].split()) for r in hold_out_set_predictions], name=name, opacity=0.6,
        ))
    figure.update_layout(
        title="Hold-out answer lengths", xaxis_title="words per answer", yaxis_title="answers",
        barmode="overlay", template="plotly_white",
    )
    return figure


@tag(output="final")
def rouge_comparison_figure(hold_out_set_metrics: dict) -> go.Figure:
    """Hold-out ROUGE-L of base vs fine-tuned answers, overall and per category (grouped bars)."""
    categories = ["overall", *hold_out_set_metrics["per_category"]]
    figure = go.Figure()
    for model, name in (("base", "base model"), ("finetuned", "fine-tuned")):
        values = [hold_out_set_metrics[model]["rougeL"]] + [
            hold_out_set_metrics["per_category"][c][model]["rougeL"] for c in categories[1:]
        ]
        figure.add_trace(go.Bar(x=categories, y=values, name=name))
    figure.update_layout(
        title="Hold-out ROUGE-L, base vs fine-tuned", yaxis_title="ROUGE-L F-measure",
        barmode="group", template="plotly_white",
    )
    return figure


@when(judge=True)
def judge_comparison_figure(judge_metrics: dict) -> go.Figure:
    """Judge results: mean rubric score (1–5) of base vs fine-tuned per criterion, overall and per
    school (one panel per criterion, grouped bars), and the fine-tuned model's pairwise win / tie / loss
    rates with the judge's position consistency."""
    rubric, pairwise = judge_metrics["rubric"], judge_metrics["pairwise"]
    schools = list(rubric["per_school"])
    titles = [c.replace("_", " ") for c in CRITERIA] + [
        f"pairwise (position consistency {pairwise['position_consistency']:.0%})"
        if not math.isnan(pairwise["position_consistency"]) else "pairwise"
    ]
    figure = make_subplots(rows=1, cols=len(CRITERIA) + 1, subplot_titles=titles)
    for column, criterion in enumerate(CRITERIA, start=1):
        for model, name, color in (("base", "base model", "#636efa"), ("finetuned", "fine-tuned", "#ef553b")):
            figure.add_trace(go.Bar(
                x=["overall", *schools],
                y=[rubric[model][criterion]] + [rubric["per_school"][s][model][criterion] for s in schools],
                name=name, legendgroup=model, showlegend=column == 1, marker_color=color,
            ), row=1, col=column)
        figure.update_yaxes(range=[0, 5], row=1, col=column)
    figure.add_trace(go.Bar(
        x=["win", "tie", "loss"], y=[pairwise["win_rate"], pairwise["tie_rate"], pairwise["loss_rate"]],
        name="fine-tuned vs base", marker_color="#00cc96",
    ), row=1, col=len(CRITERIA) + 1)
    figure.update_yaxes(title_text="mean score (1–5)", row=1, col=1)
    figure.update_yaxes(range=[0, 1], title_text="share of questions", row=1, col=len(CRITERIA) + 1)
    settings = judge_metrics["settings"]
    figure.update_layout(
        title=f"LLM judge ({settings['model']}, {settings['prompt_version']}): base vs fine-tuned",
        barmode="group", template="plotly_white",
    )
    return figure
