"""`kind: openai`: an OpenAI-compatible endpoint asked with the baselines' prompt (answers cached, so a rerun
pays nothing again); priced by its token usage; confidence from log-probabilities or k samples; the one kind
serving and `expert predict` can ask live. Without its key, its `stand_in` (recorded answers, read like a
`predictions` file) answers in eval, so a comparison and a route can be shown; serving never asks a stand-in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.baseline_kinds.common import latency_s  # noqa: F401 - its latency: as measured
from pipeline.evaluation.baselines import (
    BaselineContext,
    BaselineResult,
    Rows,
    ask_frontier,
    baseline_rows,
    load_recorded,
)
from pipeline.files import file_hash
from pipeline.recipe.schema import OpenAIBaseline, Recipe, StandIn
from pipeline.routing import frontier

KIND = "openai"
SECTION = OpenAIBaseline
FRONTIER = True  # a hosted model the expert would replace (its stand-in records such a model's answers)


def stand_in(baseline: OpenAIBaseline) -> StandIn | None:
    """The recorded answers eval uses for this baseline: its `stand_in` when its key is not set, else None (the
    endpoint is asked). A `required` baseline is never stood in for: without its key it is an error
    (`frontier.api_key`)."""
    if baseline.required or os.environ.get(baseline.api_key_env):
        return None
    return baseline.stand_in


def load(baseline: OpenAIBaseline, splits: dict[str, Rows], task: Any, spec: Any) -> dict[str, Rows] | None:
    recorded = stand_in(baseline)
    return None if recorded is None else load_recorded(baseline, splits, task, spec, recorded)


def answer(baseline: OpenAIBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    recorded = stand_in(baseline)
    if recorded is not None:
        return BaselineResult({s: ctx.loaded[baseline.name][s] for s in splits}, stand_in=recorded)
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
    if stand_in(baseline) is not None:
        return "the recorded `confidence` per line of its stand-in"
    if not baseline.gives_confidence():
        return None
    if baseline.samples > 1:
        return (f"agreement of {baseline.samples} sampled answers (temperature {baseline.sample_temperature:g}): "
                "the share agreeing with the most common one")
    return "token log-probabilities from the endpoint (probability of the whole answer)"


def staleness_inputs(baseline: OpenAIBaseline, run_path: Path) -> dict[str, str]:
    """Its stand-in file while that answers (so a changed file, or a key set since, makes eval run again)."""
    recorded = stand_in(baseline)
    if recorded is None or not recorded.path.is_file():
        return {}
    return {f"stand_in:{baseline.name}": file_hash(recorded.path)}
