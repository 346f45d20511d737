"""`expert serve`: a registered expert behind an OpenAI-compatible HTTP endpoint, with the cascade built in.

Endpoints (Starlette on uvicorn, both already installed with MLflow 3):

- `POST /v1/chat/completions`: OpenAI chat completions; the last user message
  is the input, `model` is the registered name; the answer (label, JSON object
  as text, or generated text) is the assistant message. `stream: true` gets
  the same answer as server-sent events. Extra top-level field `expert` and
  headers `X-Expert-*` carry confidence and escalation.
- `POST /v1/predict`: `{"text": ...}` -> `{"answer", "confidence", ...}`, or
  `{"texts": [...]}` -> `{"predictions": [...]}`.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

One worker thread owns the model and drains a queue: requests that arrive
while a batch runs (or within `batch_wait_ms` of the first) are answered in
one batch, and each request awaits its own future. Answers below the
version's cascade threshold go to the recipe's frontier baseline (the key
comes from the environment variable the recipe names, never logged); when
the frontier fails the expert's answer comes back flagged, or 502, as
configured. Bad input is a 400 (bad JSON, missing field) or 413 (body or
text too long) with an OpenAI-style error body; an unexpected error is a 500
for that request only.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import frontier, lean_forward, predict, tasks
from pipeline.errors import UserError
from pipeline.prep import SURROGATE  # prep's rule for what is text, applied to requests
from pipeline.ui import console

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ENDPOINTS = ("/v1/chat/completions", "/v1/predict", "/v1/models", "/health", "/metrics")
MAX_TEXTS_PER_PREDICT = 64


@dataclass(frozen=True)
class ServeOptions:
    escalate: bool = True  # send answers under the threshold to the frontier
    frontier_down: Literal["flag", "502"] = "flag"  # when the frontier fails: flagged expert answer, or 502
    max_batch: int = 16  # most requests in one model call
    batch_wait_ms: float = 0.0  # after the first queued request, wait this long for more (a lone request pays it)
    max_body_bytes: int = 64 * 1024  # larger request bodies get 413
    max_input_tokens: int | None = None  # longer texts get 413; default: the recipe's data.max_tokens
    frontier_retries: int = 1  # retries per escalated request (serving cannot wait like eval)
    frontier_timeout_s: float = 10.0
    merge: bool = True  # fold the LoRA weights into the base at load: same answers, less work per token
    pack: bool = True  # after merging, keep bf16 weights in oneDNN's layout: bit-identical answers, ~1.3x faster
    lean_forward: bool = True  # Llama label scoring: fused projections, no transformers plumbing; bit-identical, ~12% faster
    threads: int | None = None  # torch CPU threads for the model; default: torch's (one per core)


class HTTPError(Exception):
    """A request problem answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                502: "upstream_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and histograms in Prometheus text format (exposition 0.0.4), kept by hand: no new dependency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.escalations: dict[str, int] = {}  # outcome -> count
        self.latency: dict[str, list[float]] = {}  # endpoint -> [bucket counts..., sum, count]
        self.batches: list[float] = [0.0] * (len(BATCH_BUCKETS) + 2)
        self.queue_depth = 0

    @staticmethod
    def _observe(hist: list[float], buckets, value: float) -> None:
        for i, bound in enumerate(buckets):
            if value <= bound:
                hist[i] += 1
        hist[-2] += value
        hist[-1] += 1

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 400:
                self.errors[key] = self.errors.get(key, 0) + 1
            hist = self.latency.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS) + 2))
            self._observe(hist, LATENCY_BUCKETS, seconds)

    def escalation(self, outcome: str) -> None:
        with self._lock:
            self.escalations[outcome] = self.escalations.get(outcome, 0) + 1

    def batch(self, size: int) -> None:
        with self._lock:
            self._observe(self.batches, BATCH_BUCKETS, size)

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP expert_requests_total HTTP requests by endpoint and status code.",
                "# TYPE expert_requests_total counter",
            ]
            out += [f'expert_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP expert_errors_total Requests answered with a 4xx or 5xx status.",
                    "# TYPE expert_errors_total counter"]
            out += [f'expert_errors_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.errors.items())]
            out += ["# HELP expert_escalations_total Answers under the cascade threshold, by outcome: "
                    "frontier (answered by the frontier), failed (frontier error; expert answer flagged or 502), "
                    "not_sent (no frontier configured or escalation off).",
                    "# TYPE expert_escalations_total counter"]
            out += [f'expert_escalations_total{{outcome="{o}"}} {n}' for o, n in sorted(self.escalations.items())]
            out += ["# HELP expert_request_duration_seconds Request latency, from body read to response.",
                    "# TYPE expert_request_duration_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                out += _histogram_lines("expert_request_duration_seconds", f'endpoint="{endpoint}"', LATENCY_BUCKETS, hist)
            out += ["# HELP expert_batch_size Requests answered per model call (micro-batching).",
                    "# TYPE expert_batch_size histogram"]
            out += _histogram_lines("expert_batch_size", "", BATCH_BUCKETS, self.batches)
            out += ["# HELP expert_queue_depth Requests waiting for the model.", "# TYPE expert_queue_depth gauge",
                    f"expert_queue_depth {self.queue_depth}"]
            return "\n".join(out) + "\n"


def _histogram_lines(name: str, labels: str, buckets, hist: list[float]) -> list[str]:
    sep = "," if labels else ""
    lines = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {int(hist[i])}' for i, b in enumerate(buckets)]
    lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {int(hist[-1])}')
    braces = f"{{{labels}}}" if labels else ""
    lines += [f"{name}_sum{braces} {hist[-2]:.6f}", f"{name}_count{braces} {int(hist[-1])}"]
    return lines


# --------------------------------------------------------------------------- the model worker


class BatchingEngine:
    """One thread owns the model: it takes a queued request, gathers whatever else is queued (up to
    `max_batch`, waiting at most `batch_wait_ms` for more), answers them in one call and resolves
    each request's future. A failing batch fails its requests, never the thread."""

    def __init__(self, expert, options: ServeOptions, metrics: Metrics):
        self.expert, self.options, self.metrics = expert, options, metrics
        self.queue: queue.Queue[tuple[str, Future] | None] = queue.Queue()
        self.prefix = None
        self.fallbacks = 0  # batches that could not use the cached system-prompt prefix
        if expert.recipe.task.type == "classification":
            self.prefix = self._system_prefix()
        self.thread = threading.Thread(target=self._loop, name="expert-model", daemon=True)
        self.thread.start()

    def _prompt(self, text: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.expert.system_prompt}, {"role": "user", "content": text}]

    def _system_prefix(self):
        """The KV cache of the tokens every prompt starts with (system prompt and label list), computed once."""
        texts = predict.prompt_texts(self.expert.tokenizer, [self._prompt("a"), self._prompt("b")])
        return predict.shared_prefix(self.expert.model, self.expert.tokenizer, texts)

    def submit(self, text: str) -> Future:
        future: Future = Future()
        self.queue.put((text, future))
        self.metrics.queue_depth = self.queue.qsize()
        return future

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        wait_s = self.options.batch_wait_ms / 1000
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + wait_s
            while len(batch) < self.options.max_batch:
                try:
                    nxt = self.queue.get_nowait() if wait_s <= 0 else self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self.metrics.queue_depth = self.queue.qsize()
            batch = [(t, f) for t, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                rows = self.infer([t for t, _ in batch])
            except Exception as err:  # noqa: BLE001 - the batch fails, the worker lives on
                traceback.print_exc(file=sys.stderr)
                for _, fut in batch:
                    fut.set_exception(err)
                continue
            self.metrics.batch(len(batch))
            for (_, fut), row in zip(batch, rows):
                fut.set_result(row)

    def infer(self, texts: list[str]) -> list[dict[str, Any]]:
        """Answer and confidence per text, exactly as `predict.answer` computes them."""
        expert = self.expert
        prompts = [self._prompt(t) for t in texts]
        if self.prefix is None:
            rows = predict.answer(expert.model, expert.tokenizer, prompts, expert.recipe, expert.spec)
            return [{"answer": r["prediction"], "confidence": float(r["confidence"])} for r in rows]
        rendered = predict.prompt_texts(expert.tokenizer, prompts)
        n = len(self.prefix.ids)
        if any(expert.tokenizer(p, add_special_tokens=False)["input_ids"][:n] != self.prefix.ids for p in rendered):
            # a text whose first token merges into the template (never seen so far): the uncached path
            self.fallbacks += 1
            rows = predict.classify(expert.model, expert.tokenizer, prompts, expert.spec, len(prompts))
            return [{"answer": r["prediction"], "confidence": float(r["confidence"])} for r in rows]
        rows = predict.classify(expert.model, expert.tokenizer, prompts, expert.spec, len(prompts), prefix=self.prefix)
        return [{"answer": r["prediction"], "confidence": float(r["confidence"])} for r in rows]


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    """A loaded version with its worker, frontier set-up and metrics; the HTTP layer calls `answer`."""

    expert: Any
    model_name: str
    version: str | None
    model_uri: str
    options: ServeOptions
    metrics: Metrics = field(default_factory=Metrics)
    engine: BatchingEngine | None = None
    baseline: Any = None  # the recipe's frontier baseline (openai), when escalation can happen
    frontier_key: str | None = field(default=None, repr=False)
    escalation_note: str = ""
    pool: ThreadPoolExecutor | None = None
    tokenizer: Any = None  # a copy for the HTTP side: fast tokenizers must not be shared across threads

    def __post_init__(self) -> None:
        self.tokenizer = copy.deepcopy(self.expert.tokenizer)
        self.max_input_tokens = self.options.max_input_tokens or self.expert.recipe.data.max_tokens
        self.task = tasks.for_type(self.expert.recipe.task.type)
        self._setup_frontier()
        if self.engine is None:
            self.engine = BatchingEngine(self.expert, self.options, self.metrics)

    def _setup_frontier(self) -> None:
        expert = self.expert
        if expert.threshold is None:
            self.escalation_note = "off: the version has no cascade threshold"
            return
        baseline = next((b for b in expert.recipe.eval.baselines if b.name == expert.frontier and b.kind == "openai"), None)
        if not self.options.escalate:
            self.escalation_note = "off: --no-escalate"
        elif baseline is None:
            self.escalation_note = f"off: the cascade frontier `{expert.frontier}` is not an openai baseline"
        elif not os.environ.get(baseline.api_key_env or ""):
            self.escalation_note = f"off: {baseline.api_key_env} is not set"
        else:
            self.baseline = baseline.model_copy(
                update={"max_retries": self.options.frontier_retries, "timeout_s": self.options.frontier_timeout_s}
            )
            self.frontier_key = os.environ[baseline.api_key_env]
            self.pool = ThreadPoolExecutor(max_workers=baseline.max_concurrency, thread_name_prefix="frontier")
            self.escalation_note = f"on: below {expert.threshold:.4f} to `{baseline.name}` ({baseline.model})"

    def close(self) -> None:
        if self.engine:
            self.engine.close()
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.engine.alive() else "worker stopped",
            "model": self.model_name,
            "version": self.version,
            "task": self.expert.recipe.task.type,
            "threshold": self.expert.threshold,
            "escalation": self.escalation_note,
            "frontier_down": self.options.frontier_down,
        }

    def check_text(self, text: Any, param: str) -> tuple[str, int]:
        if not isinstance(text, str) or not text.strip():
            raise HTTPError(400, f"`{param}` must be a non-empty string", param, "invalid_value")
        if SURROGATE.search(text):
            raise HTTPError(400, f"`{param}` holds a lone UTF-16 surrogate (such as \\ud800): not valid Unicode text",
                            param, "invalid_value")
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > self.max_input_tokens:
            raise HTTPError(413, f"`{param}` is {n} tokens; this expert accepts at most {self.max_input_tokens} "
                                 "(the recipe's data.max_tokens, or serve --max-input-tokens)", param, "input_too_long")
        return text, n

    async def answer(self, text: str) -> dict[str, Any]:
        """The expert's answer; under the threshold, the frontier's (or the flagged fallback)."""
        row = await asyncio.wrap_future(self.engine.submit(text))
        unsure = self.expert.threshold is not None and row["confidence"] < self.expert.threshold
        out = {**row, "escalate": unsure, "escalated": False}
        if not unsure:
            return out
        if self.baseline is None:
            self.metrics.escalation("not_sent")
            out["escalation_skipped"] = self.escalation_note.removeprefix("off: ")
            return out
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self.pool, self._ask_frontier, text)
        parsed = self.task.parse_answer(reply["raw"], self.expert.spec) if reply.get("raw") is not None else None
        if parsed is None:
            error = reply.get("error") or "the frontier's answer could not be parsed"
            self.metrics.escalation("failed")
            if self.options.frontier_down == "502":
                raise HTTPError(502, f"the answer needed the frontier (confidence {row['confidence']:.4f} < threshold "
                                     f"{self.expert.threshold:.4f}) and the frontier failed: {error}",
                                code="frontier_unavailable")
            out["escalation_error"] = error
            return out
        self.metrics.escalation("frontier")
        out.update(expert_answer=row["answer"], answer=parsed, escalated=True)
        return out

    def _ask_frontier(self, text: str) -> dict[str, Any]:
        expert = self.expert
        messages = [{"role": "system", "content": expert.baseline_system_prompt}, {"role": "user", "content": text}]
        schema = expert.spec if expert.recipe.task.type == "extraction" else None
        return frontier.ask_all(self.baseline, self.frontier_key, [messages], expert.recipe.eval.max_new_tokens, schema)[0]

    def content(self, answer: Any) -> str:
        if answer is None:
            return ""
        return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def escalation_headers(rows: list[dict[str, Any]]) -> dict[str, str]:
    headers = {
        "X-Expert-Escalated": "true" if any(r["escalated"] for r in rows) else "false",
        "X-Expert-Unsure": "true" if any(r["escalate"] for r in rows) else "false",
    }
    if any("escalation_error" in r for r in rows):
        headers["X-Expert-Escalation-Failed"] = "true"
    if len(rows) == 1:
        headers["X-Expert-Confidence"] = f"{rows[0]['confidence']:.6f}"
    return headers


# --------------------------------------------------------------------------- HTTP


async def read_json(request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body is {declared} bytes; the limit is {limit} (serve --max-body-bytes)",
                        code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over {limit} bytes (serve --max-body-bytes)", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPError(400, f"the body is not valid JSON ({err})", code="invalid_json") from None
    except RecursionError:  # 30k-deep nesting: Python's parser gives up, which is the client's doing
        raise HTTPError(400, "the body's JSON is nested too deeply", code="invalid_json") from None



def last_user_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "`messages` must be a non-empty list of {role, content} objects", "messages", "invalid_value")
    for i, message in reversed(list(enumerate(messages))):
        if not isinstance(message, dict) or "role" not in message:
            raise HTTPError(400, f"`messages[{i}]` must be an object with `role` and `content`", f"messages[{i}]",
                            "invalid_value")
        if message["role"] != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str) or not content.strip():
            raise HTTPError(400, f"`messages[{i}].content` must be non-empty text", f"messages[{i}].content",
                            "invalid_value")
        return content
    raise HTTPError(400, "`messages` has no user message: the last user message is the expert's input", "messages",
                    "invalid_value")


def create_app(service: Service):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error_response(err: HTTPError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def instrumented(endpoint: str, handler):
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except HTTPError as err:
                response = error_response(err)
            except ClientDisconnect:  # the client went away mid-request: nothing to answer, nothing to report
                response = Response(status_code=499)
            except Exception as err:  # noqa: BLE001 - this request fails, the server stays up
                traceback.print_exc(file=sys.stderr)
                response = error_response(HTTPError(500, f"internal error: {type(err).__name__}", code="internal_error"))
            service.metrics.request(endpoint, response.status_code, time.perf_counter() - started)
            return response

        return wrapped

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(400, f"`model` is required; this server serves `{service.model_name}`", "model", "invalid_value")
        if model not in (service.model_name, service.model_uri):
            raise HTTPError(404, f"model `{model}` is not served here; use `{service.model_name}`", "model",
                            "model_not_found")

    async def chat(request: Request) -> Response:
        body = await read_json(request, service.options.max_body_bytes)
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object", code="invalid_value")
        check_model(body)
        if body.get("n") not in (None, 1):
            raise HTTPError(400, "`n` must be 1: the expert gives one answer", "n", "invalid_value")
        if not isinstance(body.get("stream", False), bool):
            raise HTTPError(400, "`stream` must be true or false", "stream", "invalid_value")
        text, prompt_tokens = service.check_text(last_user_text(body.get("messages")), "messages")
        row = await service.answer(text)
        content = service.content(row["answer"])
        completion_tokens = len(service.tokenizer(content, add_special_tokens=False)["input_ids"]) if content else 0
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        extra = {"version": service.version, **row}
        extra.pop("answer")
        headers = escalation_headers([row])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if body.get("stream"):
            def chunk(delta: dict, finish: str | None, more: dict | None = None) -> str:
                doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": service.model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **(more or {})}
                return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

            async def events():
                yield chunk({"role": "assistant", "content": content}, None, {"expert": extra})
                yield chunk({}, "stop", {"usage": usage})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": service.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
            "expert": extra,
        }, headers=headers)

    async def predict_route(request: Request) -> Response:
        body = await read_json(request, service.options.max_body_bytes)
        if not isinstance(body, dict) or ("text" in body) == ("texts" in body):
            raise HTTPError(400, 'the body must be a JSON object with `text` (a string) or `texts` (a list of strings)',
                            code="invalid_value")
        if "text" in body:
            text, _ = service.check_text(body["text"], "text")
            row = await service.answer(text)
            return JSONResponse({**row, "model": service.model_name, "version": service.version},
                                headers=escalation_headers([row]))
        texts = body["texts"]
        if not isinstance(texts, list) or not texts:
            raise HTTPError(400, "`texts` must be a non-empty list of strings", "texts", "invalid_value")
        if len(texts) > MAX_TEXTS_PER_PREDICT:
            raise HTTPError(413, f"`texts` has {len(texts)} items; send at most {MAX_TEXTS_PER_PREDICT} per request",
                            "texts", "too_many_inputs")
        checked = [service.check_text(t, f"texts[{i}]")[0] for i, t in enumerate(texts)]
        rows = await asyncio.gather(*(service.answer(t) for t in checked))
        return JSONResponse({"predictions": list(rows), "model": service.model_name, "version": service.version},
                            headers=escalation_headers(list(rows)))

    async def models_route(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": 0, "owned_by": "expert"}]})

    async def health(request: Request) -> Response:
        doc = service.health()
        return JSONResponse(doc, status_code=200 if doc["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc: StarletteHTTPException) -> Response:
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        service.metrics.request(endpoint, exc.status_code, 0.0)
        message = "method not allowed" if exc.status_code == 405 else f"no route {request.url.path}"
        return JSONResponse(HTTPError(exc.status_code, message).body(), status_code=exc.status_code)

    routes = [
        Route("/v1/chat/completions", instrumented("/v1/chat/completions", chat), methods=["POST"]),
        Route("/v1/predict", instrumented("/v1/predict", predict_route), methods=["POST"]),
        Route("/v1/models", instrumented("/v1/models", models_route), methods=["GET"]),
        Route("/health", instrumented("/health", health), methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={StarletteHTTPException: not_found})


# --------------------------------------------------------------------------- loading and running


def registered_name_version(model_uri: str) -> tuple[str | None, str | None]:
    """(name, version) of a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI; Nones for other URIs."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", model_uri)
    if not match:
        return None, None
    name, number, alias = match.groups()
    if number:
        return name, number
    try:
        from pipeline import tracking

        return name, tracking.client().get_model_version_by_alias(name, alias).version
    except Exception:  # noqa: BLE001 - the version number is informative only
        return name, None


def load_service(model_uri: str, options: ServeOptions) -> Service:
    """Load a version and start its worker.

    The loading runs on a short-lived thread so that the model worker is the only thread that ever runs torch's
    OpenMP parallel regions: with a second team alive (the loading thread's, kept by libgomp for as long as that
    thread lives), libgomp counts more threads than cores and makes idle workers sleep after every parallel
    region instead of spinning, which cost ~20 ms per served request (40k context switches per 60 requests).
    The thread is a daemon so that Ctrl-C during a long load ends the command at once.
    """
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["service"] = _load_service(model_uri, options)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = err

    loader = threading.Thread(target=load, name="expert-load", daemon=True)
    loader.start()
    loader.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["service"]


def _load_service(model_uri: str, options: ServeOptions) -> Service:
    from pipeline import registry

    if options.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if options.threads is not None:
        if options.threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(options.threads)
    _, expert = registry.load_version(model_uri)
    merged = options.merge and expert.recipe.model.quantization == "none" and hasattr(expert.model, "merge_and_unload")
    if merged:
        expert.model = expert.model.merge_and_unload().eval()
    if options.lean_forward and expert.recipe.task.type == "classification":
        console.print(lean_forward.install(expert.model))  # before packing: it stacks the unpacked q/k/v weights
    if merged and options.pack and (packed := predict.pack_linear_weights(expert.model)):
        console.print(f"packed {packed} bf16 linear layers for oneDNN (outputs checked bit-identical)")
    name, version = registered_name_version(model_uri)
    return Service(expert, name or expert.recipe.registry.model_name, version, model_uri, options)


def run(model_uri: str, host: str, port: int, options: ServeOptions) -> None:
    """Load the version and serve until interrupted."""
    import uvicorn

    service = load_service(model_uri, options)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)
    health = service.health()
    console.print(
        f"serving [bold]{service.model_name}[/] v{service.version or '?'} ({health['task']}) on http://{host}:{port}  "
        f"escalation {health['escalation']}; frontier down -> {options.frontier_down}"
    )
    stopped = _install_stop_handlers()
    try:
        server.run()  # on SIGTERM/SIGINT it drains, then re-raises the signal to the handlers installed here
    except stopped:
        pass
    finally:
        service.close()
    console.print(f"stopped serving {service.model_name}")


def _install_stop_handlers() -> type[BaseException]:
    """SIGTERM/SIGINT after uvicorn's graceful shutdown end the command with exit 0, not a signal death."""
    import signal

    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
    return Stopped
