"""`kind: predictions`: recorded outputs of a system run elsewhere, matched to the examples by id (read and
checked before any model loads); priced by its recorded token counts; confidence from a recorded number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.baseline_kinds.common import latency_s  # noqa: F401 - its latency: as measured
from pipeline.evaluation.baselines import (
    BaselineContext,
    BaselineResult,
    Rows,
    load_recorded,
)
from pipeline.files import file_hash
from pipeline.recipe.schema import PredictionsBaseline, Recipe
from pipeline.routing import frontier

KIND = "predictions"
SECTION = PredictionsBaseline
FRONTIER = True  # recorded output of a system run elsewhere: by convention a frontier model's


def load(baseline: PredictionsBaseline, splits: dict[str, Rows], task: Any, spec: Any) -> dict[str, Rows]:
    return load_recorded(baseline, splits, task, spec)


def answer(baseline: PredictionsBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    recorded = ctx.loaded[baseline.name]
    return BaselineResult({s: recorded[s] for s in splits})


def cost_per_1k(baseline: PredictionsBaseline, test_rows: Rows, recipe: Recipe) -> float | None:
    return frontier.cost_per_1k(baseline.price_per_mtok, test_rows)


def confidence_source(baseline: PredictionsBaseline) -> str:
    return "the recorded `confidence` per line"


def staleness_inputs(baseline: PredictionsBaseline, run_path: Path) -> dict[str, str]:
    return {f"predictions:{baseline.name}": file_hash(baseline.path)} if baseline.path.is_file() else {}
