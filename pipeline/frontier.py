"""The `openai` baseline: any OpenAI-compatible chat-completions endpoint via the official SDK.

The API key is read from the environment variable the recipe names and goes
only to the SDK client: never to logs, MLflow, reports, the cache or the run
directory. Retries are ours, not the SDK's (its `max_retries` is 0), so they are
bounded, counted and tested: exponential backoff with jitter, or the server's
Retry-After, on 429, 5xx, timeouts, connection errors and malformed bodies.
Every successful answer is cached in SQLite keyed by endpoint, model, messages
and parameters, so a re-run makes zero calls; failures are never cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.recipe import BaselineSection

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0


def api_key(baseline: BaselineSection) -> str | None:
    """The key from the environment, or None (then the baseline is skipped, or fails when required)."""
    key = os.environ.get(baseline.api_key_env or "")
    if key:
        return key
    if baseline.required:
        raise UserError(
            f"eval.baselines `{baseline.name}`: environment variable {baseline.api_key_env} is not set and the "
            "baseline is marked required; export it or set required: false"
        )
    return None


def request_params(baseline: BaselineSection, max_tokens: int, schema: dict[str, Any] | None,
                   logprobs: bool = False) -> dict[str, Any]:
    """Everything sent besides the messages; part of the cache key. `logprobs` asks for the answer tokens'
    log-probabilities (answers then carry `confidence`)."""
    params: dict[str, Any] = {"temperature": 0, "max_tokens": max_tokens}
    if logprobs:
        params["logprobs"] = True
    if getattr(baseline, "samples", 1) > 1:  # k sampled answers in one request: their agreement is the confidence
        params.update(n=baseline.samples, temperature=baseline.sample_temperature)
    if schema is not None and baseline.json_schema_response:
        params["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return params


def cache_key(endpoint: str, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    payload = {"endpoint": endpoint.rstrip("/"), "model": model, "messages": messages, "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    """Successful chat completions in SQLite: key -> {raw, input_tokens, output_tokens, latency_s}.

    One connection shared by the worker threads behind a lock; writes commit
    at once, so an interrupted run keeps every answer it paid for.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")
        self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)",
                (key, json.dumps(value), time.time()),
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def default_cache_path() -> Path:
    from pipeline.models import cache_root

    return cache_root() / "responses.sqlite"


def retry_after_s(err: Exception) -> float | None:
    """The server's requested wait (Retry-After-Ms, or Retry-After in seconds or as an HTTP date)."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def is_retryable(err: Exception) -> bool:
    """429, 5xx, timeouts, connection errors and malformed bodies are worth another try; other 4xx are not."""
    import openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return isinstance(err, (ValueError, KeyError, IndexError, TypeError, AttributeError, openai.APIResponseValidationError))


def backoff_s(attempt: int, err: Exception, rng: random.Random) -> float:
    """Retry-After when the server sends one (capped), else exponential backoff with full jitter."""
    wanted = retry_after_s(err)
    if wanted is not None:
        return min(wanted, RETRY_AFTER_MAX_S)
    return rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt))


# what a secret looks like in text an endpoint sends back: an Authorization value, an OpenAI-style key
SECRET_SHAPES = re.compile(r"(?i)(bearer\s+)[^\s\"',;}]+|\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{8,}")
SECRET_ENV_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET")
REDACTED = "[REDACTED]"


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with the given secrets, every `*_API_KEY`/`*_TOKEN`/`*_SECRET` value in the environment, and
    anything shaped like a bearer token or API key replaced by [REDACTED]: an endpoint may echo the key in its
    error body, and error texts are stored, logged, logged to MLflow and sent to clients."""
    known = [v for v in secrets if v] + [v for k, v in os.environ.items() if k.endswith(SECRET_ENV_SUFFIXES) and v]
    for value in sorted({v for v in known if len(v) >= 8}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return SECRET_SHAPES.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def _describe(err: Exception, key: str | None = None) -> str:
    """An error as one line for reports and clients: scrubbed of secrets first, then cut to 200 characters."""
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}{f' (HTTP {status})' if status else ''}: {scrub(str(err), key)[:200]}"


def ask_all(
    baseline: BaselineSection,
    key: str,
    prompts: list[list[dict[str, str]]],
    max_tokens: int,
    schema: dict[str, Any] | None = None,
    cache: ResponseCache | None = None,
    on_done: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    logprobs: bool = False,
) -> list[dict[str, Any]]:
    """One answer per prompt: raw text, token usage, latency, attempts, cached, or the final error.

    Usage is taken from the one successful response (failed attempts carry
    none); a cached answer keeps the usage and latency of the call that made
    it, so cost and latency stay comparable across re-runs.
    """
    from openai import OpenAI

    endpoint = baseline.base_url or DEFAULT_ENDPOINT
    client = OpenAI(api_key=key, base_url=endpoint, max_retries=0, timeout=baseline.timeout_s)
    params = request_params(baseline, max_tokens, schema, logprobs)

    def ask(index_messages: tuple[int, list[dict[str, str]]]) -> dict[str, Any]:
        index, messages = index_messages
        rng = random.Random(index)
        k = cache_key(endpoint, baseline.model, messages, params)
        hit = cache.get(k) if cache else None
        if hit is not None:
            result = {**hit, "cached": True, "attempts": 0}
        else:
            result = _call_with_retries(client, baseline, messages, params, rng, sleep)
            if result.get("error") is None and cache:
                cache.put(k, {f: result[f] for f in ("raw", "input_tokens", "output_tokens", "latency_s", "confidence",
                                                     "samples") if f in result})
        if on_done:
            on_done(1)
        return result

    with ThreadPoolExecutor(max_workers=baseline.max_concurrency) as pool:
        return list(pool.map(ask, enumerate(prompts)))


def _call_with_retries(client, baseline: BaselineSection, messages, params, rng: random.Random, sleep) -> dict[str, Any]:
    attempts = 0
    while True:
        attempts += 1
        started = time.perf_counter()
        try:
            resp = client.chat.completions.create(model=baseline.model, messages=messages, **params)
            if not resp.choices:
                raise ValueError("the response has an empty `choices` list (no answer)")
            raw = resp.choices[0].message.content
            if raw is None:
                raise ValueError("the response has no message content")
            usage = resp.usage
            answer = {
                "raw": raw,
                "input_tokens": usage.prompt_tokens if usage else 0,
                "output_tokens": usage.completion_tokens if usage else 0,
                "latency_s": time.perf_counter() - started,
                "attempts": attempts,
                "cached": False,
            }
            if params.get("logprobs"):
                answer["confidence"] = answer_probability(resp.choices[0])
            if params.get("n", 1) > 1:
                answer["samples"] = [choice.message.content for choice in resp.choices]
            return answer
        except Exception as err:  # noqa: BLE001 - every failure is either retried or recorded for the report
            if not is_retryable(err) or attempts > baseline.max_retries:
                return {"raw": None, "error": _describe(err, client.api_key), "attempts": attempts, "cached": False,
                        "input_tokens": 0, "output_tokens": 0, "latency_s": time.perf_counter() - started}
            sleep(backoff_s(attempts - 1, err, rng))


def answer_probability(choice) -> float | None:
    """The probability of the whole answer from its tokens' log-probabilities, or None when the endpoint sent none."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return math.exp(sum(token.logprob for token in content))


def parsed_answer(answer: dict[str, Any], parse: Callable[[str], Any]) -> tuple[Any, float | None]:
    """An endpoint's answer parsed, with its confidence: the log-probability one, or, for `samples` > 1, the most
    common parsed sample (first seen wins a tie) and the share of samples agreeing with it; (None, None) when
    nothing parses."""
    if answer.get("raw") is None:
        return None, None
    samples = answer.get("samples")
    if not samples:
        return parse(answer["raw"]), answer.get("confidence")
    parsed = [parse(raw) for raw in samples if raw is not None]
    keys = [json.dumps(p, sort_keys=True, ensure_ascii=False) for p in parsed if p is not None]
    if not keys:
        return None, None
    top = max(dict.fromkeys(keys), key=keys.count)
    return json.loads(top), keys.count(top) / len(samples)


def cost_per_1k(price, rows: list[dict[str, Any]]) -> float | None:
    """Dollars per 1,000 requests from a price table (per million tokens) and the measured token usage."""
    answered = [r for r in rows if r.get("raw") is not None and r.get("input_tokens") is not None
                and r.get("output_tokens") is not None]
    if price is None or not answered:
        return None
    tokens_in = sum(r["input_tokens"] for r in answered) / len(answered)
    tokens_out = sum(r["output_tokens"] for r in answered) / len(answered)
    return 1000 * (tokens_in * price.input + tokens_out * price.output) / 1e6
