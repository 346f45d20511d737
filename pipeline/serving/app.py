"""The HTTP side of `expert serve`: Starlette routes over a `Service`, and `run` (uvicorn; SIGTERM drains, exit 0).

Bad input is a 400 (bad JSON, missing field) or 413 (body or text too long) with an OpenAI-style error body;
an unexpected error is a 500 for that request only. Each handler is a plain function of the service and the
request (`chat`, `predict`, `models`, `health`, `metrics`), so a test calls one without an app or a server;
`create_app` routes them. This module is imported only when serving (the package's names load lazily).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pipeline.console import console
from pipeline.serving.errors import HTTPError
from pipeline.serving.options import ServeOptions

if TYPE_CHECKING:
    from pipeline.serving.service import Service

ENDPOINTS = ("/v1/chat/completions", "/v1/predict", "/v1/models", "/health", "/metrics")
MAX_TEXTS_PER_PREDICT = 64


def escalation_headers(rows: list[dict[str, Any]]) -> dict[str, str]:
    headers = {
        "X-Expert-Escalated": "true" if any(r["escalated"] for r in rows) else "false",
        "X-Expert-Unsure": "true" if any(r["escalate"] for r in rows) else "false",
    }
    if any("escalation_error" in r for r in rows):
        headers["X-Expert-Escalation-Failed"] = "true"
    if any("expert_error" in r for r in rows):
        headers["X-Expert-Model-Error"] = "true"
    if len(rows) == 1:
        if rows[0]["confidence"] is not None:
            headers["X-Expert-Confidence"] = f"{rows[0]['confidence']:.6f}"
        headers["X-Expert-Tier"] = rows[0].get("tier", "expert")
    return headers


def answer_logprobs(content: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """`logprobs: true`: the answer as one entry whose log-probability is the log of its confidence, so an OpenAI
    client that multiplies token probabilities (a teacher, a routing tier) gets the answer's probability. An
    escalated answer is another system's: its confidence is not the expert's, so it gets none."""
    if row.get("escalated") or not row.get("confidence"):
        return None
    return {"content": [{"token": content, "logprob": math.log(row["confidence"]), "bytes": None, "top_logprobs": []}]}


def _not_a_number(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


async def read_json(request, limit: int, timeout_s: float) -> Any:
    """The request's JSON body: 413 past `limit` bytes; 408 when it has not all arrived within `timeout_s` (a
    client that sends half a body and stalls would otherwise hold its handler forever: uvicorn times out idle
    connections, not body reads); 400 for what is not strict JSON (NaN and Infinity included)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body is {declared} bytes; the limit is {limit} (serve --max-body-bytes)",
                        code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"request body is over {limit} bytes (serve --max-body-bytes)",
                                    code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came; serve "
                             "--body-timeout)", code="body_timeout") from None
    raw = b"".join(chunks)
    try:
        return json.loads(raw, parse_constant=_not_a_number)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
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


def error_response(err: HTTPError) -> JSONResponse:
    response = JSONResponse(err.body(), status_code=err.status)
    if err.status == 408:  # the rest of the body may still come: the connection cannot be reused
        response.headers["Connection"] = "close"
    return response


def check_model(service: Service, body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, f"`model` is required; this server serves `{service.model_name}`", "model", "invalid_value")
    if model not in (service.model_name, service.model_uri):
        raise HTTPError(404, f"model `{model}` is not served here; use `{service.model_name}`", "model",
                        "model_not_found")


# The handlers: plain functions of the service and the request (a test calls one without an app or a server);
# a request problem is an HTTPError, which `instrumented` answers.

async def chat(service: Service, request: Request) -> Response:
    body = await read_json(request, service.options.max_body_bytes, service.options.body_timeout_s)
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object", code="invalid_value")
    check_model(service, body)
    if body.get("n") not in (None, 1):
        raise HTTPError(400, "`n` must be 1: the expert gives one answer", "n", "invalid_value")
    if not isinstance(body.get("stream", False), bool):
        raise HTTPError(400, "`stream` must be true or false", "stream", "invalid_value")
    text, prompt_tokens = service.check_text(last_user_text(body.get("messages")), "messages")
    row = await service.answer(text)
    content = service.content(row["answer"])
    logprobs = answer_logprobs(content, row) if body.get("logprobs") is True else None
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
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                "logprobs": logprobs if delta else None}], **(more or {})}
            return f"data: {json.dumps(doc, ensure_ascii=False, allow_nan=False)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": content}, None, {"expert": extra})
            yield chunk({}, "stop", {"usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": service.model_name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "finish_reason": "stop", "logprobs": logprobs}],
        "usage": usage,
        "expert": extra,
    }, headers=headers)


async def predict(service: Service, request: Request) -> Response:
    body = await read_json(request, service.options.max_body_bytes, service.options.body_timeout_s)
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


async def models(service: Service, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": service.model_name, "object": "model", "created": 0, "owned_by": "expert"}]})


async def health(service: Service, request: Request) -> Response:
    doc = await service.health()
    return JSONResponse(doc, status_code=200 if doc["status"] == "ok" else 503)


async def metrics(service: Service, request: Request) -> Response:
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")


async def not_found(service: Service, request: Request, exc: StarletteHTTPException) -> Response:
    endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
    service.metrics.request(endpoint, exc.status_code, 0.0)
    message = "method not allowed" if exc.status_code == 405 else f"no route {request.url.path}"
    return JSONResponse(HTTPError(exc.status_code, message).body(), status_code=exc.status_code)


def instrumented(service: Service, endpoint: str, handler: Callable[[Service, Request], Awaitable[Response]]):
    """`handler` as a Starlette endpoint: its HTTPError answered with an OpenAI-style body, any other error a 500
    for this request only, and every answer counted in /metrics."""
    async def endpoint_fn(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(service, request)
        except HTTPError as err:
            response = error_response(err)
        except ClientDisconnect:  # the client went away mid-request: nothing to answer, nothing to report
            response = Response(status_code=499)
        except Exception as err:  # noqa: BLE001 - this request fails, the server stays up
            traceback.print_exc(file=sys.stderr)
            response = error_response(HTTPError(500, f"internal error: {type(err).__name__}", code="internal_error"))
        service.metrics.request(endpoint, response.status_code, time.perf_counter() - started)
        return response

    return endpoint_fn


def create_app(service: Service) -> Starlette:
    async def metrics_fn(request: Request) -> Response:
        return await metrics(service, request)

    async def not_found_fn(request: Request, exc: StarletteHTTPException) -> Response:
        return await not_found(service, request, exc)

    routes = [
        Route("/v1/chat/completions", instrumented(service, "/v1/chat/completions", chat), methods=["POST"]),
        Route("/v1/predict", instrumented(service, "/v1/predict", predict), methods=["POST"]),
        Route("/v1/models", instrumented(service, "/v1/models", models), methods=["GET"]),
        Route("/health", instrumented(service, "/health", health), methods=["GET"]),
        Route("/metrics", metrics_fn, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={StarletteHTTPException: not_found_fn})


def run(model_uri: str, host: str, port: int, options: ServeOptions) -> None:
    """Load the version and serve until interrupted."""
    import uvicorn

    from pipeline.serving.loading import load_service

    service = load_service(model_uri, options)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)
    info = service.info()
    console.print(
        f"serving [bold]{service.model_name}[/] v{service.version or '?'} ({info['task']}) on http://{host}:{port}  "
        f"escalation {info['escalation']}; frontier down -> {options.frontier_down}"
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
