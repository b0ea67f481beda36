"""Scores of answers: ROUGE (Lin 2004) by Google's ``rouge_score`` package (no network; F-measure, Porter
stemming; ROUGE-Lsum needs sentences on separate lines, split after ``.``, ``!`` or ``?`` followed by
whitespace) and the percentile bootstrap of a paired mean difference."""

import random
import re

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
#: The two models every comparison has: the base model (adapter disabled) and the fine-tuned one.
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


def mean(values: list[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return sum(values) / len(values) if values else float("nan")


def bootstrap_mean_difference_ci(
    differences: list[float], seed: int, samples: int = 2000, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13) of the mean of paired differences.

    :return: (low, high) bounds of the ``confidence`` interval.
    """
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(mean([differences[rng.randrange(n)] for _ in range(n)]) for _ in range(samples))
    tail = (1 - confidence) / 2
    return means[int(tail * samples)], means[min(samples - 1, int((1 - tail) * samples))]
