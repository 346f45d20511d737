"""A real local HTTP server speaking the OpenAI chat-completions protocol.

Used by tests to exercise code that talks to an OpenAI-compatible endpoint
(teacher labelling, LLM-as-judge, baseline evaluation) without any network.

    with FakeOpenAIServer(lambda body: "billing", api_key="sk-test") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test")
        ...
        srv.faults.append(("status", 429, {"Retry-After": "0"}))

Faults queued in ``faults`` are consumed in order, one per incoming
chat-completions request:

* ``("status", code, headers)``  -> answer with that HTTP status, an
  OpenAI-style error body and the given extra headers;
* ``("malformed",)``             -> 200 with a body that is not valid JSON;
* ``("delay", seconds)``         -> compose (and bill) the answer, sleep, then send it: a slow or hanging
  endpoint that has done the work whether or not the client still waits;
* ``("echo_auth", code)``        -> that HTTP status with an error message that
  echoes the request's Authorization header, as some gateways do;
* ``("empty_choices",)``         -> 200 with an empty ``choices`` list.

A request with ``logprobs: true`` gets each answer word's log-probability
(``token_logprob``) in ``choices[0].logprobs.content``; one with ``n: k`` gets k
choices, the responder called once for each. With ``send_usage = False`` answers
carry no ``usage``. Every answer the server composes is billed in ``bills``
(prompt and completion tokens, its own count) whether or not it sends usage and
whether or not the client is still there: ``billed_usd(price_in, price_out)``
is what an endpoint would charge for the requests it received.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["FakeOpenAIServer", "count_tokens"]

_ERROR_TYPES = {
    400: ("invalid_request_error", "Bad request"),
    401: ("invalid_request_error", "Incorrect API key provided"),
    404: ("invalid_request_error", "Not found"),
    429: ("rate_limit_error", "Rate limit reached"),
    500: ("server_error", "The server had an error while processing your request"),
    503: ("server_error", "The engine is currently overloaded"),
}


def count_tokens(text: str) -> int:
    """Whitespace-split word count: the fake server's notion of a token."""
    return len(text.split())


def _content_text(content: Any) -> str:
    """Flatten a message ``content`` (string or list of content parts) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return str(content)


def _error_body(status: int, message: str | None = None) -> dict:
    err_type, default_msg = _ERROR_TYPES.get(status, ("api_error", f"HTTP {status}"))
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "not_found"}.get(status)
    return {
        "error": {
            "message": message or default_msg,
            "type": err_type,
            "param": None,
            "code": code,
        }
    }


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: 50 simultaneous clients would wait out TCP's SYN retries and fail
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client that gave up on a slow answer is expected


class FakeOpenAIServer:
    """OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1:<free port>."""

    def __init__(self, responder: Callable[[dict], str], *, api_key: str | None = None):
        self.responder = responder
        self.api_key = api_key
        self.requests: list[dict] = []
        self.faults: list = []
        # each answer token's log-probability, when a request asks for `logprobs`: a number, or a function of
        # (request, answer) for answers whose confidence differs
        self.token_logprob: float | Callable[[dict, str], float] = -0.1
        self.send_usage = True
        self.bills: list[tuple[int, int]] = []  # (prompt, completion) tokens of every answer composed
        self.base_url: str = ""
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        if self._httpd is not None:
            return self
        handler = _make_handler(self)
        httpd = _Server(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="FakeOpenAIServer", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers used by the handler ----------------------------------------
    def _record(self, body: dict) -> None:
        with self._lock:
            self.requests.append(body)

    def billed_usd(self, price_in: float, price_out: float) -> float:
        """Dollars for every answer composed, at these prices per million tokens."""
        with self._lock:
            return sum(p * price_in + c * price_out for p, c in self.bills) / 1e6

    def _bill(self, reply: dict) -> None:
        with self._lock:
            self.bills.append((reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]))

    def _next_fault(self):
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def completion_body(self, request: dict, content: str) -> dict:
        prompt_tokens = sum(
            count_tokens(_content_text(m.get("content")))
            for m in request.get("messages", [])
            if isinstance(m, dict)
        )
        prompt_tokens = max(prompt_tokens, 1)
        completion_tokens = max(count_tokens(content), 1)
        logprob = self.token_logprob(request, content) if callable(self.token_logprob) else self.token_logprob
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake-model"),
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": {"content": [{"token": word, "logprob": logprob, "bytes": None,
                                              "top_logprobs": []} for word in content.split()]}
                    if request.get("logprobs") else None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeOpenAI/1.0"

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(payload)

        def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def _authorized(self) -> bool:
            if server.api_key is None:
                return True
            return self.headers.get("Authorization", "") == f"Bearer {server.api_key}"

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models":
                if not self._authorized():
                    return self._send_json(401, _error_body(401))
                return self._send_json(200, {"object": "list", "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}]})
            self._send_json(404, _error_body(404, f"Unknown path {self.path}"))

        def do_POST(self):  # noqa: N802
            raw = self._read_body()
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/v1/chat/completions":
                return self._send_json(404, _error_body(404, f"Unknown path {self.path}"))
            if not self._authorized():
                return self._send_json(401, _error_body(401))
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body must be a JSON object")
            except ValueError as exc:
                return self._send_json(400, _error_body(400, f"Invalid JSON body: {exc}"))
            server._record(body)

            fault = server._next_fault()
            if fault is not None:
                kind = fault[0]
                if kind == "status":
                    status = int(fault[1])
                    headers = fault[2] if len(fault) > 2 else {}
                    return self._send_json(status, _error_body(status), headers)
                if kind == "echo_auth":
                    status = int(fault[1])
                    echoed = f"Invalid credentials in header Authorization: {self.headers.get('Authorization', '')}"
                    return self._send_json(status, _error_body(status, echoed))
                if kind == "empty_choices":
                    return self._send_json(200, {**server.completion_body(body, ""), "choices": []})
                if kind == "malformed":
                    return self._send(200, b'{"id": "chatcmpl-broken", "choices": [')
                if kind != "delay":
                    raise ValueError(f"unknown fault {fault!r}")

            try:
                contents = [str(server.responder(body)) for _ in range(int(body.get("n") or 1))]
            except Exception as exc:  # surface responder bugs as a 500
                return self._send_json(500, _error_body(500, f"responder failed: {exc!r}"))
            reply = server.completion_body(body, contents[0])
            if len(contents) > 1:  # `n` samples: one choice each, usage counting all of them
                reply["choices"] = [{**server.completion_body(body, c)["choices"][0], "index": i}
                                    for i, c in enumerate(contents)]
                reply["usage"]["completion_tokens"] = sum(max(count_tokens(c), 1) for c in contents)
                reply["usage"]["total_tokens"] = reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
            server._bill(reply)
            if not server.send_usage:
                del reply["usage"]
            if fault is not None and fault[0] == "delay":
                time.sleep(float(fault[1]))
            try:
                self._send_json(200, reply)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting: the answer was composed (and billed) all the same

    return Handler
