"""The `openai` baseline: any OpenAI-compatible chat-completions endpoint via the official SDK.

The API key is read from the environment variable the recipe names and goes
only to the SDK client: never to logs, MLflow, reports, the cache or the run
directory. Retries are ours, not the SDK's (its `max_retries` is 0), so they are
bounded, counted and tested: exponential backoff with jitter, or the server's
Retry-After, on 429, 5xx, timeouts, connection errors and malformed bodies.
Every successful answer is cached in SQLite keyed by endpoint, model, messages
and parameters, so a re-run makes zero calls; failures are never cached, and
neither are answers over the size cap or with a confidence that is not a
probability (both are malformed). A `Budget` reserves each attempt's upper-bound
cost before it is sent and refuses one that could pass its cap; a deadline
bounds the whole call in time.
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

import httpx

from pipeline.errors import UserError
from pipeline.recipe.schema import BaselineSection

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0
CONNECT_TIMEOUT_S = 10.0  # connecting is quick or the endpoint is down: no reason to wait a whole read timeout
# a prompt token covers at least one UTF-8 byte (byte-level BPE, byte fallback); a chat template adds a few tokens
# per message (OpenAI's: 3-4) and to prime the answer
MESSAGE_OVERHEAD_TOKENS = 8
MAX_ANSWER_BYTES_PER_TOKEN = 32  # an answer longer than max_tokens tokens of this many bytes is not an answer
LOGPROB_ROUNDING = 1e-4  # endpoints round: a log-probability up to this far above 0 is 0


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


def prompt_token_bound(messages: list[dict[str, str]]) -> int:
    """At most this many prompt tokens, whatever the endpoint's tokenizer: one per UTF-8 byte of every message's
    role and content, MESSAGE_OVERHEAD_TOKENS per message and once more for the answer's priming."""
    return MESSAGE_OVERHEAD_TOKENS + sum(len(m["role"].encode()) + len(str(m["content"]).encode())
                                         + MESSAGE_OVERHEAD_TOKENS for m in messages)


def answer_byte_cap(max_tokens: int) -> int:
    return max_tokens * MAX_ANSWER_BYTES_PER_TOKEN


class Budget:
    """Dollars spent on one endpoint, counted per attempt as requests are sent, under an optional cap.

    Right before each attempt (retries included) is sent, its upper-bound cost is reserved under a lock: the
    prompt's `prompt_token_bound` and `max_tokens` per answer asked for, at the price. When the spend so far,
    the reservations in flight and this bound would pass the cap, the attempt waits for those in flight to
    settle, and is refused, never sent, once none is left and it still does not fit. An
    answer settles its reservation at its cost, from the endpoint's usage, or estimated (the prompt's bound, and
    the answer's UTF-8 bytes up to max_tokens) when it sent none. An attempt sent that brought no answer (a
    timeout, an error status, a malformed body) stays charged at its bound: the endpoint may have received and
    billed it; one whose connection was never made costs nothing. So the spend stays within the cap as long as
    the endpoint bills no more than it was asked for (max_tokens) and its tokens cover at least a byte each.
    """

    def __init__(self, price, cap_usd: float | None = None):
        self.price, self.cap_usd = price, cap_usd
        self._changed = threading.Condition()  # guards every count; notified when a reservation settles
        self.spent_usd = 0.0  # settled: answers (cached ones included) and failed attempts
        self.reserved_usd, self.in_flight = 0.0, 0  # attempts in flight: their bounds, their number
        self.cached_usd = 0.0  # the part of spent_usd that cached answers cost when they were bought
        self.sent = 0  # attempts sent
        self.failed_attempts, self.failed_usd = 0, 0.0  # sent, no answer, charged at their bound
        self.estimated_answers = 0  # answers priced from an estimate: the endpoint sent no usage
        self.refused = 0  # attempts not sent: they could have passed the cap

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        if self.price is None:
            return 0.0
        return (tokens_in * self.price.input + tokens_out * self.price.output) / 1e6

    def add_cached(self, usd: float) -> None:
        with self._changed:
            self.spent_usd += usd
            self.cached_usd += usd

    def reserve(self, usd: float, deadline: float | None = None) -> bool:
        """Reserve an attempt's upper bound; False (nothing may be sent) when it could pass the cap. While other
        attempts are in flight it waits for them to settle (they usually cost less than reserved) rather than
        refuse; it gives up, also with False, at `deadline` (time.monotonic())."""
        with self._changed:
            while self.cap_usd is not None and self.spent_usd + self.reserved_usd + usd > self.cap_usd:
                if not self.in_flight:
                    self.refused += 1
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
            self.reserved_usd += usd
            self.in_flight += 1
            return True

    def settle(self, reserved_usd: float, cost_usd: float, *, failed: bool = False, estimated: bool = False,
               sent: bool = True) -> None:
        with self._changed:
            self.reserved_usd -= reserved_usd
            self.in_flight -= 1
            self.sent += sent
            self.spent_usd += cost_usd
            self.failed_attempts += failed
            self.failed_usd += cost_usd if failed else 0.0
            self.estimated_answers += estimated
            self._changed.notify_all()


def default_cache_path() -> Path:
    from pipeline.inference.models import cache_root

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
    *,
    budget: Budget | None = None,
    deadline_s: float | None = None,
) -> list[dict[str, Any]]:
    """One answer per prompt: raw text, token usage, latency, attempts, cached, cost, or the final error.

    Usage is taken from the one successful response, or estimated (`usage_estimated`) when the endpoint sent
    none; a cached answer keeps the usage and latency of the call that made it, so cost and latency stay
    comparable across re-runs. With a `budget`, cached answers are charged first and every attempt is reserved
    before it is sent (see `Budget`). With `deadline_s`, no attempt begins later than that many seconds after
    this call, and each attempt's timeouts are capped at the time left.
    """
    from openai import OpenAI

    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    endpoint = baseline.base_url or DEFAULT_ENDPOINT
    client = OpenAI(api_key=key, base_url=endpoint, max_retries=0, timeout=baseline.timeout_s)
    params = request_params(baseline, max_tokens, schema, logprobs)
    keys = [cache_key(endpoint, baseline.model, messages, params) for messages in prompts]
    hits = [cache.get(k) if cache else None for k in keys]  # looked up first: a budget counts them before any call
    if budget is not None:
        for hit in hits:
            if hit is not None:
                budget.add_cached(budget.cost(hit.get("input_tokens") or 0, hit.get("output_tokens") or 0))

    def ask(index: int) -> dict[str, Any]:
        if hits[index] is not None:
            result = {**hits[index], "cached": True, "attempts": 0}
        else:
            call = Call(client, baseline, prompts[index], params, random.Random(index), sleep, budget, deadline,
                        deadline_s)
            result = call.run()
            if result.get("error") is None and cache:
                cache.put(keys[index], {f: result[f] for f in CACHED_FIELDS if f in result})
        if on_done:
            on_done(1)
        return result

    with ThreadPoolExecutor(max_workers=baseline.max_concurrency) as pool:
        return list(pool.map(ask, range(len(prompts))))


CACHED_FIELDS = ("raw", "input_tokens", "output_tokens", "usage_estimated", "latency_s", "confidence", "samples")


class MalformedAnswer(ValueError):
    """A 200 answer that must not be used: too big, or a confidence that is not a probability. Retried as a
    malformed body is, and never cached."""


class Call:
    """One prompt's attempts: each reserved against the budget right before it is sent, bounded in number
    (`max_retries`) and in time (the deadline), settled when it ends."""

    def __init__(self, client, baseline: BaselineSection, messages, params, rng: random.Random, sleep,
                 budget: Budget | None, deadline: float | None, deadline_s: float | None):
        self.client, self.baseline, self.messages, self.params = client, baseline, messages, params
        self.rng, self.sleep, self.budget, self.deadline, self.deadline_s = rng, sleep, budget, deadline, deadline_s
        self.choices = params.get("n", 1)
        self.prompt_bound = prompt_token_bound(messages)
        self.bound_usd = budget.cost(self.prompt_bound, params["max_tokens"] * self.choices) if budget else 0.0
        self.attempts, self.cost_usd, self.started = 0, 0.0, time.perf_counter()

    def run(self) -> dict[str, Any]:
        last: Exception | None = None
        while True:
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                return {**self.failed(f"DeadlineExceeded: the deadline of {self.deadline_s:g} s ran out after "
                                      f"{self.attempts} attempt(s)"
                                      + (f"; the last: {_describe(last, self.client.api_key)}" if last else "")),
                        "deadline_exceeded": True}
            if self.budget is not None and not self.budget.reserve(self.bound_usd, self.deadline):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    continue  # out of time while waiting for the budget: said so above
                return {**self.failed(f"BudgetExhausted: not sent: this attempt could cost up to "
                                      f"${self.bound_usd:,.6f}, which could take the spend past the budget "
                                      f"(${self.budget.cap_usd:,.4f})"), "budget_refused": True,
                        "bound_usd": self.bound_usd}
            self.attempts += 1
            try:
                resp = self.client.chat.completions.create(model=self.baseline.model, messages=self.messages,
                                                           timeout=attempt_timeout(self.baseline.timeout_s, left),
                                                           **self.params)
                return self.answered(resp)
            except Exception as err:  # noqa: BLE001 - every failure is either retried or recorded for the report
                self.settle_failed(err)
                last = err
                if self.deadline is not None and time.monotonic() >= self.deadline:  # cut by the deadline's cap
                    return {**self.failed(f"DeadlineExceeded: the deadline of {self.deadline_s:g} s ran out during "
                                          f"attempt {self.attempts}: {_describe(err, self.client.api_key)}"),
                            "deadline_exceeded": True}
                if not is_retryable(err) or self.attempts > self.baseline.max_retries:
                    return self.failed(_describe(err, self.client.api_key))
                wait = backoff_s(self.attempts - 1, err, self.rng)
                if self.deadline is not None and time.monotonic() + wait >= self.deadline:
                    return {**self.failed(f"DeadlineExceeded: the deadline of {self.deadline_s:g} s leaves no time "
                                          f"to retry after {self.attempts} attempt(s); the last: "
                                          f"{_describe(err, self.client.api_key)}"), "deadline_exceeded": True}
                self.sleep(wait)

    def answered(self, resp) -> dict[str, Any]:
        """The answer, checked (choices present, within the size cap, a confidence that is a probability), its
        cost settled from the endpoint's usage or, when it sent none, from an estimate. A malformed answer is
        charged like a failed attempt, or at its usage when that is more."""
        texts = [choice.message.content for choice in resp.choices or []]
        usage = resp.usage
        estimated = usage is None or usage.prompt_tokens is None or usage.completion_tokens is None
        tokens_in = self.prompt_bound if usage is None or usage.prompt_tokens is None else usage.prompt_tokens
        tokens_out = (sum(min(len((t or "").encode()), self.params["max_tokens"]) for t in texts)
                      if usage is None or usage.completion_tokens is None else usage.completion_tokens)
        cost = self.budget.cost(tokens_in, tokens_out) if self.budget else 0.0
        try:
            confidence = self.checked(resp, texts)
        except MalformedAnswer as err:
            err.billed_usd = cost
            raise
        if self.budget:
            self.budget.settle(self.bound_usd, cost, estimated=estimated)
        self.cost_usd += cost
        answer = {"raw": texts[0], "input_tokens": tokens_in, "output_tokens": tokens_out,
                  "latency_s": time.perf_counter() - self.started, "attempts": self.attempts, "cached": False,
                  "cost_usd": self.cost_usd}
        if estimated:
            answer["usage_estimated"] = True
        if self.params.get("logprobs"):
            answer["confidence"] = confidence
        if self.choices > 1:
            answer["samples"] = texts
        return answer

    def checked(self, resp, texts: list[str | None]) -> float | None:
        """MalformedAnswer unless the response holds an answer within the size cap whose confidence (returned,
        when log-probabilities were asked for) is a probability."""
        if not texts:
            raise MalformedAnswer("the response has an empty `choices` list (no answer)")
        if texts[0] is None:
            raise MalformedAnswer("the response has no message content")
        cap = answer_byte_cap(self.params["max_tokens"])
        size = max(len(t.encode()) for t in texts if t is not None)
        if size > cap:
            raise MalformedAnswer(f"the answer is {size:,} bytes, over the cap of {cap:,} bytes "
                                  f"(max_tokens {self.params['max_tokens']} x {MAX_ANSWER_BYTES_PER_TOKEN})")
        return answer_probability(resp.choices[0]) if self.params.get("logprobs") else None

    def settle_failed(self, err: Exception) -> None:
        """A sent attempt that brought no answer stays charged at its bound (the endpoint may have received and
        billed it), or at the usage of a malformed answer when that is more; unless the connection was never
        made."""
        if self.budget is None:
            return
        never_sent = isinstance(err.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))
        charged = 0.0 if never_sent else max(self.bound_usd, getattr(err, "billed_usd", 0.0))
        self.budget.settle(self.bound_usd, charged, failed=not never_sent, sent=not never_sent)
        self.cost_usd += charged

    def failed(self, error: str) -> dict[str, Any]:
        return {"raw": None, "error": error, "attempts": self.attempts, "cached": False, "input_tokens": 0,
                "output_tokens": 0, "latency_s": time.perf_counter() - self.started, "cost_usd": self.cost_usd}


def attempt_timeout(timeout_s: float, left: float | None) -> httpx.Timeout:
    """An attempt's timeouts: connecting within CONNECT_TIMEOUT_S, each read and write within `timeout_s`,
    all capped at the time the deadline leaves."""
    cap = timeout_s if left is None else min(timeout_s, left)
    return httpx.Timeout(cap, connect=min(CONNECT_TIMEOUT_S, cap))


def answer_probability(choice) -> float | None:
    """The probability of the whole answer from its tokens' log-probabilities, or None when the endpoint sent none.
    A log-probability that is not a finite number <= 0 (beyond rounding) makes the answer malformed: its confidence
    would not be a probability."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    logprobs = [token.logprob for token in content]
    for value in logprobs:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value > LOGPROB_ROUNDING:
            raise MalformedAnswer(f"a token's log-probability is {value!r}, not a finite number <= 0: the answer's "
                                  "confidence would not be a probability")
    return min(1.0, math.exp(sum(logprobs)))


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
