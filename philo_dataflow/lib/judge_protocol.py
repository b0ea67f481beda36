"""The LLM judge's protocol: the rubric, the system prompts, the JSON schemas and pydantic models of the
replies, how a reply's JSON is found, and how two pairwise verdicts combine.

Two protocols, after Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena"
(NeurIPS Datasets and Benchmarks), whose findings set the bias mitigations:

- **Rubric grading** (single-answer grading with a reference answer): each answer is graded alone on
  correctness, coherence and alignment with the named school of thought, integers 1–5, each with a short
  rationale written *before* its score (the rationale-then-score order of G-Eval, Liu et al. 2023, and of
  Prometheus, Kim et al. 2024, whose 1–5 rubrics also give the judge a reference answer).
- **Pairwise comparison**, asked in both orders (base first, then fine-tuned first). Judges favour the
  answer shown first (GPT-4 kept its verdict on only ~65% of swapped pairs in Zheng et al. 2023), so a
  win counts only when both orders agree; any disagreement is a tie. The share of pairs whose two
  verdicts agree is reported as the judge's position consistency, and answer lengths are reported next
  to the win rates because judges also favour longer answers (ibid., "verbosity bias").
"""

import json
import re
from collections import defaultdict
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field, field_validator

from .inputs import RESPONSE_FORMATS  # noqa: F401  (re-exported: the protocol's modes)
from .scores import MODELS, mean

#: Bumped whenever a prompt, the rubric or a schema changes; recorded with every result.
PROMPT_VERSION = "philo-judge-1"


#: Sampling temperature of every judge request (greedy, so a re-run asks the same thing).
JUDGE_TEMPERATURE = 0.0



CRITERIA = ("correctness", "coherence", "school_alignment")


PAIR_ORDERS = ("base_first", "finetuned_first")


REQUIRED_ROW_KEYS = ("question", "category", "reference", "base_prediction", "finetuned_prediction")


#: The rubric shown to the judge (1–5 anchors in the style of Prometheus, Kim et al. 2024).
RUBRIC = """\
correctness: is the answer accurate, judged against the reference answer?
  1 = wrong or contradicts the reference; 2 = mostly wrong; 3 = partly right, with errors or gaps;
  4 = right with minor slips or omissions; 5 = fully right and consistent with the reference.
coherence: is the answer clear, on the question, and logically organised?
  1 = incoherent or off-topic; 2 = hard to follow; 3 = understandable but disorganised or repetitive;
  4 = clear with small lapses; 5 = clear, focused and well reasoned.
school_alignment: does the answer reason as the named school of thought would, with its concepts?
  1 = ignores or contradicts the school; 2 = generic, barely related; 3 = some of the school's ideas,
  loosely applied; 4 = recognisably the school's view; 5 = faithful to the school's doctrine and concepts."""


RUBRIC_SYSTEM_PROMPT = f"""\
You are a careful, impartial grader of answers to philosophy questions. You are given the school of \
thought a question belongs to, the question, a reference answer written by an expert, and an answer \
to grade. Grade the answer on three criteria with this rubric:
{RUBRIC}
Judge the content, not the length: an answer is not better for being longer. For each criterion, \
first write a one-sentence rationale, then give the integer score from 1 to 5. Reply with only a JSON \
object of the form {{"correctness": {{"rationale": "...", "score": 1-5}}, "coherence": \
{{"rationale": "...", "score": 1-5}}, "school_alignment": {{"rationale": "...", "score": 1-5}}}}."""


# Adapted from the reference-guided pairwise prompt of Zheng et al. 2023 (MT-Bench "pair-v2").
PAIRWISE_SYSTEM_PROMPT = """\
Please act as an impartial judge and compare two answers, A and B, to a philosophy question from the \
school of thought named below. A reference answer written by an expert is given: judge correctness \
against it, then coherence and faithfulness to the school of thought. Avoid any position bias: the \
order in which the answers are presented must not influence your decision. Do not let the length of \
the answers influence you. First write a one- or two-sentence rationale comparing the answers, then \
give your verdict: "A" if answer A is better, "B" if answer B is better, "tie" if they are equally \
good. Reply with only a JSON object of the form {"rationale": "...", "verdict": "A" | "B" | "tie"}."""


CORRECTION_PROMPT = (
    "Your reply could not be used: {error}. Reply again with only the JSON object described above, "
    "with every field filled in."
)


def _criterion_schema() -> dict:
    return {
        "type": "object",
        "properties": {"rationale": {"type": "string"}, "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
        "required": ["rationale", "score"],
        "additionalProperties": False,
    }


#: JSON schemas of the two replies; ``rationale`` comes before ``score`` / ``verdict`` so a judge that
#: decodes in schema order (constrained decoding, as llama.cpp does) reasons before it scores.
RUBRIC_SCHEMA = {
    "type": "object",
    "properties": {criterion: _criterion_schema() for criterion in CRITERIA},
    "required": list(CRITERIA),
    "additionalProperties": False,
}


PAIRWISE_SCHEMA = {
    "type": "object",
    "properties": {"rationale": {"type": "string"}, "verdict": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["rationale", "verdict"],
    "additionalProperties": False,
}


PROBE_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


class CriterionJudgment(BaseModel):
    rationale: Annotated[str, Field(min_length=1)]
    score: Annotated[int, Field(ge=1, le=5)]

    @field_validator("rationale")
    @classmethod
    def _rationale_not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("rationale is blank")
        return text.strip()


class RubricJudgment(BaseModel):
    correctness: CriterionJudgment
    coherence: CriterionJudgment
    school_alignment: CriterionJudgment


class PairwiseJudgment(BaseModel):
    rationale: Annotated[str, Field(min_length=1)]
    verdict: Literal["A", "B", "tie"]

    @field_validator("verdict", mode="before")
    @classmethod
    def _lenient_verdict(cls, verdict: Any) -> Any:
        if isinstance(verdict, str):
            word = re.sub(r"[\[\]\"'.\s]|answer", "", verdict, flags=re.IGNORECASE).upper()
            return {"A": "A", "B": "B", "TIE": "tie", "DRAW": "tie"}.get(word, verdict)
        return verdict


def with_rationale_cap(schema: dict, max_chars: int) -> dict:
    if not isinstance(schema, dict):
        return schema
    capped = {key: with_rationale_cap(value, max_chars) if isinstance(value, dict) else value
              for key, value in schema.items()}
    if "rationale" in capped.get("properties", {}):
        capped["properties"]["rationale"] = {**capped["properties"]["rationale"], "maxLength": max_chars}
    return capped


def response_format_of(mode: str, name: str, schema: dict, rationale_max_chars: Optional[int] = None) -> dict:
    """The ``response_format`` of a request. In ``json_object`` mode (llama.cpp-style servers, which
    compile the schema into a decoding grammar) rationales are capped at ``rationale_max_chars``
    characters so a rambling judge finishes within ``max_tokens``; OpenAI's strict ``json_schema``
    mode does not accept ``maxLength``, so there the prompt's "one sentence" is the bound."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}
    return {"type": "json_object",
            "schema": with_rationale_cap(schema, rationale_max_chars) if rationale_max_chars else schema}


def json_object_text(text: str) -> dict:
    """The JSON object in a reply: the whole text, or inside a code fence, or from its first ``{`` to
    its last ``}``; raw control characters (newlines) inside strings are accepted, as some servers'
    JSON grammars let them through. :raises ValueError: none is found."""
    stripped = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", stripped, flags=re.DOTALL)
    candidates = [stripped, fenced.group(1).strip() if fenced else None]
    if "{" in stripped and "}" in stripped:
        candidates.append(stripped[stripped.index("{") : stripped.rindex("}") + 1])
    for candidate in candidates:
        if not candidate:
            continue
        try:
            parsed = json.loads(candidate, strict=False)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    raise ValueError("the reply holds no JSON object")


def checked_rows(hold_out_set_predictions: list[dict]) -> list[dict]:
    if not hold_out_set_predictions:
        raise ValueError("hold_out_set_predictions is empty: there is nothing to judge.")
    missing = sorted({k for row in hold_out_set_predictions for k in REQUIRED_ROW_KEYS if k not in row})
    if missing:
        raise ValueError(f"hold_out_set_predictions: rows lack the key(s) {missing}; each row needs {REQUIRED_ROW_KEYS}.")
    return hold_out_set_predictions


def check_judge_settings(
    judge_max_concurrency: int, judge_max_tokens: int, judge_malformed_retries: int, judge_rationale_max_chars: int
) -> None:
    problems = []
    if not isinstance(judge_rationale_max_chars, int) or judge_rationale_max_chars < 1:
        problems.append(f"judge_rationale_max_chars={judge_rationale_max_chars!r} must be an integer >= 1")
    if not isinstance(judge_max_concurrency, int) or judge_max_concurrency < 1:
        problems.append(f"judge_max_concurrency={judge_max_concurrency!r} must be an integer >= 1")
    if not isinstance(judge_max_tokens, int) or judge_max_tokens < 1:
        problems.append(f"judge_max_tokens={judge_max_tokens!r} must be an integer >= 1")
    if not isinstance(judge_malformed_retries, int) or judge_malformed_retries < 0:
        problems.append(f"judge_malformed_retries={judge_malformed_retries!r} must be an integer >= 0")
    if problems:
        raise ValueError("judge settings: " + "; ".join(problems) + ".")


def shown_answer(text: str) -> str:
    return text.strip() or "(empty answer)"


def word_count(text: str) -> int:
    return len(text.split())


def preferred_model(order: str, verdict: Optional[str]) -> Optional[str]:
    """Which model a verdict prefers: ``"base"``, ``"finetuned"``, ``"tie"``, or None (no verdict)."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    first, second = ("base", "finetuned") if order == "base_first" else ("finetuned", "base")
    return first if verdict == "A" else second


def pair_outcome(base_first_verdict: Optional[str], finetuned_first_verdict: Optional[str]) -> tuple[str, Optional[bool]]:
    """Outcome of one question for the fine-tuned model from its two verdicts (``"A"`` | ``"B"`` |
    ``"tie"`` | None when that order failed), after Zheng et al. 2023: a model wins only when it is
    preferred in both orders; any disagreement is a tie.

    :return: (``"win"`` | ``"tie"`` | ``"loss"`` | ``"failed"``, position consistent: bool, or None
        when an order failed).
    """
    first = preferred_model("base_first", base_first_verdict)
    second = preferred_model("finetuned_first", finetuned_first_verdict)
    if first is None or second is None:
        return "failed", None
    if first != second:
        return "tie", False
    return {"finetuned": "win", "base": "loss", "tie": "tie"}[first], True


def _pairwise_summary(records: list[dict]) -> dict:
    """Win/tie/loss rates of the fine-tuned model over questions with both verdicts, the judge's
    position consistency (share of those whose two verdicts agree, Zheng et al. 2023 Table 2) and the
    shares of inconsistent pairs that went to the answer shown first / second in both orders."""
    judged = [r for r in records if r["outcome"] != "failed"]
    n = len(judged)

    def share(count: int) -> float:
        return count / n if n else float("nan")

    counts = {o: sum(r["outcome"] == o for r in judged) for o in ("win", "tie", "loss")}
    first_bias = sum(not r["position_consistent"] and r["preferred"]["base_first"] == "base"
                     and r["preferred"]["finetuned_first"] == "finetuned" for r in judged)
    second_bias = sum(not r["position_consistent"] and r["preferred"]["base_first"] == "finetuned"
                      and r["preferred"]["finetuned_first"] == "base" for r in judged)
    decisive = [r for r in judged if r["outcome"] in ("win", "loss")
                and r["answer_words"]["base"] != r["answer_words"]["finetuned"]]
    longer_won = sum((r["outcome"] == "win") == (r["answer_words"]["finetuned"] > r["answer_words"]["base"])
                     for r in decisive)
    return {
        "questions": len(records),
        "judged": n,
        "failed": len(records) - n,
        "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
        "win_rate": share(counts["win"]), "tie_rate": share(counts["tie"]), "loss_rate": share(counts["loss"]),
        "position_consistency": share(sum(bool(r["position_consistent"]) for r in judged)),
        "first_position_preferred_rate": share(first_bias),
        "second_position_preferred_rate": share(second_bias),
        "longer_answer_won_share": longer_won / len(decisive) if decisive else float("nan"),
        "mean_answer_words": {m: mean([r["answer_words"][m] for r in records]) for m in MODELS},
    }


def pairwise_metrics(records: list[dict]) -> dict:
    """``_pairwise_summary`` of ``stages.judging.pairwise_judgments``' records, overall and per school
    (``per_school``)."""
    result = _pairwise_summary(records)
    schools = defaultdict(list)
    for record in records:
        schools[record["category"]].append(record)
    result["per_school"] = {school: _pairwise_summary(rows) for school, rows in sorted(schools.items(), key=lambda i: str(i[0]))}
    return result
