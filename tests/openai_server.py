"""A real local HTTP server speaking the OpenAI chat-completions API, with scriptable faults.

Used by the judge tests (fault injection) and bench/bench_judge.py (fixed latency). Stdlib only.

    with FakeJudgeServer(script=[{"status": 429, "retry_after": 1}, 500]) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="x")

A fault is an int (HTTP status with an OpenAI-style error body), a str kind, or a dict with "status" or
"kind" plus options. Kinds:
    "timeout"         sleep `sleep` seconds (default 10; woken early when the server closes), then reply
    "garbage"         200 with a non-JSON body (content type application/json)
    "html"            200 with an HTML body (content type text/html), as a misconfigured proxy would send
    "wrong_json"      200 with valid JSON that is not a chat completion
    "empty_choices"   200 with a valid completion whose choices list is empty
    "content_filter"  200 with finish_reason "content_filter" and no content
    "refusal"         200 with message.refusal set (structured-output style refusal)
    "disconnect"      close the connection without sending a response
Dict options: "retry_after" (seconds, Retry-After header), "retry_after_ms" (retry-after-ms header),
"code" (error code in the body, e.g. "content_filter" for Azure's prompt filter), "sleep", "echo_auth" (put
the received credentials in the error message, to test that clients never surface them).

Faults are taken in call order from `script` (a list, consumed; or a dict call index -> fault), then from
`fault_fn(request, call_index)` if given, then `default_fault` (a persistent fault), else a normal reply.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = int | str | dict[str, Any]


def score_of(text: str) -> int:
    """Deterministic 1..5 score from a string, so tests can predict replies."""
    return 1 + sum(map(ord, text)) % 5


def default_reply(request: dict) -> str:
    """A score on the first line, then an echo of the last message (so tests can check order)."""
    last = request["messages"][-1].get("content") or ""
    if not isinstance(last, str):  # content parts: join the text ones
        last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
    return f"{score_of(last)}\necho: {last}"


def _logprobs(text: str, top_n: int) -> dict:
    """First token is the score digit with alternatives "1".."5"; the rest of the text is one more token."""
    score, _, rest = text.partition("\n")
    alts = {str(s): (-0.05 if str(s) == score else -3.0 - s * 0.1) for s in range(1, 6)}
    ranked = sorted(alts.items(), key=lambda kv: -kv[1])[:top_n]
    content = [
        {
            "token": score,
            "logprob": alts.get(score, -0.05),
            "bytes": list(score.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked],
        }
    ]
    if rest:
        tok = "\n" + rest
        top = [{"token": tok, "logprob": 0.0, "bytes": list(tok.encode())}][:top_n]
        content.append({"token": tok, "logprob": 0.0, "bytes": list(tok.encode()), "top_logprobs": top})
    return {"content": content, "refusal": None}


class FakeJudgeServer:
    def __init__(
        self,
        script: list[Fault] | dict[int, Fault] | None = None,
        default_fault: Fault | None = None,
        fault_fn: Callable[[dict, int], Fault | None] | None = None,
        reply_fn: Callable[[dict], str] = default_reply,
        latency_s: float = 0.0,
        host: str = "127.0.0.1",
    ):
        self.script = list(script) if isinstance(script, list) else dict(script or {})
        self.default_fault = default_fault
        self.fault_fn = fault_fn
        self.reply_fn = reply_fn
        self.latency_s = latency_s
        self.host = host
        self.lock = threading.Lock()
        self.closing = threading.Event()  # wakes handlers that sleep, so close() never waits on them
        self.calls = 0
        self.faults: Counter[str] = Counter()  # fault kind (or "ok") -> count
        self.auth_headers: list[str | None] = []  # Authorization (OpenAI) or api-key (Azure) as received
        self.requests: list[dict] = []  # parsed request bodies
        self.call_times: list[float] = []  # time.monotonic() at receipt
        self.paths: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://{self.host}:{self._httpd.server_address[1]}/v1"

    @property
    def root_url(self) -> str:
        """Without /v1: what AzureOpenAI takes as azure_endpoint."""
        return self.base_url[: -len("/v1")]

    def start(self) -> FakeJudgeServer:
        self._httpd = ThreadingHTTPServer((self.host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- behaviour

    def _next_fault(self, request: dict, index: int) -> Fault | None:
        with self.lock:
            if isinstance(self.script, list) and self.script:
                return self.script.pop(0)
            if isinstance(self.script, dict) and index in self.script:
                return self.script[index]
        if self.fault_fn is not None:
            fault = self.fault_fn(request, index)
            if fault is not None:
                return fault
        return self.default_fault

    def completion(self, request: dict, text: str | None, finish_reason: str = "stop", **message: Any) -> dict:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None, **message},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        if request.get("logprobs") and text is not None:
            choice["logprobs"] = _logprobs(text, int(request.get("top_logprobs") or 0))
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
        completion_tokens = len((text or "").split())
        return {
            "id": f"chatcmpl-fake{self.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        }


def _fault_kind(fault: Fault) -> tuple[str, dict[str, Any]]:
    if isinstance(fault, int):
        return str(fault), {"status": fault}
    if isinstance(fault, str):
        return fault, {}
    opts = dict(fault)
    kind = str(opts.get("kind", opts.get("status")))
    return kind, opts


def _make_handler(server: FakeJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers
        timeout = 30  # idle keep-alive connections end eventually
        disable_nagle_algorithm = True  # else headers and body in two writes cost a 40 ms delayed ACK

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests capture stderr
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers=headers)

        def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
            err = {"message": message, "type": "fake_error", "param": None, "code": code}
            self._json(status, {"error": err}, headers)

        def do_POST(self) -> None:
            try:
                self._handle()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.split("?")[0].endswith("/chat/completions"):
                self._error(404, f"no route {self.path}")
                return
            try:
                request = json.loads(body)
                assert isinstance(request, dict) and "messages" in request and "model" in request
            except (ValueError, AssertionError):
                self._error(400, "request body must be JSON with model and messages")
                return
            with server.lock:
                index = server.calls
                server.calls += 1
                server.requests.append(request)
                server.auth_headers.append(self.headers.get("Authorization") or self.headers.get("api-key"))
                server.call_times.append(time.monotonic())
                server.paths.append(self.path)
            if server.latency_s:
                server.closing.wait(server.latency_s)
            fault = server._next_fault(request, index)
            kind, opts = _fault_kind(fault) if fault is not None else ("ok", {})
            with server.lock:
                server.faults[kind] += 1

            if "status" in opts:
                headers = {}
                if "retry_after" in opts:
                    headers["Retry-After"] = str(opts["retry_after"])
                if "retry_after_ms" in opts:
                    headers["retry-after-ms"] = str(opts["retry_after_ms"])
                message = f"injected HTTP {opts['status']}"
                if opts.get("echo_auth"):  # like real APIs that quote the (masked) key back: a leak test
                    message += f"; credentials received: {server.auth_headers[index]}"
                self._error(int(opts["status"]), message, opts.get("code"), headers)
            elif kind == "timeout":
                server.closing.wait(float(opts.get("sleep", 10)))
                self._json(200, server.completion(request, server.reply_fn(request)))
            elif kind == "garbage":
                self._send(200, b'{"id": "chatcmpl-x", "choices": [{"mess')
            elif kind == "html":
                self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            elif kind == "wrong_json":
                self._json(200, {"hello": "world"})
            elif kind == "empty_choices":
                resp = server.completion(request, "x")
                resp["choices"] = []
                self._json(200, resp)
            elif kind == "content_filter":
                self._json(200, server.completion(request, None, finish_reason="content_filter"))
            elif kind == "refusal":
                self._json(200, server.completion(request, None, refusal="I can't help with that."))
            elif kind == "disconnect":
                self.close_connection = True
            elif kind == "ok":
                self._json(200, server.completion(request, server.reply_fn(request)))
            else:
                raise ValueError(f"unknown fault {fault!r}")

    return Handler
