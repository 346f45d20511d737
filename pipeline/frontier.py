"""The `openai` baseline: any OpenAI-compatible chat-completions endpoint via the official SDK.

The API key is read from the environment variable the recipe names and goes
only to the SDK client: never to logs, MLflow, reports or the run directory.
Retries with backoff (honouring Retry-After) are the SDK's own, bounded by
`max_retries`; calls run concurrently up to `max_concurrency`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.errors import UserError
from pipeline.recipe import BaselineSection


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


def ask_all(
    baseline: BaselineSection,
    key: str,
    prompts: list[list[dict[str, str]]],
    max_tokens: int,
    on_done: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One chat completion per prompt: raw answer, token usage, latency, or the error."""
    from openai import OpenAI

    client = OpenAI(api_key=key, base_url=baseline.base_url, max_retries=baseline.max_retries, timeout=baseline.timeout_s)

    def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            resp = client.chat.completions.create(
                model=baseline.model, messages=messages, temperature=0, max_tokens=max_tokens
            )
            raw = resp.choices[0].message.content or ""
            usage = resp.usage
            result = {
                "raw": raw,
                "input_tokens": usage.prompt_tokens if usage else 0,
                "output_tokens": usage.completion_tokens if usage else 0,
                "latency_s": time.perf_counter() - started,
            }
        except Exception as err:  # the SDK already retried; record the failure for the report
            result = {"raw": None, "error": f"{type(err).__name__}: {str(err)[:300]}", "latency_s": time.perf_counter() - started}
        if on_done:
            on_done(1)
        return result

    with ThreadPoolExecutor(max_workers=baseline.max_concurrency) as pool:
        return list(pool.map(ask, prompts))


def cost_per_1k(baseline: BaselineSection, rows: list[dict[str, Any]]) -> float | None:
    """Dollars per 1,000 requests from the recipe's price table and the measured token usage."""
    price = baseline.price_per_mtok
    answered = [r for r in rows if r.get("raw") is not None]
    if price is None or not answered:
        return None
    tokens_in = sum(r["input_tokens"] for r in answered) / len(answered)
    tokens_out = sum(r["output_tokens"] for r in answered) / len(answered)
    return 1000 * (tokens_in * price.input + tokens_out * price.output) / 1e6
