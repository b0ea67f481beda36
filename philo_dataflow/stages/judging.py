"""Judging (with config ``judge=True``): an LLM judge compares base and fine-tuned hold-out answers by
rubric grades and by pairwise verdicts asked in both orders (the protocol: ``lib.judge_protocol``; the
client, cache and probe: ``lib.judge_client``). Only this configuration needs the ``judge_*`` inputs; its
results join ``run_metrics`` and the report, and ``saving`` writes ``judgments.jsonl`` and the figure.
"""

import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional

from hamilton.function_modifiers import cache

from ..lib.artifacts import JUDGE_CACHE_DIR
from ..lib.judge_client import (
    JudgeCache,
    JudgeClient,
    JudgeRequest,
    ask_each,
    detect_response_format,
    make_judge_client,
)
from ..lib.judge_protocol import (
    CRITERIA,
    JUDGE_TEMPERATURE,
    PAIR_ORDERS,
    PAIRWISE_SCHEMA,
    PAIRWISE_SYSTEM_PROMPT,
    PROMPT_VERSION,
    RUBRIC,
    RUBRIC_SCHEMA,
    RUBRIC_SYSTEM_PROMPT,
    PairwiseJudgment,
    RubricJudgment,
    check_judge_settings,
    checked_rows,
    pair_outcome,
    pairwise_metrics,
    preferred_model,
    shown_answer,
    word_count,
)
from ..lib.scores import MODELS, mean
from ..lib.switches import when

logger = logging.getLogger(__name__)


@when(judge=True)
def judge_client(
    judge_model: str,
    judge_base_url: str = "https://api.openai.com/v1",
    judge_api_key_env: str = "OPENAI_API_KEY",
    judge_timeout: float = 120.0,
    judge_max_retries: int = 4,
) -> JudgeClient:
    """The judge endpoint's OpenAI client and model name (``lib.judge_client.make_judge_client``: what
    each input means, how the key is found, and the errors it raises)."""
    return make_judge_client(judge_model, judge_base_url, judge_api_key_env, judge_timeout, judge_max_retries)


@when(judge=True)
@cache(behavior="recompute")
def judge_cache(output_dir: str = "outputs", judge_cache_dir: Optional[str] = None) -> JudgeCache:
    """The on-disk cache of judge replies: ``judge_cache_dir``, or ``<output_dir>/judge_cache``.

    Share one ``judge_cache_dir`` between runs to never pay twice for the same request.
    """
    return JudgeCache(judge_cache_dir or str(Path(output_dir) / JUDGE_CACHE_DIR))


@when(judge=True)
def resolved_judge_response_format(
    judge_client: JudgeClient, judge_cache: JudgeCache, judge_response_format: str = "auto"
) -> str:
    """``"json_schema"`` or ``"json_object"``: the structured-output form of the judge's requests, forced
    by ``judge_response_format`` or, with ``"auto"``, probed (``lib.judge_client.detect_response_format``).

    :raises ValueError: ``judge_response_format`` is not one of ``lib.judge_protocol.RESPONSE_FORMATS``.
    """
    return detect_response_format(judge_client, judge_cache, judge_response_format)


@when(judge=True)
def judge_request(
    judge_client: JudgeClient,
    judge_cache: JudgeCache,
    resolved_judge_response_format: str,
    judge_max_concurrency: int = 4,
    judge_max_tokens: int = 512,
    judge_malformed_retries: int = 2,
    judge_rationale_max_chars: int = 400,
) -> JudgeRequest:
    """How every judgment is asked (``lib.judge_client.JudgeRequest``), its settings checked once.

    :param judge_max_concurrency: judge requests in flight at once.
    :param judge_max_tokens: cap on tokens of one judge reply.
    :param judge_malformed_retries: re-asks of a reply that does not validate before it is recorded as
        a failure.
    :param judge_rationale_max_chars: cap on each rationale's characters in ``json_object`` mode
        (grammar-constrained local servers); see ``lib.judge_protocol.response_format_of``.
    :raises ValueError: a setting is out of range (all of them in one message).
    """
    check_judge_settings(judge_max_concurrency, judge_max_tokens, judge_malformed_retries, judge_rationale_max_chars)
    return JudgeRequest(judge_client, judge_cache, resolved_judge_response_format, judge_max_concurrency,
                        judge_max_tokens, judge_malformed_retries, judge_rationale_max_chars)


@when(judge=True)
@cache(behavior="recompute")
def rubric_judgments(hold_out_set_predictions: list[dict], judge_request: JudgeRequest) -> list[dict]:
    """Rubric grades of every hold-out answer of the base and the fine-tuned model, each answer graded
    alone (single-answer grading with a reference, Zheng et al. 2023) against ``RUBRIC``.

    :param hold_out_set_predictions: rows with ``question``, ``category`` (school of thought),
        ``reference``, ``base_prediction``, ``finetuned_prediction``.
    :return: 2 × rows records, ``index``-major, base then fine-tuned: ``kind`` = ``"rubric"``,
        ``index`` (row), ``category``, ``question``, ``model`` (``"base"`` | ``"finetuned"``),
        ``answer_words``, and ``ask_judgment``'s ``status`` / ``judgment`` (``{criterion: {"rationale",
        "score"}}``) / ``raw`` / ``error`` / ``attempts``.
    :raises ValueError: rows are missing or lack keys.
    """
    rows = checked_rows(hold_out_set_predictions)
    records, conversations = [], []
    for index, row in enumerate(rows):
        for model in MODELS:
            answer = row[f"{model}_prediction"]
            messages = [
                {"role": "system", "content": RUBRIC_SYSTEM_PROMPT},
                {"role": "user", "content": f"School of thought: {row['category']}\n\n[Question]\n{row['question']}"
                                            f"\n\n[Reference answer]\n{row['reference']}\n\n[Answer to grade]\n"
                                            f"{shown_answer(answer)}"},
            ]
            records.append({"kind": "rubric", "index": index, "category": row["category"],
                            "question": row["question"], "model": model, "answer_words": word_count(answer)})
            conversations.append(messages)
    results = ask_each(judge_request, conversations, RubricJudgment, "rubric_judgment", RUBRIC_SCHEMA, "judge: rubric")
    records = [{**record, **result} for record, result in zip(records, results)]
    failed = sum(r["status"] == "failed" for r in records)
    logger.info("rubric judgments: %d, failed %d", len(records), failed)
    return records


@when(judge=True)
@cache(behavior="recompute")
def pairwise_judgments(hold_out_set_predictions: list[dict], judge_request: JudgeRequest) -> list[dict]:
    """Pairwise verdicts base vs fine-tuned on every hold-out question, asked in both orders (answer A
    = base, then answer A = fine-tuned), combined as in Zheng et al. 2023 (see ``pair_outcome``).

    :return: one record per question: ``kind`` = ``"pairwise"``, ``index``, ``category``, ``question``,
        ``answer_words`` (``{"base", "finetuned"}``), ``base_first`` and ``finetuned_first`` (each
        ``ask_judgment``'s record, ``judgment`` = ``{"rationale", "verdict"}`` with verdict ``"A"`` | ``"B"``
        | ``"tie"``), ``preferred`` (``{order: "base" | "finetuned" | "tie" | None}``), ``outcome`` for
        the fine-tuned model (``"win"`` | ``"tie"`` | ``"loss"`` | ``"failed"``), ``position_consistent``
        (bool, None when an order failed).
    :raises ValueError: rows are missing or lack keys.
    """
    rows = checked_rows(hold_out_set_predictions)
    conversations = []
    for row in rows:
        for order in PAIR_ORDERS:
            a, b = ("base", "finetuned") if order == "base_first" else ("finetuned", "base")
            messages = [
                {"role": "system", "content": PAIRWISE_SYSTEM_PROMPT},
                {"role": "user", "content": f"School of thought: {row['category']}\n\n[Question]\n{row['question']}"
                                            f"\n\n[Reference answer]\n{row['reference']}\n\n[Answer A]\n"
                                            f"{shown_answer(row[f'{a}_prediction'])}\n\n[Answer B]\n"
                                            f"{shown_answer(row[f'{b}_prediction'])}"},
            ]
            conversations.append(messages)
    results = ask_each(judge_request, conversations, PairwiseJudgment, "pairwise_judgment", PAIRWISE_SCHEMA,
                       "judge: pairwise")
    records = []
    for index, row in enumerate(rows):
        calls = dict(zip(PAIR_ORDERS, results[2 * index : 2 * index + 2]))
        verdicts = {o: c["judgment"]["verdict"] if c["status"] == "ok" else None for o, c in calls.items()}
        outcome, consistent = pair_outcome(verdicts["base_first"], verdicts["finetuned_first"])
        records.append({
            "kind": "pairwise", "index": index, "category": row["category"], "question": row["question"],
            "answer_words": {m: word_count(row[f"{m}_prediction"]) for m in MODELS},
            **calls,
            "preferred": {o: preferred_model(o, v) for o, v in verdicts.items()},
            "outcome": outcome, "position_consistent": consistent,
        })
    logger.info("pairwise judgments: %d questions, %d failed", len(records), sum(r["outcome"] == "failed" for r in records))
    return records


def _rubric_summary(records: list[dict]) -> dict:
    judged = [r for r in records if r["status"] == "ok"]
    return {
        **{c: mean([r["judgment"][c]["score"] for r in judged]) for c in CRITERIA},
        "judged": len(judged),
        "failed": len(records) - len(judged),
        "mean_answer_words": mean([r["answer_words"] for r in records]),
    }


def _rubric_metrics(records: list[dict]) -> dict:
    by_model = {m: [r for r in records if r["model"] == m] for m in MODELS}
    result: dict = {m: _rubric_summary(by_model[m]) for m in MODELS}
    scores = {(r["index"], r["model"]): r["judgment"] for r in records if r["status"] == "ok"}
    both = sorted({i for i, m in scores if m == "base"} & {i for i, m in scores if m == "finetuned"})
    result["finetuned_minus_base"] = {
        c: mean([scores[(i, "finetuned")][c]["score"] - scores[(i, "base")][c]["score"] for i in both]) for c in CRITERIA
    }
    result["finetuned_minus_base"]["paired_questions"] = len(both)
    schools = defaultdict(list)
    for record in records:
        schools[record["category"]].append(record)
    result["per_school"] = {
        school: {m: _rubric_summary([r for r in rows if r["model"] == m]) for m in MODELS}
        for school, rows in sorted(schools.items(), key=lambda item: str(item[0]))
    }
    return result


@when(judge=True)
def judge_settings(judge_request: JudgeRequest) -> dict:
    """What the judge was asked and how, recorded with every judged result: model, endpoint (without
    credentials), temperature, max tokens, response format, prompt version, rubric, system prompts and
    sources."""
    request = judge_request
    return {
        "model": request.client.model,
        "base_url": request.client.public_base_url,
        "temperature": JUDGE_TEMPERATURE,
        "max_tokens": request.max_tokens,
        "malformed_retries": request.malformed_retries,
        "response_format": request.response_format,
        "rationale_max_chars": request.rationale_max_chars if request.response_format == "json_object" else None,
        "prompt_version": PROMPT_VERSION,
        "rubric": RUBRIC,
        "prompts": {"rubric": RUBRIC_SYSTEM_PROMPT, "pairwise": PAIRWISE_SYSTEM_PROMPT},
        "sources": [
            "Zheng et al. 2023, Judging LLM-as-a-judge with MT-Bench and Chatbot Arena (pairwise in both orders, "
            "reference-guided grading, position and verbosity bias)",
            "Liu et al. 2023, G-Eval (rationale before score)",
            "Kim et al. 2024, Prometheus (1-5 score rubrics with a reference answer)",
        ],
    }


def _call_counts(rubric_judgments: list[dict], pairwise_judgments: list[dict]) -> dict:
    calls = rubric_judgments + [p[o] for p in pairwise_judgments for o in PAIR_ORDERS]
    attempts = [a for c in calls for a in c["attempts"]]
    return {
        "judgments": len(calls),
        "failed": sum(c["status"] == "failed" for c in calls),
        "replies": len(attempts),
        "replies_from_cache": sum(a["cached"] for a in attempts),
        "malformed_replies": sum(a["error"] is not None and a["raw"] is not None for a in attempts),
    }


@when(judge=True)
def judge_metrics(rubric_judgments: list[dict], pairwise_judgments: list[dict], judge_settings: dict) -> dict:
    """Judged comparison of base vs fine-tuned hold-out answers; joins ``metrics.json`` as ``"judge"``.

    :return: ``settings`` (``judge_settings``); ``rubric``: per model (``base``, ``finetuned``) the mean
        score (1–5) of each criterion over validated judgments, ``judged`` / ``failed`` counts and
        ``mean_answer_words``; ``finetuned_minus_base`` (mean paired difference per criterion over
        questions with both answers judged); ``per_school`` (the same per category); ``pairwise``: counts
        and rates of fine-tuned ``win`` / ``tie`` / ``loss`` over questions with both verdicts,
        ``position_consistency``, first/second-position preference rates, ``longer_answer_won_share``,
        ``mean_answer_words`` and ``per_school``; ``calls``: judgments, failures, replies, replies from
        the cache, malformed replies. Means over zero judgments are NaN.
    """
    calls = _call_counts(rubric_judgments, pairwise_judgments)
    if calls["judgments"] and calls["failed"] == calls["judgments"]:
        first = next(r for r in rubric_judgments if r["status"] == "failed") if rubric_judgments else None
        logger.warning("every judge call failed; the first error: %s", first["error"] if first else "n/a")
    return {
        "settings": judge_settings,
        "rubric": _rubric_metrics(rubric_judgments),
        "pairwise": pairwise_metrics(pairwise_judgments),
        "calls": calls,
    }


@when(judge=True)
def judge_results__judged(judge_metrics: dict) -> Optional[dict]:
    """The judged comparison that joins ``run_metrics`` (``metrics.json``) and the report as ``"judge"``."""
    return judge_metrics


@when(judge=False)
def judge_results__not_judged() -> Optional[dict]:
    """None: a run without the judge (config ``judge`` unset or False) reports ROUGE alone."""
    return None
