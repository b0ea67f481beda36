"""Stage 8 — ROUGE of base and fine-tuned answers, overall and per category, with a bootstrap CI.

ROUGE (Lin 2004) is computed by Google's ``rouge_score`` package (no network), F-measure, Porter
stemming. ROUGE-Lsum needs sentences on separate lines; sentences are split after ``.``, ``!`` or ``?``
followed by whitespace.
"""

import logging
import random
import re
from collections import defaultdict

from rouge_score import rouge_scorer

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
MODELS = ("base", "finetuned")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences_on_lines(text: str) -> str:
    return "\n".join(_SENTENCE_END.split(text.strip()))


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict]:
    """ROUGE F-measures of each prediction against its reference.

    :return: one dict per pair, keys ``ROUGE_TYPES``, values in [0, 1].
    :raises ValueError: the lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [
        {name: score.fmeasure for name, score in scorer.score(_sentences_on_lines(ref), _sentences_on_lines(pred)).items()}
        for pred, ref in zip(predictions, references)
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summary(rows: list[dict], model: str, scores: list[dict]) -> dict:
    return {
        **{name: _mean([s[name] for s in scores]) for name in ROUGE_TYPES},
        "eos_stop_rate": _mean([float(r[f"{model}_ended_on_eos"]) for r in rows]),
        "mean_answer_words": _mean([len(r[f"{model}_prediction"].split()) for r in rows]),
        "mean_new_tokens": _mean([r[f"{model}_new_tokens"] for r in rows]),
        "count": len(rows),
    }


def bootstrap_mean_difference_ci(
    differences: list[float], seed: int, samples: int = 2000, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13) of the mean of paired differences.

    :return: (low, high) bounds of the ``confidence`` interval.
    """
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(_mean([differences[rng.randrange(n)] for _ in range(n)]) for _ in range(samples))
    tail = (1 - confidence) / 2
    return means[int(tail * samples)], means[min(samples - 1, int((1 - tail) * samples))]


def hold_out_set_metrics(hold_out_set_predictions: list[dict], seed: int = 42) -> dict:
    """ROUGE, EOS-stop rate and answer length of base and fine-tuned answers on the hold-out set.

    :return: ``{"base": {...}, "finetuned": {...}, "per_category": {category: {"base": {...},
        "finetuned": {...}}}, "rougeL_difference": {"mean", "ci95_low", "ci95_high"}}``; each model
        summary holds ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum`` (mean F-measure, 0–1),
        ``eos_stop_rate`` (share of answers that ended on EOS), ``mean_answer_words``,
        ``mean_new_tokens`` and ``count``. The CI is a 2,000-sample percentile bootstrap of the mean
        per-question ROUGE-L difference (fine-tuned minus base).
    """
    rows = hold_out_set_predictions
    references = [r["reference"] for r in rows]
    scores = {m: rouge_per_example([r[f"{m}_prediction"] for r in rows], references) for m in MODELS}
    result = {m: _summary(rows, m, scores[m]) for m in MODELS}
    by_category = defaultdict(list)
    for index, row in enumerate(rows):
        by_category[row["category"]].append(index)
    result["per_category"] = {
        category: {m: _summary([rows[i] for i in idx], m, [scores[m][i] for i in idx]) for m in MODELS}
        for category, idx in sorted(by_category.items())
    }
    differences = [t["rougeL"] - b["rougeL"] for t, b in zip(scores["finetuned"], scores["base"])]
    low, high = bootstrap_mean_difference_ci(differences, seed)
    result["rougeL_difference"] = {"mean": _mean(differences), "ci95_low": low, "ci95_high": high}
    return result


def validation_set_metrics(validation_predictions: list[str], validation_references: list[str]) -> dict:
    """Mean ROUGE F-measures (0–1) of the fine-tuned model's answers on the validation set."""
    scores = rouge_per_example(validation_predictions, validation_references)
    return {name: _mean([s[name] for s in scores]) for name in ROUGE_TYPES}


def training_and_validation_set_metrics(fit_trainer_eval_metrics: dict, hold_out_set_metrics: dict) -> dict:
    """The kept checkpoint's validation loss and training facts, with the hold-out comparison.

    :return: ``{"validation": fit_trainer_eval_metrics, "hold_out": hold_out_set_metrics}``.
    """
    return {"validation": fit_trainer_eval_metrics, "hold_out": hold_out_set_metrics}
