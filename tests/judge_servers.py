"""Real HTTP servers on loopback for the judge tests (no mock of the HTTP layer):

- ``LlamaCppServer``: ``python -m llama_cpp.server`` serving the embedded GGUF model, an
  OpenAI-compatible endpoint; its access log counts the requests it received.
- ``FaultyJudgeServer``: a stdlib ``http.server`` in a thread that answers like an OpenAI chat endpoint
  but misbehaves on purpose (429, 500, timeouts, malformed JSON) according to the request's ``model``.
- ``JudgeServerProcess``: a ``FaultyJudgeServer`` in its own process (``python judge_servers.py``), so a
  test can SIGKILL the judge in the middle of a run.
"""

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminates a server started by a test, killing it when it does not end within ``timeout`` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LlamaCppServer:
    """``python -m llama_cpp.server`` on ``127.0.0.1:<free port>``, stdout+stderr to ``log_path``."""

    def __init__(self, model_path: str, log_path: Path, n_ctx: int = 2048):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        command = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_ctx", str(n_ctx),
                   # one thread per generated token (a 135M model gains little from more, and a second
                   # busy core makes it slower), both cores for the prompt; OpenMP threads sleep when idle
                   "--n_threads", "1", "--n_threads_batch", "2"]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

    def wait_until_ready(self, seconds: float = 120.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"llama_cpp.server not ready after {seconds} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def chat_requests_logged(self, status: str = r"\d{3}") -> int:
        """Requests to ``/v1/chat/completions`` in the server's (uvicorn) access log so far, of any
        HTTP status or of ``status``."""
        return len(re.findall(rf'"POST /v1/chat/completions HTTP/1\.1" {status}\b', self.log_text()))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, 15)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, 9)
                self.process.wait(timeout=10)
        self._log.close()


def _longer_answer_verdict(request: dict) -> str:
    prompt = request["messages"][-1]["content"]
    answer_a, answer_b = prompt.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)
    return "A" if len(answer_a) > len(answer_b) else "B" if len(answer_b) > len(answer_a) else "tie"


def _valid_content(request: dict) -> str:
    """A valid judgment for the schema the request asked for (rubric, pairwise or probe); pairwise
    verdicts are "A" (always the answer shown first), or the longer answer for ``prefers-longer``."""
    response_format = request.get("response_format") or {}
    schema = response_format.get("schema") or response_format.get("json_schema", {}).get("schema") or {}
    properties = schema.get("properties", {})
    if "correctness" in properties:
        return json.dumps({c: {"rationale": f"{c} looks fine.", "score": 4}
                           for c in ("correctness", "coherence", "school_alignment")})
    if "verdict" in properties:
        verdict = _longer_answer_verdict(request) if request.get("model") == "prefers-longer" else "A"
        return json.dumps({"rationale": "One answer is closer to the reference.", "verdict": verdict})
    return json.dumps({"answer": "yes"})


def _completion(content: str, model: str) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FaultyJudgeServer:
    """A loopback OpenAI-style chat endpoint whose behaviour is chosen by the request's ``model``:

    - ``ok``: a valid judgment; pairwise, always answer "A" (the one shown first).
    - ``prefers-longer``: a valid judgment; pairwise, the longer answer wins (equal lengths: tie).
    - ``rate-limited-then-ok`` / ``error-then-ok``: HTTP 429 / 500 on the first two hits of each
      distinct request (``Retry-After-Ms: 10``), then a valid judgment.
    - ``slow-then-ok``: the first hit of each distinct request sleeps ``slow_seconds`` (past the
      client's timeout), later hits answer at once.
    - ``always-429``: HTTP 429 every time.
    - ``garbage-content``: HTTP 200 whose message content is not JSON.
    - ``garbage-body``: HTTP 200 whose body is not JSON at all.
    - ``bad-then-good``: a score out of range, then a valid judgment once the judge was told why.
    - ``rejects-json-schema``: HTTP 500 to a ``json_schema`` response format (as llama.cpp does).
    - ``echoes-key``: HTTP 401 whose error message repeats the bearer token (a hostile server).
    - ``echoes-key-in-reply``: a valid judgment whose rationales repeat the bearer token.

    ``hits`` counts requests per model; ``formats`` counts response-format types seen. With
    ``answer_limit``, valid judgments after the first ``answer_limit`` are never answered (the request
    is held open, as by a server that hangs); each valid judgment sent appends a line to
    ``answered_log`` when one is given. ``GET /v1/models`` lists ``listed_models``.
    """

    def __init__(self, slow_seconds: float = 1.0, port: int = 0, answer_limit: Optional[int] = None,
                 answered_log: Optional[Path] = None, listed_models: tuple = ()):
        self.hits: Counter = Counter()
        self.formats: Counter = Counter()
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self._answered = 0
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); that is the point of the slow scenario

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                models = [{"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in listed_models]
                self._send(200, json.dumps({"object": "list", "data": models}).encode())

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = json.loads(raw)
                model = request.get("model", "")
                digest = hashlib.sha256(raw).hexdigest()
                with server._lock:
                    server.hits[model] += 1
                    server.formats[(request.get("response_format") or {}).get("type")] += 1
                    server._seen[(model, digest)] += 1
                    seen = server._seen[(model, digest)]
                quick_retry = {"Retry-After-Ms": "10"}
                error = json.dumps({"error": {"message": "try again", "type": "server_error"}}).encode()
                if model in ("rate-limited-then-ok", "error-then-ok") and seen <= 2:
                    return self._send(429 if model.startswith("rate") else 500, error, headers=quick_retry)
                if model == "always-429":
                    return self._send(429, json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode(),
                                      headers=quick_retry)
                if model == "slow-then-ok" and seen == 1:
                    time.sleep(slow_seconds)
                if model == "garbage-content":
                    return self._send(200, json.dumps(_completion("Sure! The answer scores well.", model)).encode())
                if model == "garbage-body":
                    return self._send(200, b"<html>502 upstream hiccup</html>", "text/html")
                if model == "bad-then-good" and not any("could not be used" in str(m.get("content"))
                                                        for m in request["messages"]):
                    content = json.loads(_valid_content(request))
                    if "correctness" in content:
                        content["correctness"]["score"] = 9
                    else:
                        content["verdict"] = "maybe"
                    return self._send(200, json.dumps(_completion(json.dumps(content), model)).encode())
                if model == "rejects-json-schema" and (request.get("response_format") or {}).get("type") == "json_schema":
                    return self._send(500, json.dumps({"error": {"message": "json_schema unsupported"}}).encode())
                token = self.headers.get("Authorization", "")
                if model == "echoes-key":
                    return self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {token}"}}).encode())
                if model == "echoes-key-in-reply":
                    content = json.loads(_valid_content(request))
                    for value in [content, *content.values()]:
                        if isinstance(value, dict) and "rationale" in value:
                            value["rationale"] += f" (you sent {token})"
                    return self._send(200, json.dumps(_completion(json.dumps(content), model)).encode())
                with server._lock:
                    held = answer_limit is not None and server._answered >= answer_limit
                    if not held:
                        server._answered += 1
                if held:
                    server._closing.wait()
                    return
                self._send(200, json.dumps(_completion(_valid_content(request), model)).encode())
                if answered_log is not None:
                    with server._lock, open(answered_log, "a") as log:
                        log.write(f"{digest}\n")

        self._server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyJudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class JudgeServerProcess:
    """A ``FaultyJudgeServer`` run by this file in a child process on ``127.0.0.1:port`` (a free one when
    ``port`` is 0), so a test can SIGKILL it mid-run and start another on the same port (the same base
    URL, so the judge cache still matches). ``answered()`` counts the valid judgments it has sent."""

    def __init__(self, work_dir: Path, port: int = 0, answer_limit: Optional[int] = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.answered_log = work_dir / f"answered-{self.port}-{time.monotonic_ns()}.log"
        self.answered_log.touch()
        command = [sys.executable, __file__, "--port", str(self.port), "--answered-log", str(self.answered_log)]
        if answer_limit is not None:
            command += ["--answer-limit", str(answer_limit)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_until_ready(self, seconds: float = 30.0) -> "JudgeServerProcess":
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"judge server exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"judge server not ready after {seconds} s")

    def answered(self) -> int:
        return len(self.answered_log.read_text().splitlines())

    def kill(self) -> None:
        """SIGKILL, as an out-of-memory killer or a crash would: no cleanup, connections cut."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process.stderr.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A FaultyJudgeServer in the foreground, until killed.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer-limit", type=int)
    parser.add_argument("--answered-log", type=Path)
    args = parser.parse_args()
    judge = FaultyJudgeServer(port=args.port, answer_limit=args.answer_limit, answered_log=args.answered_log)
    judge._server.serve_forever()
