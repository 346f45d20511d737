"""The stage table and `run_pipeline`: every stage, in order, through one signature.

Each stage module has `run(recipe, run, options)` and `inputs_of(recipe, run, options)`; `run_pipeline` calls
them in `STAGES` order, and each one asks `contracts.why_stale` (the one rule) whether it is up to date. `plan`
says, without running anything, which stages would run and why: what `expert run --dry-run` prints.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.recipe.schema import Recipe
from pipeline.run import contracts
from pipeline.run.contracts import StageOptions
from pipeline.run.rundir import STAGES, RunDir, later_stages

STAGE_MODULES = {"prep": "pipeline.stages.prep", "train": "pipeline.stages.train", "eval": "pipeline.stages.evaluate",
                 "push": "pipeline.stages.push"}
assert tuple(STAGE_MODULES) == STAGES


def stage_module(stage: str) -> ModuleType:
    """A stage's module, with library progress bars off (the stages print their own) and MLflow configured."""
    import datasets
    from transformers.utils import logging as hf_logging

    from pipeline.run import tracking

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    tracking.configure()
    return stage_module_of(stage)


def stage_module_of(stage: str) -> ModuleType:
    """A stage's module, imported as it is (for what it declares: `inputs_of`)."""
    return importlib.import_module(STAGE_MODULES[stage])


def check_stages(names: list[str] | tuple[str, ...] | frozenset[str], option: str) -> None:
    for name in names:
        if name not in STAGES:
            raise UserError(f"{option} {name}: unknown stage; use one of {', '.join(STAGES)}")


def run_stage(stage: str, recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict:
    return stage_module(stage).run(recipe, run, options)


def run_pipeline(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> list[str]:
    """Every stage in order on one run directory; returns the stages that did work (the rest were up to date)."""
    check_stages(options.redo, "--force")
    before = {s: run.stage_record(s).get("ended") for s in STAGES}
    for stage in STAGES:
        run_stage(stage, recipe, run, options)
    return [s for s in STAGES if run.stage_record(s).get("ended") != before[s]]


@dataclass(frozen=True)
class PlannedStage:
    stage: str
    runs: bool
    why: str


def plan(recipe: Recipe, run: RunDir | None, options: StageOptions = StageOptions()) -> list[PlannedStage]:
    """Which stages `run_pipeline` would run on `run` (None: a new run) and why. Runs nothing, writes nothing."""
    check_stages(options.redo, "--force")
    planned: list[PlannedStage] = []
    stale_after: dict[str, str] = {}  # stage -> the earlier stage that runs, making it stale
    for stage in STAGES:
        if run is None:
            why = "a new run"
        elif stage in stale_after:
            why = f"{stale_after[stage]} runs before it"
        else:
            inputs = functools.partial(stage_module_of(stage).inputs_of, recipe, run, options)
            why = contracts.why_stale(run, stage, recipe, inputs, options)
        runs = why is not None
        planned.append(PlannedStage(stage, runs, why or "up to date"))
        if runs:
            for later in later_stages(stage):
                stale_after.setdefault(later, stage)
    return planned


def print_plan(planned: list[PlannedStage], run: RunDir | None) -> None:
    where = run.path if run is not None else "a new run directory"
    console.print(f"[bold]expert run --dry-run[/] on {where}:")
    for p in planned:
        mark = "[bold]run [/]" if p.runs else "[green]skip[/]"
        console.print(f"  {mark} {p.stage:<5} {p.why}", highlight=False)


def print_summary(recipe: Recipe, run: RunDir) -> None:
    """What `expert run` ends with: expert vs baselines, the verdict, the registered version, where to look."""
    import json

    from rich.console import Console

    from pipeline.run.stage_documents import read_metrics, read_verdict
    from pipeline.run.tracking import configure
    from pipeline.stages.eval_report import route_summary, summary_table

    metrics, verdict = read_metrics(run.path / "eval/metrics.json"), read_verdict(run.path / "eval/verdict.json")
    registered = json.loads((run.path / "push/registered.json").read_text(encoding="utf-8"))
    route_file = run.path / "eval/route.json"
    route = json.loads(route_file.read_text(encoding="utf-8")) if route_file.is_file() else {}
    out = Console(soft_wrap=True)
    out.print(summary_table(metrics.systems, metrics.skipped, recipe.eval.gate.metric))
    line = route_summary(route, metrics.systems)
    if line:
        out.print(line, markup=False)
    out.print(
        f"verdict: {'PASS' if verdict.passed else 'FAIL'}; decision: {verdict.decision_text()}; registered "
        f"{registered['model_name']} v{registered['version']} as {', '.join('@' + a for a in registered['aliases'])}",
        markup=False)
    out.print(f"run directory: {run.path}  (report: {run.path / 'eval/report.md'})")
    uri = configure()
    if uri.startswith("sqlite:"):
        out.print(f"open the MLflow UI: `expert ui` (mlflow ui --backend-store-uri {uri} --port 5000), then:")
        uri = "http://127.0.0.1:5000"
    else:
        out.print("MLflow UI:")
    for what, link in review_links(uri, recipe.name, run, registered).items():
        out.print(f"  {what}: {link}")


def review_links(ui: str, experiment: str, run: RunDir, registered: dict) -> dict[str, str]:
    """Where a reviewer looks, as MLflow UI links: the experiment's runs (with MLflow's model-training view: a
    bare experiment link opens a GenAI overview), the eval run's per-example results and its disagreements,
    the registered version."""
    from pipeline.evaluation.traces import DISAGREEMENT_FILTER
    from pipeline.run.tracking import client

    found = client().get_experiment_by_name(experiment)
    if found is None:
        return {}
    view = "workflowType=machine_learning"
    runs = f"{ui}/#/experiments/{found.experiment_id}/runs"
    examples = f"{runs}/{run.stage_record('eval')['mlflow_run_id']}/evaluations?{view}"
    return {"runs": f"{runs}?{view}", "eval examples": examples,
            "where the expert and a baseline disagree": f"{examples}&filter={DISAGREEMENT_FILTER}",
            "registered version": f"{ui}/#/models/{registered['model_name']}/versions/{registered['version']}"}
