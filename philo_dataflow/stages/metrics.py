"""Metrics: ROUGE of base and fine-tuned answers, overall and per category, with a bootstrap CI of the
difference: ``lib.scores.verdict`` for two models, the same function ``philo-dataflow compare`` scores any
models with."""

import logging

from hamilton.function_modifiers import tag

from ..lib.scores import MODELS, REPETITION_MEASURES, ROUGE_TYPES, mean, rouge_per_example, verdict

logger = logging.getLogger(__name__)


@tag(output="final")
def hold_out_set_metrics(hold_out_set_predictions: list[dict], seed: int = 42, tie_tolerance: float = 0.05,
                         most_changed_questions: int = 3) -> dict:
    """ROUGE, EOS-stop rate and answer length of base and fine-tuned answers on the hold-out set.

    :return: ``{"base": {...}, "finetuned": {...}, "per_category": {category: {"base": {...},
        "finetuned": {...}}}, "rougeL_difference": {"mean", "ci95_low", "ci95_high"}}``; each model
        summary holds ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum`` (mean F-measure, 0–1),
        ``eos_stop_rate`` (share of answers that ended on EOS), ``mean_answer_words``,
        ``mean_new_tokens``, the repetition measures ``loop_rate`` (share of answers in which some word
        4-gram occurs 3 or more times), ``distinct_1`` and ``distinct_2`` (Li et al. 2016; see
        ``lib.scores``) and ``count``. The CI is a 2,000-sample percentile bootstrap of the mean
        per-question ROUGE-L difference (fine-tuned minus base); ``repetition_difference`` holds the
        repetition measures' differences (fine-tuned minus base) with their paired bootstrap CIs,
        ``{measure: {"mean", "ci95_low", "ci95_high"}}``. Question by question (``lib.scores.per_question_outcomes``):
        ``rougeL_outcomes`` counts the questions the fine-tuned answer wins, ties and loses against the base
        answer (ROUGE-L difference beyond ``tie_tolerance``), overall and per category; ``most_changed``
        holds the ``most_changed_questions`` questions won and lost by most, ``{"won": [...], "lost":
        [...]}``, each ``{"question", "category", "reference", "base_prediction", "finetuned_prediction",
        "base_rougeL", "finetuned_rougeL", "rougeL_difference"}``. ``rougeL_verdict``
        (``lib.scores.conclusiveness``) says whether so many questions can give a verdict (at least
        ``lib.scores.MIN_HOLD_OUT_QUESTIONS``) and the smallest ROUGE-L difference they could detect.
    """
    rows = hold_out_set_predictions
    answers = {m: {"texts": [r[f"{m}_prediction"] for r in rows], "ended_on_eos": [r[f"{m}_ended_on_eos"] for r in rows],
                   "new_tokens": [r[f"{m}_new_tokens"] for r in rows]} for m in MODELS}
    scored = verdict([r["reference"] for r in rows], [r["category"] for r in rows], answers, seed, tie_tolerance,
                     most_changed_questions)
    (pair,) = scored["pairs"]  # finetuned minus base
    result = {m: scored["models"][m] for m in MODELS}
    result["per_category"] = scored["per_category"]
    result["rougeL_difference"] = pair["rougeL_difference"]
    result["repetition_difference"] = {measure: pair[f"{measure}_difference"] for measure in REPETITION_MEASURES}
    result["rougeL_outcomes"] = pair["rougeL_outcomes"]
    result["rougeL_verdict"] = pair["rougeL_verdict"]
    base_rouge_l, finetuned_rouge_l = (scored["rougeL_per_question"][m] for m in MODELS)
    result["most_changed"] = {kind: [_changed_question(rows[i], base_rouge_l[i], finetuned_rouge_l[i]) for i in indices]
                              for kind, indices in pair["most_changed"].items()}
    return result


def _changed_question(row: dict, base_rouge_l: float, finetuned_rouge_l: float) -> dict:
    return {**{key: row[key] for key in ("question", "category", "reference", "base_prediction",
                                         "finetuned_prediction")},
            "base_rougeL": base_rouge_l, "finetuned_rougeL": finetuned_rouge_l,
            "rougeL_difference": finetuned_rouge_l - base_rouge_l}


@tag(output="final")
def validation_set_metrics(validation_predictions: list[str], validation_references: list[str]) -> dict:
    """Mean ROUGE F-measures (0–1) of the fine-tuned model's answers on the validation set."""
    scores = rouge_per_example(validation_predictions, validation_references)
    return {name: mean([s[name] for s in scores]) for name in ROUGE_TYPES}


@tag(output="final")
def training_and_validation_set_metrics(fit_trainer_eval_metrics: dict, hold_out_set_metrics: dict) -> dict:
    """The kept checkpoint's validation loss and training facts, with the hold-out comparison.

    :return: ``{"validation": fit_trainer_eval_metrics, "hold_out": hold_out_set_metrics}``.
    """
    return {"validation": fit_trainer_eval_metrics, "hold_out": hold_out_set_metrics}
