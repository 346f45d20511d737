"""`kind: expert`: another expert of this task (a trained run directory's, or a registered version's), asked
locally with its own instruction; priced by machine time; confidence from its answer probability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.baseline_kinds.common import latency_s  # noqa: F401 - its latency: as measured
from pipeline.errors import UserError
from pipeline.evaluation.baselines import BaselineContext, BaselineResult, Rows
from pipeline.evaluation.inference import infer_local
from pipeline.evaluation.stats import machine_cost_per_1k
from pipeline.recipe.schema import ExpertBaseline, Recipe

KIND = "expert"
SECTION = ExpertBaseline
FRONTIER = False  # another expert of this task, on this machine


def load(baseline: ExpertBaseline, splits: dict[str, Rows], task: Any, spec: Any) -> None:
    return None


def answer(baseline: ExpertBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    """Another expert (a run directory's, loaded as its train record says, or a registered version's, loaded as
    `expert predict` loads it), asked with its own system prompt on these rows."""
    from pipeline.data.examples import chat_messages

    if baseline.version is not None:
        where = f"eval.baselines `{baseline.name}` -> version: {baseline.version}"
        other, other_spec, system, model, tokenizer = _registered_expert(baseline.version, where)
    else:
        where = f"eval.baselines `{baseline.name}` -> run_dir: {baseline.run_dir}"
        other, other_spec, system, model, tokenizer = _run_dir_expert(baseline.run_dir, where)
    if other.task.type != ctx.recipe.task.type or other_spec != ctx.spec:
        raise UserError(f"{where}: that expert answers another task (its task type or labels/schema differ from "
                        "this run's prep/spec.json); route only between experts of the same task")
    return BaselineResult({
        s: infer_local(model, tokenizer, [{**row, "prompt": chat_messages(system, row["text"])} for row in rows],
                       other, ctx.spec, f"{baseline.name} ({s})")
        for s, rows in splits.items()
    })


def _run_dir_expert(run_dir: Path, where: str):
    """(recipe, spec, system prompt, model, tokenizer) of a trained run directory, run as its own eval ran it
    (the runtime eval and serving share, where that run has no eval yet)."""
    from pipeline.evaluation.inference import load_expert
    from pipeline.inference import runtime
    from pipeline.recipe.schema import load_recipe
    from pipeline.run import contracts
    from pipeline.run.stage_documents import read_spec

    needed = [run_dir / p for p in ("recipe.yaml", "train/record.json", "train/adapter", "prep/spec.json")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise UserError(f"{where}: not a trained run directory ({', '.join(missing)} missing); run `expert train` "
                        "there first")
    other = load_recipe(run_dir / "recipe.yaml")
    spec_doc = read_spec(run_dir / "prep/spec.json")
    trained = contracts.read_record(run_dir / "train/record.json", contracts.TrainRecord)
    model, tokenizer = load_expert(other, trained, run_dir / "train/adapter")
    evaluated = contracts.evaluated_runtime(run_dir / "eval" / contracts.RECORD)
    model, _ = runtime.prepare(model, other, runtime.adapter_for(model, other, None, evaluated))
    return other, spec_doc.spec, spec_doc.system_prompt, model, tokenizer


def _registered_expert(model_uri: str, where: str):
    """(recipe, spec, system prompt, model, tokenizer) of a registered version, from its bundle, run as it was
    evaluated (`pipeline/inference/runtime.py`), as `expert serve` would run it."""
    from pipeline.inference import runtime
    from pipeline.registry import versions

    try:
        _, version = versions.load_version(model_uri)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    runtime.prepare_expert(version)
    return version.recipe, version.spec, version.system_prompt, version.model, version.tokenizer


def cost_per_1k(baseline: ExpertBaseline, test_rows: Rows, recipe: Recipe) -> float:
    return machine_cost_per_1k(test_rows, recipe.eval.expert_cost_per_hour)


def confidence_source(baseline: ExpertBaseline) -> str:
    return "that expert's answer probability"


def staleness_inputs(baseline: ExpertBaseline, run_path: Path) -> dict[str, str]:
    return {}
