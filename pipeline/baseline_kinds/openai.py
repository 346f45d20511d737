"""`kind: openai`: an OpenAI-compatible endpoint asked with the baselines' prompt (answers cached, so a rerun
pays nothing again); priced by its token usage; confidence from log-probabilities or k samples; the one kind
serving and `expert predict` can ask live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.baseline_kinds.common import latency_s  # noqa: F401 - its latency: as measured
from pipeline.evaluation.baselines import (
    BaselineContext,
    BaselineResult,
    Rows,
    ask_frontier,
    baseline_rows,
)
from pipeline.recipe.schema import OpenAIBaseline, Recipe
from pipeline.routing import frontier

KIND = "openai"
SECTION = OpenAIBaseline


def load(baseline: OpenAIBaseline, splits: dict[str, Rows], task: Any, spec: Any) -> None:
    return None


def answer(baseline: OpenAIBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    key = frontier.api_key(baseline)
    if key is None:
        return BaselineResult(None, skipped=f"environment variable {baseline.api_key_env} is not set")
    cache = frontier.ResponseCache(frontier.default_cache_path())
    try:
        return BaselineResult({s: ask_frontier(baseline, key, baseline_rows(rows, ctx.baseline_system), ctx.recipe,
                                               ctx.task, ctx.spec, cache, s)
                               for s, rows in splits.items()})
    finally:
        cache.close()


def cost_per_1k(baseline: OpenAIBaseline, test_rows: Rows, recipe: Recipe) -> float | None:
    return frontier.cost_per_1k(baseline.price_per_mtok, test_rows)


def confidence_source(baseline: OpenAIBaseline) -> str | None:
    if not baseline.gives_confidence():
        return None
    if baseline.samples > 1:
        return (f"agreement of {baseline.samples} sampled answers (temperature {baseline.sample_temperature:g}): "
                "the share agreeing with the most common one")
    return "token log-probabilities from the endpoint (probability of the whole answer)"


def staleness_inputs(baseline: OpenAIBaseline, run_path: Path) -> dict[str, str]:
    return {}
