"""Stage 9 — plotly figures. Nodes return ``plotly.graph_objects.Figure``; ``saving`` writes them."""

import plotly.graph_objects as go


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
