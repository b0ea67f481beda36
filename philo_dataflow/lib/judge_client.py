"""The LLM judge's client: an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server), the
on-disk reply cache, one judgment asked with re-asks of malformed replies, the structured-output probe and
bounded concurrency.

Requests use temperature 0 and structured output (the OpenAI ``response_format`` JSON schema, or the
``{"type": "json_object", "schema": ...}`` form that llama.cpp servers accept). Replies are parsed leniently
and validated with pydantic; a malformed reply is re-asked a bounded number of times and, if it never
validates, recorded as a failure with its raw text. HTTP retries with backoff on 429 / 5xx / timeouts are
the ``openai`` client's own (``max_retries``, ``timeout``). Every reply is cached on disk under a hash of
the full request, so a re-run pays nothing. The API key is read from the environment variable named by
``judge_api_key_env``; it is never logged or written, and is scrubbed from any error text recorded.
"""

import hashlib
import ipaddress
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit, urlunsplit

import openai
from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from .artifacts import write_text_atomically
from .judge_protocol import (
    CORRECTION_PROMPT,
    JUDGE_TEMPERATURE,
    PROBE_SCHEMA,
    PROMPT_VERSION,
    RESPONSE_FORMATS,
    json_object_text,
    response_format_of,
)

logger = logging.getLogger(__name__)

#: API key used for a loopback server when the key variable is unset (local servers need none).
LOOPBACK_PLACEHOLDER_KEY = "no-key-needed-on-loopback"


#: Statuses with which a server rejects a ``json_schema`` response format (llama.cpp answers 500).
_SCHEMA_REJECTION_STATUSES = frozenset({400, 404, 415, 422, 500, 501})


#: Tries of the ``json_schema`` probe, and the pause before the second (doubling after), in seconds.
_PROBE_TRIES = 3


_PROBE_PAUSE_SECONDS = 0.25


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


@dataclass(frozen=True)
class JudgeRequest:
    """How every judgment of a run is asked: the endpoint, the reply cache, the resolved structured-output
    form (``"json_schema"`` | ``"json_object"``), requests in flight at once, tokens per reply, re-asks of a
    malformed reply, and the rationale cap in characters (``json_object`` mode)."""

    client: JudgeClient
    cache: "JudgeCache"
    response_format: str
    max_concurrency: int
    max_tokens: int
    malformed_retries: int
    rationale_max_chars: int


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


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path, parts.query, ""))


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


def ask_judgment(
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
            judgment = validator.model_validate(json_object_text(raw)).model_dump()
        except (ValueError, ValidationError) as error:
            problem = (
                "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in error.errors())
                if isinstance(error, ValidationError) else str(error)
            )
            attempts.append({"raw": raw, "error": problem, "cached": cached})
            conversation = [*conversation, {"role": "assistant", "content": raw},
                            {"role": "user", "content": CORRECTION_PROMPT.format(error=problem)}]
            continue
        attempts.append({"raw": raw, "error": None, "cached": cached})
        return {"status": "ok", "judgment": judgment, "raw": raw, "error": None, "attempts": attempts}
    last = attempts[-1]
    return {"status": "failed", "judgment": None, "raw": last["raw"], "error": last["error"], "attempts": attempts}


def asked_concurrently(asks: list[Callable[[], dict]], max_concurrency: int, description: str) -> list[dict]:
    """Results of ``asks`` in order, at most ``max_concurrency`` at a time, with one progress bar. When the
    wait is interrupted (a stop signal's ``lib.stopping.StopRequested``), the asks not yet started are
    dropped: only those under way finish (their replies are cached) before it propagates."""
    results: list[dict] = [{}] * len(asks)
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool, \
            tqdm(total=len(asks), desc=description, unit="call") as bar:
        futures = {pool.submit(ask): index for index, ask in enumerate(asks)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def make_judge_client(judge_model: str, judge_base_url: str, judge_api_key_env: str, judge_timeout: float,
                      judge_max_retries: int) -> JudgeClient:
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
        problems.append(f"judge_base_url={public_url(str(judge_base_url))!r} is not an http(s) URL")
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
        if not is_loopback(judge_base_url):
            raise ValueError(
                f"judge_api_key_env: the environment variable {judge_api_key_env} is unset or empty; export "
                f"the API key of {public_url(judge_base_url)} in it, or name another variable."
            )
        api_key = LOOPBACK_PLACEHOLDER_KEY
    base_url = judge_base_url.rstrip("/")
    client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=judge_timeout, max_retries=judge_max_retries)
    logger.info("judge: model %s at %s", judge_model, public_url(base_url))
    return JudgeClient(client=client, model=judge_model, base_url=base_url, public_base_url=public_url(base_url))


def detect_response_format(judge_client: JudgeClient, judge_cache: JudgeCache, judge_response_format: str) -> str:
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
                   "max_tokens": 16, "response_format": response_format_of(mode, "probe", PROBE_SCHEMA)}
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


def ask_each(request: JudgeRequest, conversations: list[list[dict]], validator: type[BaseModel], schema_name: str,
             schema: dict, description: str) -> list[dict]:
    """``ask_judgment`` for each conversation (a list of chat messages), ``request.max_concurrency`` at a
    time, with one progress bar; the reply must validate as ``validator`` under ``schema``.

    :return: one ``ask_judgment`` record per conversation, in order.
    """
    response_format = response_format_of(request.response_format, schema_name, schema, request.rationale_max_chars)
    asks = [
        lambda messages=messages: ask_judgment(request.client, request.cache, messages, response_format, validator,
                                               request.max_tokens, request.malformed_retries)
        for messages in conversations
    ]
    return asked_concurrently(asks, request.max_concurrency, description)
