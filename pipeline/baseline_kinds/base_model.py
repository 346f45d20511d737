"""`kind: base_model`: the untuned base model (the expert's model with its adapter disabled), zero or k shots,
asked with the baselines' prompt on this machine; priced by machine time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.baseline_kinds.common import latency_s  # noqa: F401 - its latency: as measured
from pipeline.evaluation.baselines import (
    FEWSHOT,
    BaselineContext,
    BaselineResult,
    Rows,
    baseline_rows,
)
from pipeline.evaluation.inference import infer_local
from pipeline.evaluation.stats import machine_cost_per_1k
from pipeline.files import file_hash
from pipeline.recipe.schema import BaseModelBaseline, Recipe

KIND = "base_model"
SECTION = BaseModelBaseline
FRONTIER = False  # the untuned base model: beating it says nothing about the frontier


def load(baseline: BaseModelBaseline, splits: dict[str, Rows], task: Any, spec: Any) -> None:
    return None  # its few-shot examples are read for all base_model baselines at once (`baselines.load_fewshot`)


def answer(baseline: BaseModelBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    with ctx.model.disable_adapter():
        return BaselineResult({
            s: infer_local(ctx.model, ctx.tokenizer, baseline_rows(rows, ctx.baseline_system, ctx.fewshot, baseline.shots),
                           ctx.recipe, ctx.spec, f"{baseline.name} ({s})")
            for s, rows in splits.items()
        })


def cost_per_1k(baseline: BaseModelBaseline, test_rows: Rows, recipe: Recipe) -> float:
    return machine_cost_per_1k(test_rows, recipe.eval.expert_cost_per_hour)


def confidence_source(baseline: BaseModelBaseline) -> str:
    return "the base model's answer probability"


def staleness_inputs(baseline: BaseModelBaseline, run_path: Path) -> dict[str, str]:
    fewshot = run_path / FEWSHOT
    return {FEWSHOT: file_hash(fewshot)} if baseline.shots and fewshot.is_file() else {}
