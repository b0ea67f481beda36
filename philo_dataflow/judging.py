"""Stage 11 (on request) — an LLM judge compares base and fine-tuned hold-out answers.

Nothing here runs unless a judge output is requested (``philo_dataflow.JUDGE_OUTPUTS``); only those
outputs need the ``judge_*`` inputs. Two protocols, after Zheng et al. 2023, "Judging LLM-as-a-judge
with MT-Bench and Chatbot Arena" (NeurIPS Datasets and Benchmarks), whose findings set the bias
mitigations:

- **Rubric grading** (single-answer grading with a reference answer): each answer is graded alone on
  correctness, coherence and alignment with the named school of thought, integers 1–5, each with a short
  rationale written *before* its score (the rationale-then-score order of G-Eval, Liu et al. 2023, and of
  Prometheus, Kim et al. 2024, whose 1–5 rubrics also give the judge a reference answer).
- **Pairwise comparison**, asked in both orders (base first, then fine-tuned first). Judges favour the
  answer shown first (GPT-4 kept its verdict on only ~65% of swapped pairs in Zheng et al. 2023), so a
  win counts only when both orders agree; any disagreement is a tie. The share of pairs whose two
  verdicts agree is reported as the judge's position consistency, and answer lengths are reported next
  to the win rates because judges also favour longer answers (ibid., "verbosity bias").

Requests use temperature 0, structured output (the OpenAI ``response_format`` JSON schema, or the
``{"type": "json_object", "schema": ...}`` form that llama.cpp servers accept), scores as ``enum``
values. Replies are parsed leniently and validated with pydantic; a malformed reply is re-asked a
bounded number of times and, if it never validates, recorded as a failure with its raw text. HTTP
retries with backoff on 429 / 5xx / timeouts are the ``openai`` client's own (``max_retries``,
``timeout``). Every reply is cached on disk under a hash of the full request, so a re-run pays nothing.

The API key is read from the environment variable named by ``judge_api_key_env``; it is never a node
value, never logged, never written, and scrubbed from any error text that is recorded.
"""

import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional
from urllib.parse import urlsplit, urlunsplit

import openai
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from pydantic import BaseModel, Field, ValidationError, field_validator
from tqdm.auto import tqdm

from .saving import write_text_atomically

logger = logging.getLogger(__name__)

#: Bumped whenever a prompt, the rubric or a schema changes; recorded with every result.
PROMPT_VERSION = "philo-judge-1"
#: Sampling temperature of every judge request (greedy, so a re-run asks the same thing).
JUDGE_TEMPERATURE = 0.0
RESPONSE_FORMATS = ("auto", "json_schema", "json_object")
MODELS = ("base", "finetuned")
CRITERIA = ("correctness", "coherence", "school_alignment")
PAIR_ORDERS = ("base_first", "finetuned_first")
#: API key used for a loopback server when the key variable is unset (local servers need none).
LOOPBACK_PLACEHOLDER_KEY = "no-key-needed-on-loopback"
#: Statuses with which a server rejects a ``json_schema`` response format (llama.cpp answers 500).
_SCHEMA_REJECTION_STATUSES = frozenset({400, 404, 415, 422, 500, 501})
#: Tries of the ``json_schema`` probe, and the pause before the second (doubling after), in seconds.
_PROBE_TRIES = 3
_PROBE_PAUSE_SECONDS = 0.25
_REQUIRED_ROW_KEYS = ("question", "category", "reference", "base_prediction", "finetuned_prediction")

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

_RUBRIC_SYSTEM_PROMPT = f"""\
You are a careful, impartial grader of answers to philosophy questions. You are given the school of \
thought a question belongs to, the question, a reference answer written by an expert, and an answer \
to grade. Grade the answer on three criteria with this rubric:
{RUBRIC}
Judge the content, not the length: an answer is not better for being longer. For each criterion, \
first write a one-sentence rationale, then give the integer score from 1 to 5. Reply with only a JSON \
object of the form {{"correctness": {{"rationale": "...", "score": 1-5}}, "coherence": \
{{"rationale": "...", "score": 1-5}}, "school_alignment": {{"rationale": "...", "score": 1-5}}}}."""

# Adapted from the reference-guided pairwise prompt of Zheng et al. 2023 (MT-Bench "pair-v2").
_PAIRWISE_SYSTEM_PROMPT = """\
Please act as an impartial judge and compare two answers, A and B, to a philosophy question from the \
school of thought named below. A reference answer written by an expert is given: judge correctness \
against it, then coherence and faithfulness to the school of thought. Avoid any position bias: the \
order in which the answers are presented must not influence your decision. Do not let the length of \
the answers influence you. First write a one- or two-sentence rationale comparing the answers, then \
give your verdict: "A" if answer A is better, "B" if answer B is better, "tie" if they are equally \
good. Reply with only a JSON object of the form {"rationale": "...", "verdict": "A" | "B" | "tie"}."""

_CORRECTION_PROMPT = (
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
_PROBE_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


class _CriterionJudgment(BaseModel):
    rationale: Annotated[str, Field(min_length=1)]
    score: Annotated[int, Field(ge=1, le=5)]

    @field_validator("rationale")
    @classmethod
    def _rationale_not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("rationale is blank")
        return text.strip()


class _RubricJudgment(BaseModel):
    correctness: _CriterionJudgment
    coherence: _CriterionJudgment
    school_alignment: _CriterionJudgment


class _PairwiseJudgment(BaseModel):
    rationale: Annotated[str, Field(min_length=1)]
    verdict: Literal["A", "B", "tie"]

    @field_validator("verdict", mode="before")
    @classmethod
    def _lenient_verdict(cls, verdict: Any) -> Any:
        if isinstance(verdict, str):
            word = re.sub(r"[\[\]\"'.\s]|answer", "", verdict, flags=re.IGNORECASE).upper()
            return {"A": "A", "B": "B", "TIE": "tie", "DRAW": "tie"}.get(word, verdict)
        return verdict


@dataclass(frozen=True)
class JudgeClient:
    """An OpenAI-compatible chat endpoint and the judge model on it.

    ``base_url`` is the endpoint as given (it keys the cache); ``public_base_url`` drops any
    ``user:password@`` part and is the one recorded. The key lives only inside ``client``.
    """

    client: openai.OpenAI
    model: str
    base_url: str
    public_base_url: str

    def scrubbed(self, text: str) -> str:
        """``text`` with the API key replaced by ``[redacted]``."""
        key = self.client.api_key
        return text.replace(key, "[redacted]") if isinstance(key, str) and len(key) >= 4 else text


class JudgeCache:
    """On-disk cache of judge replies: one JSON file per request under ``directory``, named by the
    SHA-256 of the canonical JSON of the full request (model, messages, response format, temperature,
    max tokens) and the endpoint's base URL. Written atomically (temporary file, ``os.replace``), so a
    crash never leaves a half-written entry; an unreadable entry counts as a miss."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    @staticmethod
    def key(material: dict) -> str:
        canonical = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("judge cache entry %s is unreadable; asking again", path)
            return None

    def put(self, key: str, entry: dict) -> None:
        write_text_atomically(self._path(key), json.dumps(entry, ensure_ascii=False, indent=1))


class _MalformedReply(Exception):
    """A reply that arrived (HTTP 200) but cannot be used; ``raw`` is its text."""

    def __init__(self, message: str, raw: Optional[str]):
        super().__init__(message)
        self.raw = raw


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path, parts.query, ""))


def judge_client(
    judge_model: str,
    judge_base_url: str = "https://api.openai.com/v1",
    judge_api_key_env: str = "OPENAI_API_KEY",
    judge_timeout: float = 120.0,
    judge_max_retries: int = 4,
) -> JudgeClient:
    """The OpenAI client of the judge endpoint (any OpenAI-compatible server: OpenAI, vLLM, Ollama,
    llama.cpp) with the judge model's name.

    :param judge_model: model name the endpoint serves, e.g. ``gpt-4.1``; use a non-reasoning model,
        since requests send ``temperature=0`` and ``max_tokens``.
    :param judge_base_url: the endpoint's ``/v1`` base URL.
    :param judge_api_key_env: name of the environment variable holding the API key. When it is unset
        and the base URL is on loopback (``localhost``, ``127.0.0.0/8``, ``::1``) a placeholder key is
        used, since local servers usually need none.
    :param judge_timeout: seconds one HTTP request may take before it is retried.
    :param judge_max_retries: retries of one request on 408/409/429/5xx, timeouts and connection
        errors, with exponential backoff (the ``openai`` client's own, honouring ``Retry-After``).
    :raises ValueError: an input is invalid, or the key variable is unset for a non-loopback endpoint
        (all problems in one message; the key itself never appears).
    """
    problems = []
    if not isinstance(judge_model, str) or not judge_model.strip():
        problems.append("judge_model is empty: name the model the endpoint serves, e.g. gpt-4.1")
    if not isinstance(judge_base_url, str) or urlsplit(judge_base_url).scheme not in ("http", "https") \
            or not urlsplit(judge_base_url).hostname:
        problems.append(f"judge_base_url={_public_url(str(judge_base_url))!r} is not an http(s) URL")
    if not isinstance(judge_api_key_env, str) or not judge_api_key_env.strip():
        problems.append("judge_api_key_env is empty: name the environment variable holding the key")
    if not judge_timeout or judge_timeout <= 0:
        problems.append(f"judge_timeout={judge_timeout!r} must be a positive number of seconds")
    if not isinstance(judge_max_retries, int) or judge_max_retries < 0:
        problems.append(f"judge_max_retries={judge_max_retries!r} must be a non-negative integer")
    if problems:
        raise ValueError("judge settings: " + "; ".join(problems) + ".")
    api_key = os.environ.get(judge_api_key_env, "").strip()
    if not api_key:
        if not _is_loopback(judge_base_url):
            raise ValueError(
                f"judge_api_key_env: the environment variable {judge_api_key_env} is unset or empty; export "
                f"the API key of {_public_url(judge_base_url)} in it, or name another variable."
            )
        api_key = LOOPBACK_PLACEHOLDER_KEY
    base_url = judge_base_url.rstrip("/")
    client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=judge_timeout, max_retries=judge_max_retries)
    logger.info("judge: model %s at %s", judge_model, _public_url(base_url))
    return JudgeClient(client=client, model=judge_model, base_url=base_url, public_base_url=_public_url(base_url))


def judge_cache(output_dir: str = "outputs", judge_cache_dir: Optional[str] = None) -> JudgeCache:
    """The on-disk cache of judge replies: ``judge_cache_dir``, or ``<output_dir>/judge_cache``.

    Share one ``judge_cache_dir`` between runs to never pay twice for the same request.
    """
    return JudgeCache(judge_cache_dir or str(Path(output_dir) / "judge_cache"))


def _with_rationale_cap(schema: dict, max_chars: int) -> dict:
    if not isinstance(schema, dict):
        return schema
    capped = {key: _with_rationale_cap(value, max_chars) if isinstance(value, dict) else value
              for key, value in schema.items()}
    if "rationale" in capped.get("properties", {}):
        capped["properties"]["rationale"] = {**capped["properties"]["rationale"], "maxLength": max_chars}
    return capped


def _response_format(mode: str, name: str, schema: dict, rationale_max_chars: Optional[int] = None) -> dict:
    """The ``response_format`` of a request. In ``json_object`` mode (llama.cpp-style servers, which
    compile the schema into a decoding grammar) rationales are capped at ``rationale_max_chars``
    characters so a rambling judge finishes within ``max_tokens``; OpenAI's strict ``json_schema``
    mode does not accept ``maxLength``, so there the prompt's "one sentence" is the bound."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}
    return {"type": "json_object",
            "schema": _with_rationale_cap(schema, rationale_max_chars) if rationale_max_chars else schema}


def _json_object_text(text: str) -> dict:
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


def _completion_text(judge: JudgeClient, cache: JudgeCache, request: dict) -> tuple[str, bool]:
    """The content of the reply to ``request`` and whether it came from the cache.

    :raises openai.APIError: the request failed after the client's retries.
    :raises _MalformedReply: HTTP 200 with a body that is not a chat completion with text content.
    """
    key = cache.key({"base_url": judge.base_url, **request})
    entry = cache.get(key)
    if entry is not None and isinstance(entry.get("content"), str):
        return entry["content"], True
    response = judge.client.chat.completions.with_raw_response.create(**request)
    body = judge.scrubbed(response.http_response.text)  # a hostile server could echo the key
    try:
        payload = json.loads(body)
        message = payload["choices"][0]["message"]
        finish_reason = payload["choices"][0].get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise _MalformedReply(f"the response body is not a chat completion ({type(error).__name__})", body) from None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        refusal = message.get("refusal") if isinstance(message, dict) else None
        raise _MalformedReply("the reply has no text content" + (" (refused)" if refusal else ""), refusal or body)
    cache.put(key, {"request": request, "content": content, "finish_reason": finish_reason,
                    "usage": payload.get("usage")})
    return content, False


def _judgment(
    judge: JudgeClient,
    cache: JudgeCache,
    messages: list[dict],
    response_format: dict,
    validator: type[BaseModel],
    max_tokens: int,
    malformed_retries: int,
) -> dict:
    """Asks one judgment; never raises for what the endpoint does.

    A reply that does not validate is shown back to the judge with the error and asked again, at most
    ``malformed_retries`` times (each re-ask is a new request, cached like any other). A body that is
    not a chat completion is asked again unchanged.

    :return: ``status`` (``"ok"`` | ``"failed"``), ``judgment`` (the validated dict, or None), ``raw``
        (text of the last reply or error body), ``error`` (None, or why it failed), ``attempts`` (one
        ``{"raw", "error", "cached"}`` per reply or error, in order).
    """
    conversation = list(messages)
    attempts: list[dict] = []
    for _ in range(1 + malformed_retries):
        request = {
            "model": judge.model, "messages": conversation, "temperature": JUDGE_TEMPERATURE,
            "max_tokens": max_tokens, "response_format": response_format,
        }
        try:
            raw, cached = _completion_text(judge, cache, request)
        except _MalformedReply as error:
            attempts.append({"raw": error.raw or "", "error": str(error), "cached": False})
            continue
        except openai.APIError as error:
            body = getattr(getattr(error, "response", None), "text", None)
            attempts.append({
                "raw": judge.scrubbed(body) if isinstance(body, str) else None,
                "error": judge.scrubbed(f"{type(error).__name__}: {error}"), "cached": False,
            })
            break
        try:
            judgment = validator.model_validate(_json_object_text(raw)).model_dump()
        except (ValueError, ValidationError) as error:
            problem = (
                "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in error.errors())
                if isinstance(error, ValidationError) else str(error)
            )
            attempts.append({"raw": raw, "error": problem, "cached": cached})
            conversation = [*conversation, {"role": "assistant", "content": raw},
                            {"role": "user", "content": _CORRECTION_PROMPT.format(error=problem)}]
            continue
        attempts.append({"raw": raw, "error": None, "cached": cached})
        return {"status": "ok", "judgment": judgment, "raw": raw, "error": None, "attempts": attempts}
    last = attempts[-1]
    return {"status": "failed", "judgment": None, "raw": last["raw"], "error": last["error"], "attempts": attempts}


def resolved_judge_response_format(
    judge_client: JudgeClient, judge_cache: JudgeCache, judge_response_format: str = "auto"
) -> str:
    """The structured-output form the judge requests use: ``"json_schema"`` (OpenAI's
    ``{"type": "json_schema", "json_schema": {...}}``) or ``"json_object"`` (``{"type": "json_object",
    "schema": ...}``, which llama.cpp servers accept while answering HTTP 500 to ``json_schema``).

    :param judge_response_format: ``"json_schema"`` or ``"json_object"`` to force one; ``"auto"`` sends
        a tiny probe with ``json_schema`` and falls back to ``json_object`` when the endpoint
        rejects it (HTTP 400/404/415/422 once, or 500/501 on each of ``_PROBE_TRIES`` tries; 429s and
        timeouts are tried again). A definite outcome is kept in the cache, so a re-run does not probe
        again; an undetermined one (endpoint unreachable) uses ``json_schema`` and is not kept.
    :raises ValueError: ``judge_response_format`` is not one of ``RESPONSE_FORMATS``.
    """
    if judge_response_format not in RESPONSE_FORMATS:
        raise ValueError(f"judge_response_format={judge_response_format!r}: use one of {RESPONSE_FORMATS}.")
    if judge_response_format != "auto":
        return judge_response_format
    detection_key = judge_cache.key({"base_url": judge_client.base_url, "model": judge_client.model,
                                     "detection": "response_format", "prompt_version": PROMPT_VERSION})
    remembered = judge_cache.get(detection_key)
    if remembered and remembered.get("response_format") in RESPONSE_FORMATS[1:]:
        return remembered["response_format"]
    messages = [{"role": "user", "content": 'Is the sky blue on a clear day? Reply with only {"answer": "yes"} '
                                            'or {"answer": "no"}.'}]

    def probe(mode: str, client: openai.OpenAI) -> None:
        request = {"model": judge_client.model, "messages": messages, "temperature": JUDGE_TEMPERATURE,
                   "max_tokens": 16, "response_format": _response_format(mode, "probe", _PROBE_SCHEMA)}
        client.chat.completions.with_raw_response.create(**request)  # any 2xx is an acceptance

    chosen = None
    rejected = False
    schema_client = judge_client.client.with_options(max_retries=0)
    for attempt in range(_PROBE_TRIES):
        try:
            probe("json_schema", schema_client)
            chosen = "json_schema"
            break
        except openai.APIStatusError as error:
            status = error.status_code
            if status in _SCHEMA_REJECTION_STATUSES:
                # A 4xx is a verdict; a 5xx may be a hiccup, so it must repeat on every try.
                rejected = True
                if status < 500:
                    break
            elif status != 429:
                logger.warning("response-format probe: HTTP %d", status)
                break
        except (openai.APITimeoutError, openai.APIConnectionError) as error:
            rejected = False
            logger.info("response-format probe: %s", type(error).__name__)
        if attempt + 1 < _PROBE_TRIES:
            time.sleep(_PROBE_PAUSE_SECONDS * 2**attempt)
    if rejected and chosen is None:
        logger.info("judge endpoint rejects a json_schema response format; trying json_object")
        try:
            probe("json_object", judge_client.client)
            chosen = "json_object"
        except openai.APIError as fallback_error:
            logger.warning("judge endpoint rejected json_object too (%s)", type(fallback_error).__name__)
    if chosen is None:
        logger.warning("could not detect the judge endpoint's structured-output support; using json_schema")
        return "json_schema"
    judge_cache.put(detection_key, {"response_format": chosen})
    logger.info("judge response format: %s", chosen)
    return chosen


def _checked_rows(hold_out_set_predictions: list[dict]) -> list[dict]:
    if not hold_out_set_predictions:
        raise ValueError("hold_out_set_predictions is empty: there is nothing to judge.")
    missing = sorted({k for row in hold_out_set_predictions for k in _REQUIRED_ROW_KEYS if k not in row})
    if missing:
        raise ValueError(f"hold_out_set_predictions: rows lack the key(s) {missing}; each row needs {_REQUIRED_ROW_KEYS}.")
    return hold_out_set_predictions


def _check_judge_settings(
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


def _shown(text: str) -> str:
    return text.strip() or "(empty answer)"


def _words(text: str) -> int:
    return len(text.split())


def _asked_concurrently(asks: list[Callable[[], dict]], max_concurrency: int, description: str) -> list[dict]:
    """Results of ``asks`` in order, at most ``max_concurrency`` at a time, with one progress bar."""
    results: list[dict] = [{}] * len(asks)
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool, \
            tqdm(total=len(asks), desc=description, unit="call") as bar:
        futures = {pool.submit(ask): index for index, ask in enumerate(asks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    return results


def rubric_judgments(
    hold_out_set_predictions: list[dict],
    judge_client: JudgeClient,
    judge_cache: JudgeCache,
    resolved_judge_response_format: str,
    judge_max_concurrency: int = 4,
    judge_max_tokens: int = 512,
    judge_malformed_retries: int = 2,
    judge_rationale_max_chars: int = 400,
) -> list[dict]:
    """Rubric grades of every hold-out answer of the base and the fine-tuned model, each answer graded
    alone (single-answer grading with a reference, Zheng et al. 2023) against ``RUBRIC``.

    :param hold_out_set_predictions: rows with ``question``, ``category`` (school of thought),
        ``reference``, ``base_prediction``, ``finetuned_prediction``.
    :param judge_max_concurrency: judge requests in flight at once.
    :param judge_max_tokens: cap on tokens of one judge reply.
    :param judge_malformed_retries: re-asks of a reply that does not validate before it is recorded as
        a failure.
    :param judge_rationale_max_chars: cap on each rationale's characters in ``json_object`` mode
        (grammar-constrained local servers); see ``_response_format``.
    :return: 2 × rows records, ``index``-major, base then fine-tuned: ``kind`` = ``"rubric"``,
        ``index`` (row), ``category``, ``question``, ``model`` (``"base"`` | ``"finetuned"``),
        ``answer_words``, and ``_judgment``'s ``status`` / ``judgment`` (``{criterion: {"rationale",
        "score"}}``) / ``raw`` / ``error`` / ``attempts``.
    :raises ValueError: rows are missing or lack keys; a setting is out of range.
    """
    rows = _checked_rows(hold_out_set_predictions)
    _check_judge_settings(judge_max_concurrency, judge_max_tokens, judge_malformed_retries, judge_rationale_max_chars)
    response_format = _response_format(
        resolved_judge_response_format, "rubric_judgment", RUBRIC_SCHEMA, judge_rationale_max_chars
    )
    records, asks = [], []
    for index, row in enumerate(rows):
        for model in MODELS:
            answer = row[f"{model}_prediction"]
            messages = [
                {"role": "system", "content": _RUBRIC_SYSTEM_PROMPT},
                {"role": "user", "content": f"School of thought: {row['category']}\n\n[Question]\n{row['question']}"
                                            f"\n\n[Reference answer]\n{row['reference']}\n\n[Answer to grade]\n"
                                            f"{_shown(answer)}"},
            ]
            records.append({"kind": "rubric", "index": index, "category": row["category"],
                            "question": row["question"], "model": model, "answer_words": _words(answer)})
            asks.append(lambda m=messages: _judgment(judge_client, judge_cache, m, response_format, _RubricJudgment,
                                                     judge_max_tokens, judge_malformed_retries))
    results = _asked_concurrently(asks, judge_max_concurrency, "judge: rubric")
    records = [{**record, **result} for record, result in zip(records, results)]
    failed = sum(r["status"] == "failed" for r in records)
    logger.info("rubric judgments: %d, failed %d", len(records), failed)
    return records


def _preferred_model(order: str, verdict: Optional[str]) -> Optional[str]:
    """Which model a verdict prefers: ``"base"``, ``"finetuned"``, ``"tie"``, or None (no verdict)."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    first, second = ("base", "finetuned") if order == "base_first" else ("finetuned", "base")
    return first if verdict == "A" else second


def _pair_outcome(base_first_verdict: Optional[str], finetuned_first_verdict: Optional[str]) -> tuple[str, Optional[bool]]:
    """Outcome of one question for the fine-tuned model from its two verdicts (``"A"`` | ``"B"`` |
    ``"tie"`` | None when that order failed), after Zheng et al. 2023: a model wins only when it is
    preferred in both orders; any disagreement is a tie.

    :return: (``"win"`` | ``"tie"`` | ``"loss"`` | ``"failed"``, position consistent: bool, or None
        when an order failed).
    """
    first = _preferred_model("base_first", base_first_verdict)
    second = _preferred_model("finetuned_first", finetuned_first_verdict)
    if first is None or second is None:
        return "failed", None
    if first != second:
        return "tie", False
    return {"finetuned": "win", "base": "loss", "tie": "tie"}[first], True


def pairwise_judgments(
    hold_out_set_predictions: list[dict],
    judge_client: JudgeClient,
    judge_cache: JudgeCache,
    resolved_judge_response_format: str,
    judge_max_concurrency: int = 4,
    judge_max_tokens: int = 512,
    judge_malformed_retries: int = 2,
    judge_rationale_max_chars: int = 400,
) -> list[dict]:
    """Pairwise verdicts base vs fine-tuned on every hold-out question, asked in both orders (answer A
    = base, then answer A = fine-tuned), combined as in Zheng et al. 2023 (see ``_pair_outcome``).

    :return: one record per question: ``kind`` = ``"pairwise"``, ``index``, ``category``, ``question``,
        ``answer_words`` (``{"base", "finetuned"}``), ``base_first`` and ``finetuned_first`` (each
        ``_judgment``'s record, ``judgment`` = ``{"rationale", "verdict"}`` with verdict ``"A"`` | ``"B"``
        | ``"tie"``), ``preferred`` (``{order: "base" | "finetuned" | "tie" | None}``), ``outcome`` for
        the fine-tuned model (``"win"`` | ``"tie"`` | ``"loss"`` | ``"failed"``), ``position_consistent``
        (bool, None when an order failed).
    :raises ValueError: rows are missing or lack keys; a setting is out of range.
    """
    rows = _checked_rows(hold_out_set_predictions)
    _check_judge_settings(judge_max_concurrency, judge_max_tokens, judge_malformed_retries, judge_rationale_max_chars)
    response_format = _response_format(
        resolved_judge_response_format, "pairwise_judgment", PAIRWISE_SCHEMA, judge_rationale_max_chars
    )
    asks = []
    for row in rows:
        for order in PAIR_ORDERS:
            a, b = ("base", "finetuned") if order == "base_first" else ("finetuned", "base")
            messages = [
                {"role": "system", "content": _PAIRWISE_SYSTEM_PROMPT},
                {"role": "user", "content": f"School of thought: {row['category']}\n\n[Question]\n{row['question']}"
                                            f"\n\n[Reference answer]\n{row['reference']}\n\n[Answer A]\n"
                                            f"{_shown(row[f'{a}_prediction'])}\n\n[Answer B]\n"
                                            f"{_shown(row[f'{b}_prediction'])}"},
            ]
            asks.append(lambda m=messages: _judgment(judge_client, judge_cache, m, response_format, _PairwiseJudgment,
                                                     judge_max_tokens, judge_malformed_retries))
    results = _asked_concurrently(asks, judge_max_concurrency, "judge: pairwise")
    records = []
    for index, row in enumerate(rows):
        calls = dict(zip(PAIR_ORDERS, results[2 * index : 2 * index + 2]))
        verdicts = {o: c["judgment"]["verdict"] if c["status"] == "ok" else None for o, c in calls.items()}
        outcome, consistent = _pair_outcome(verdicts["base_first"], verdicts["finetuned_first"])
        records.append({
            "kind": "pairwise", "index": index, "category": row["category"], "question": row["question"],
            "answer_words": {m: _words(row[f"{m}_prediction"]) for m in MODELS},
            **calls,
            "preferred": {o: _preferred_model(o, v) for o, v in verdicts.items()},
            "outcome": outcome, "position_consistent": consistent,
        })
    logger.info("pairwise judgments: %d questions, %d failed", len(records), sum(r["outcome"] == "failed" for r in records))
    return records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _rubric_summary(records: list[dict]) -> dict:
    judged = [r for r in records if r["status"] == "ok"]
    return {
        **{c: _mean([r["judgment"][c]["score"] for r in judged]) for c in CRITERIA},
        "judged": len(judged),
        "failed": len(records) - len(judged),
        "mean_answer_words": _mean([r["answer_words"] for r in records]),
    }


def _rubric_metrics(records: list[dict]) -> dict:
    by_model = {m: [r for r in records if r["model"] == m] for m in MODELS}
    result: dict = {m: _rubric_summary(by_model[m]) for m in MODELS}
    scores = {(r["index"], r["model"]): r["judgment"] for r in records if r["status"] == "ok"}
    both = sorted({i for i, m in scores if m == "base"} & {i for i, m in scores if m == "finetuned"})
    result["finetuned_minus_base"] = {
        c: _mean([scores[(i, "finetuned")][c]["score"] - scores[(i, "base")][c]["score"] for i in both]) for c in CRITERIA
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
        "mean_answer_words": {m: _mean([r["answer_words"][m] for r in records]) for m in MODELS},
    }


def _pairwise_metrics(records: list[dict]) -> dict:
    result = _pairwise_summary(records)
    schools = defaultdict(list)
    for record in records:
        schools[record["category"]].append(record)
    result["per_school"] = {school: _pairwise_summary(rows) for school, rows in sorted(schools.items(), key=lambda i: str(i[0]))}
    return result


def judge_settings(
    judge_client: JudgeClient, resolved_judge_response_format: str, judge_max_tokens: int = 512,
    judge_malformed_retries: int = 2, judge_rationale_max_chars: int = 400,
) -> dict:
    """What the judge was asked and how, recorded with every judged result: model, endpoint (without
    credentials), temperature, max tokens, response format, prompt version, rubric, system prompts and
    sources."""
    return {
        "model": judge_client.model,
        "base_url": judge_client.public_base_url,
        "temperature": JUDGE_TEMPERATURE,
        "max_tokens": judge_max_tokens,
        "malformed_retries": judge_malformed_retries,
        "response_format": resolved_judge_response_format,
        "rationale_max_chars": judge_rationale_max_chars if resolved_judge_response_format == "json_object" else None,
        "prompt_version": PROMPT_VERSION,
        "rubric": RUBRIC,
        "prompts": {"rubric": _RUBRIC_SYSTEM_PROMPT, "pairwise": _PAIRWISE_SYSTEM_PROMPT},
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
        "pairwise": _pairwise_metrics(pairwise_judgments),
        "calls": calls,
    }


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


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def judged_report_markdown(report_markdown: str, judge_metrics: dict) -> str:
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
        lines.append(f"| {name} | " + " | ".join(_fmt(s[c]) for c in CRITERIA)
                     + f" | {s['judged']} | {s['failed']} | {_fmt(s['mean_answer_words'], 1)} |")
    d = rubric["finetuned_minus_base"]
    lines.append("| fine-tuned − base | " + " | ".join(_fmt(d[c]) for c in CRITERIA)
                 + f" | {d['paired_questions']} pairs | | |")
    lines += ["", "| school | model | " + " | ".join(c.replace("_", " ") for c in CRITERIA) + " | mean words |",
              "|---|---|" + "---|" * (len(CRITERIA) + 1)]
    for school, pair in rubric["per_school"].items():
        for model, name in (("base", "base"), ("finetuned", "fine-tuned")):
            s = pair[model]
            lines.append(f"| {school} | {name} | " + " | ".join(_fmt(s[c]) for c in CRITERIA)
                         + f" | {_fmt(s['mean_answer_words'], 1)} |")
    words = pairwise["mean_answer_words"]
    lines += [
        "",
        f"Pairwise, asked in both orders (a win only when both orders agree; Zheng et al. 2023), on "
        f"{pairwise['judged']} of {pairwise['questions']} questions: fine-tuned **wins {_pct(pairwise['win_rate'])}, "
        f"ties {_pct(pairwise['tie_rate'])}, loses {_pct(pairwise['loss_rate'])}** "
        f"({pairwise['wins']} / {pairwise['ties']} / {pairwise['losses']}). Position consistency of the judge: "
        f"{_pct(pairwise['position_consistency'])} (answer shown first preferred in both orders: "
        f"{_pct(pairwise['first_position_preferred_rate'])}, second: {_pct(pairwise['second_position_preferred_rate'])}). "
        f"Mean answer words: base {_fmt(words['base'], 1)}, fine-tuned {_fmt(words['finetuned'], 1)}; the longer "
        f"answer won {_pct(pairwise['longer_answer_won_share'])} of decisive pairs.",
    ]
    return report_markdown.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def saved_judgments(rubric_judgments: list[dict], pairwise_judgments: list[dict], output_dir: str = "outputs") -> str:
    """Writes every judgment, failures with their raw replies included, to ``<output_dir>/judgments.jsonl``:
    the rubric records, then the pairwise records (see ``rubric_judgments`` / ``pairwise_judgments``)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*rubric_judgments, *pairwise_judgments])
    return write_text_atomically(Path(output_dir) / "judgments.jsonl", text)


def saved_judge_figure(judge_comparison_figure: go.Figure, output_dir: str = "outputs") -> str:
    """Writes ``judge_comparison_figure`` as self-contained HTML to ``<output_dir>/judge_comparison.html``."""
    return write_text_atomically(
        Path(output_dir) / "judge_comparison.html", judge_comparison_figure.to_html(include_plotlyjs=True)
    )


def saved_judged_metrics(run_metrics: dict, judge_metrics: dict, saved_metrics: str, output_dir: str = "outputs") -> str:
    """Writes ``run_metrics`` with ``{"judge": judge_metrics}`` to ``<output_dir>/metrics.json``.

    Depends on ``saved_metrics`` only to run after it, so the judged file is the one left in place.
    """
    del saved_metrics
    return write_text_atomically(
        Path(output_dir) / "metrics.json", json.dumps({**run_metrics, "judge": judge_metrics}, indent=2, default=str)
    )


def saved_judged_report(judged_report_markdown: str, saved_report: str, output_dir: str = "outputs") -> str:
    """Writes the report with its LLM-judge section to ``<output_dir>/report.md`` (after ``saved_report``)."""
    del saved_report
    return write_text_atomically(Path(output_dir) / "report.md", judged_report_markdown)
