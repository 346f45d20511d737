"""Stage 3, eval: the expert and every baseline on the same held-out test split, with evidence.

Outputs under `eval/`: `predictions/<system>.jsonl` (test split; the cascade's
frontier and the expert also get `<system>.validation.jsonl`), `metrics.json`
(quality, cost per 1,000 requests and latency per system, the paired bootstrap
interval and McNemar test of the expert against each baseline, calibration),
`cascade.json` (threshold chosen on validation, curve on test), `verdict.json`
(`replace`, `cascade` or `keep_frontier`, with the gate), `plots/*.png` and
`report.md`, `timings.json` (the stage's seconds and MLflow logging's share), `record.json` (the base, the
precision and the runtime the expert ran on, `pipeline/inference/runtime.py`: serving runs the same), `triage/<kind>/`
(with `eval.routing.triage`: each router trained on the router split; route.json's `triage` compares them, and the
route carries the one kept, `pipeline/routing/triage_route.py`).
Everything is logged to MLflow: the test and validation splits and the adapter's logged model as the run's
inputs, the expert's metrics against that model and the test dataset, one trace per test example
(`pipeline/evaluation/traces.py`), and the verdict as the run's description.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from pipeline import baseline_kinds, tasks
from pipeline.console import console
from pipeline.errors import UserError
from pipeline.evaluation import baselines, stats
from pipeline.evaluation import traces as eval_traces
from pipeline.evaluation.evidence import (
    cascade_result,
    compare_all,
    evidence_markdown,
    flat_metrics,
    gate_verdict,
    prediction_rows,
    system_metrics,
    verdict_word,
)
from pipeline.evaluation.inference import infer_local, load_expert, read_split
from pipeline.files import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    tree_hash,
)
from pipeline.inference import runtime
from pipeline.recipe.schema import Recipe
from pipeline.routing import route_search, triage, triage_route
from pipeline.run import contracts, tracking
from pipeline.run.contracts import StageOptions
from pipeline.run.rundir import RunDir
from pipeline.run.stage_documents import (
    MetricsDocument,
    SpecDocument,
    VerdictDocument,
    read_spec,
)
from pipeline.stages.eval_report import print_summary, render_report, write_plots

STAGE = "eval"
OUTPUTS = [
    f"{STAGE}/{name}"
    for name in ("predictions", "plots", "metrics.json", "cascade.json", "route.json", "report.md", "verdict.json",
                 "record.json", "timings.json", triage.FOLDER)
]
Rows = list[dict[str, Any]]


# what eval reads of the recipe (precision and the base come from train/record.json, not from `train`)
RECIPE_KEYS = ("task", "model", "eval")


def inputs_of(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, str]:
    inputs = {
        **contracts.recipe_inputs(run, STAGE, recipe, RECIPE_KEYS),
        "prep/test.jsonl": run.output_hash("prep", "prep/test.jsonl"),
        "prep/spec.json": run.output_hash("prep", "prep/spec.json"),
        "train/adapter": run.output_hash("train", "train/adapter"),
        "train/record.json": run.output_hash("train", "train/record.json"),
    }
    if recipe.eval.tier_names():
        inputs["prep/validation.jsonl"] = run.output_hash("prep", "prep/validation.jsonl")
    if wants_triage(recipe):
        inputs["prep/router.jsonl"] = run.output_hash("prep", "prep/router.jsonl")
    for b in recipe.eval.baselines:  # what each kind reads beyond the run: a few-shot file, recorded predictions
        inputs.update(baseline_kinds.of(b).staleness_inputs(b, run.path))
    return inputs


def warn_label_mix(shift: dict[str, Any]) -> None:
    """Says when validation's label mix differs from test's: thresholds chosen on a split unlike test need not
    hold there."""
    if stats.label_mix_differs(shift):
        console.print(f"[yellow]eval[/]: the validation split's label mix differs from test's (total variation "
                      f"{shift['tvd']:.3f}, chi-squared p={shift['p_value']:.2g}; {stats.moved_labels(shift)}): "
                      "thresholds chosen on validation may not hold on test")


def wants_triage(recipe: Recipe) -> bool:
    return recipe.eval.routing is not None and recipe.eval.routing.triage is not None


@dataclass
class Collected:
    """What eval gathered before it decides anything: the splits it read, every system's rows per split
    (`{prediction, confidence?, latency_s, ...}` in split order; the expert first), the baselines' costs per
    1,000 requests, the baselines skipped, with why, and the recorded stand-ins that answered for a baseline
    (`{rule, path}` by its name); with a `probe` router, the expert's states per split and the seconds one
    request's cost."""

    splits: dict[str, Rows]
    outputs: dict[str, dict[str, Rows]]
    costs: dict[str, float | None]
    skipped: dict[str, str]
    stand_ins: dict[str, dict[str, str]] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)
    probe_seconds: float = 0.0
    router_source: str = ""  # where prep took the router split from, as its stats.json says


@dataclass
class Evidence:
    """What eval decides from the collected answers (`decide`): the documents it writes are these."""

    metrics: dict[str, Any]  # system -> its metrics on test
    comparisons: dict[str, Any]
    calibration: dict[str, Any]
    cascade: dict[str, Any]
    route: dict[str, Any]  # with `test_answers` (per test row: the answering tier and its answer) when routed
    verdict: dict[str, Any]
    routers: dict[str, Any] = field(default_factory=dict)  # triage routers trained, by kind
    triage_answers: dict[str, Rows] = field(default_factory=dict)  # `triage_route.test_answers`


def run(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, Any]:
    inputs = inputs_of(recipe, run)
    if contracts.why_stale(run, STAGE, recipe, lambda: inputs, options) is None:
        console.print(f"[green]eval[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs, recipe, RECIPE_KEYS):
        stage_started = time.perf_counter()
        out = run.stage_dir(STAGE)
        task = tasks.for_type(recipe.task.type)
        spec_doc = read_spec(run.path / "prep/spec.json")
        model_id = run.stage_record("train").get("mlflow_model_id")  # the adapter's logged model, if train made one
        tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base}
        with tracking.stage_run(recipe.name, STAGE, run, tags) as (mlflow_client, mlflow_run_id), \
                ThreadPoolExecutor(1) as background:
            collected = collect(recipe, run, task, spec_doc)
            test = collected.splits["test"]
            # one trace per test example, uploaded while the evidence is computed: they need only the answers
            console.print(f"eval: logging {len(test):,} per-example results to MLflow (one trace each)")
            examples = background.submit(
                eval_traces.log_examples, tracking.configure(), mlflow_client.get_run(mlflow_run_id).info.experiment_id,
                mlflow_run_id, test, {name: by_split["test"] for name, by_split in collected.outputs.items()})
            evidence = decide(recipe, task, spec_doc.spec, collected)
            if "label_mix" in evidence.route:
                warn_label_mix(evidence.route["label_mix"])
            write(out, recipe, spec_doc.spec, collected, evidence)
            logging_started = time.perf_counter()
            log(mlflow_client, mlflow_run_id, recipe, run, out, collected, evidence, model_id)
            examples.result()  # what is left of the upload, if the evidence was quicker
        logging_seconds = time.perf_counter() - logging_started
        stage_seconds = time.perf_counter() - stage_started
        atomic_write_json(out / "timings.json", {"stage_s": stage_seconds, "mlflow_logging_s": logging_seconds,
                                                 "mlflow_logging_share": logging_seconds / stage_seconds})
        verdict = evidence.verdict
        print_summary(evidence.metrics, collected.skipped, verdict, recipe.eval.gate.metric, evidence.route)
        fail_on_required_baselines(recipe, collected, verdict, out)
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=mlflow_run_id, verdict=verdict["passed"],
                         decision=verdict["decision"])
    return run.stage_record(STAGE)


def collect(recipe: Recipe, run: RunDir, task, spec_doc: SpecDocument) -> Collected:
    """Every system's answers: the baselines first (the base-model ones need the adapter separate), then the
    expert as `expert serve` will run it (adapter merged where it can be, the bit-identical speed-ups; eval's
    `record.json` says which). Bad inputs (few-shot file, recorded predictions) fail before any model loads or
    API call is paid for."""
    spec = spec_doc.spec
    tiers = recipe.eval.tier_names()  # systems that also answer the validation split, to choose thresholds on
    splits = {"test": read_split(run, "test")}
    if tiers:
        splits["validation"] = read_split(run, "validation")
    router_source = ""
    if wants_triage(recipe):  # every tier answers the router split too: the routers learn from those outcomes
        splits["router"] = read_split(run, "router")
        router_source = json.loads((run.path / "prep/stats.json").read_text(encoding="utf-8"))["router"]["source"]
    fewshot = baselines.load_fewshot(run, recipe)
    loaded = {b.name: baseline_kinds.of(b).load(b, splits, task, spec) for b in recipe.eval.baselines}
    trained = contracts.read_record(run.path / "train/record.json", contracts.TrainRecord)
    model, tokenizer = load_expert(recipe, trained, run.path / "train/adapter")
    context = baselines.BaselineContext(recipe, task, spec, spec_doc.baseline_system_prompt, fewshot, model, tokenizer,
                                        loaded)
    collected = Collected(splits, {"expert": {}}, {}, {}, router_source=router_source)  # the expert first
    for baseline in recipe.eval.baselines:
        kind = baseline_kinds.of(baseline)
        result = kind.answer(baseline, splits if baseline.name in tiers else {"test": splits["test"]}, context)
        if result.skipped is not None:
            collected.skipped[baseline.name] = result.skipped
            console.print(f"[yellow]eval[/]: baseline `{baseline.name}` skipped: {result.skipped}")
            continue
        collected.outputs[baseline.name] = result.outputs
        collected.costs[baseline.name] = kind.cost_per_1k(baseline, result.outputs["test"], recipe)
        if result.stand_in is not None:
            collected.stand_ins[baseline.name] = {"rule": result.stand_in.rule, "path": str(result.stand_in.path)}
            console.print(f"[yellow]eval[/]: baseline `{baseline.name}` answered from its recorded stand-in " +
                          escape(f"({result.stand_in.path.name}: {result.stand_in.rule})"))

    model, ran_as = runtime.prepare(model, recipe)
    for note in ran_as.speedups:
        console.print(f"eval: {note}")
    contracts.write_record(run.stage_dir(STAGE) / contracts.RECORD, contracts.EvalRecord(
        base=trained.base, precision=trained.precision, adapter_hash=tree_hash(run.path / "train/adapter"),
        device=str(model.device), runtime=ran_as))
    for split, rows in splits.items():
        collected.outputs["expert"][split] = infer_local(model, tokenizer, rows, recipe, spec, f"expert ({split})")
    if wants_triage(recipe) and "probe" in recipe.eval.routing.triage.routers:
        console.print("eval: the expert's states at the answer position, for the probe router")
        for split, rows in splits.items():
            collected.states[split] = triage.expert_states(model, tokenizer, [r["prompt"] for r in rows],
                                                           recipe.eval.batch_size)
        one_at_a_time = [r["prompt"] for r in splits["validation"][:20]]
        started = time.perf_counter()
        for prompt in one_at_a_time:  # as serving pays it: one request's extra pass
            triage.expert_states(model, tokenizer, [prompt], 1)
        collected.probe_seconds = (time.perf_counter() - started) / max(len(one_at_a_time), 1)
    return collected


def decide(recipe: Recipe, task, spec: Any, collected: Collected) -> Evidence:
    """The evidence and the decision from the collected answers alone: no model, no file, no network (the unit
    tests call it on fixed rows). Metrics per system, the expert against each baseline, its calibration, the
    cascade, the route (with validation's label mix against test's when routing classes) and the verdict."""
    splits, outputs, skipped = collected.splits, collected.outputs, collected.skipped
    test = splits["test"]
    golds = [row["target"] for row in test]
    metrics = {name: system_metrics(recipe, task, spec, test, by_split["test"], collected.costs, name,
                                    collected.stand_ins.get(name))
               for name, by_split in outputs.items()}
    comparisons = compare_all(recipe, spec, golds, outputs)
    calibration = stats.calibration(
        [r["confidence"] for r in outputs["expert"]["test"]],
        [r["prediction"] == g for r, g in zip(outputs["expert"]["test"], golds)],
    )
    metrics["expert"]["ece"] = calibration["ece"]
    cascade = cascade_result(recipe, spec, splits, outputs, metrics, skipped)
    route = route_search.route_result(recipe, spec, splits, outputs, metrics, skipped)
    routers, triage_answers = {}, {}
    if wants_triage(recipe):
        compared, routers = triage_route.triage_result(recipe, spec, splits, outputs, metrics, route,
                                                       collected.states, collected.probe_seconds,
                                                       collected.router_source)
        triage_answers = triage_route.test_answers(compared)
        route = (triage_route.route_with_triage(route, compared) if compared.get("kept")
                 else {**route, "triage": triage_route.without_answers(compared)})
    if recipe.eval.routing is not None and task.label_set and splits["validation"]:
        route["label_mix"] = stats.label_mix_shift(*([label for r in splits[s] for label in task.labels_of(r["target"])]
                                                     for s in ("validation", "test")))
    verdict = gate_verdict(recipe, metrics, skipped, comparisons, cascade, route)
    return Evidence(metrics, comparisons, calibration, cascade, route, verdict, routers, triage_answers)


def write(out: Path, recipe: Recipe, spec: Any, collected: Collected, evidence: Evidence) -> None:
    """eval/: every system's predictions per split, the route's answers, plots, metrics.json, cascade.json,
    route.json, verdict.json (checked against the typed readers later commands use) and report.md."""
    splits, outputs, test = collected.splits, collected.outputs, collected.splits["test"]
    metrics, route, verdict = evidence.metrics, dict(evidence.route), evidence.verdict
    for name, by_split in outputs.items():
        for split, rows in by_split.items():
            suffix = "" if split == "test" else f".{split}"
            atomic_write_jsonl(out / "predictions" / f"{name}{suffix}.jsonl", prediction_rows(splits[split], rows))
    write_plots(out / "plots", recipe, spec, [row["target"] for row in test], outputs, evidence.calibration,
                evidence.cascade, metrics, route)
    metrics_doc = {"systems": metrics, "skipped": collected.skipped, "test_examples": len(test),
                   "comparisons": evidence.comparisons, "calibration": evidence.calibration}
    MetricsDocument.model_validate(metrics_doc)
    VerdictDocument.model_validate(verdict)
    atomic_write_json(out / "metrics.json", metrics_doc)
    atomic_write_json(out / "cascade.json", evidence.cascade)
    if "test_answers" in route:
        atomic_write_jsonl(out / "predictions" / "route.jsonl", [
            {"id": e["id"], "target": e["target"], "prediction": answer, "tier": tier}
            for e, (tier, answer) in zip(test, route.pop("test_answers"), strict=True)])
    atomic_write_json(out / "route.json", route)
    folder = out / triage.FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # an earlier eval's routers are not this one's
    folder.mkdir()
    for kind, router in evidence.routers.items():
        triage.save(router, folder / kind)
    for routing, answers in evidence.triage_answers.items():  # where each routing sent each test request
        atomic_write_jsonl(folder / f"test.{routing}.jsonl", [
            {"id": e["id"], "target": e["target"], **answer} for e, answer in zip(test, answers, strict=True)])
    atomic_write_json(out / "verdict.json", verdict)
    atomic_write_text(out / "report.md", render_report(recipe, metrics, collected.skipped, evidence.comparisons,
                                                       evidence.calibration, evidence.cascade, verdict, len(test), route))


def log(mlflow_client, mlflow_run_id: str, recipe: Recipe, run: RunDir, out: Path, collected: Collected,
        evidence: Evidence, model_id: str | None) -> None:
    """The eval run in MLflow: verdict tags, the recipe as params, the splits (and the adapter's logged model) as
    inputs, the expert's metrics against that model and the test dataset, the rest unattached, eval/ as
    artifacts, and the evidence as the run's description."""
    verdict, test_rows = evidence.verdict, len(collected.splits["test"])
    mlflow_client.set_tag(mlflow_run_id, "expert.verdict", verdict_word(verdict))
    mlflow_client.set_tag(mlflow_run_id, "expert.decision", verdict["decision"])
    tracking.log_params(mlflow_client, mlflow_run_id, tracking.flatten(recipe.model_dump(mode="json", by_alias=True)))
    datasets = tracking.log_split_inputs(mlflow_client, mlflow_run_id, recipe, run, list(collected.splits), model_id)
    flat = flat_metrics(evidence.metrics, evidence.comparisons, evidence.cascade, evidence.route)
    expert_keys = {k for k in flat if k.startswith("expert.")}  # the logged model's, measured on test
    tracking.log_metrics(mlflow_client, mlflow_run_id, {k: v for k, v in flat.items() if k in expert_keys},
                         model_id=model_id, dataset=datasets["test"])
    tracking.log_metrics(mlflow_client, mlflow_run_id, {k: v for k, v in flat.items() if k not in expert_keys})
    mlflow_client.log_artifacts(mlflow_run_id, str(out), "eval")
    tracking.set_description(mlflow_client, mlflow_run_id, evidence_markdown(
        recipe, evidence.metrics, VerdictDocument.model_validate(verdict), test_rows))


def fail_on_required_baselines(recipe: Recipe, collected: Collected, verdict: dict[str, Any], out: Path) -> None:
    """A `required` baseline that failed on too many rows fails the stage (exit 2) after everything is
    written for inspection; the stage stays unfinished, so a rerun redoes it."""
    required = [b.name for b in recipe.eval.baselines
                if getattr(b, "required", False) and b.name in verdict["incomplete_baselines"]]
    if required:
        failed = verdict["incomplete_baselines"][required[0]]
        first_error = next((r["error"] for r in collected.outputs[required[0]]["test"] if r.get("error")), "")
        raise UserError(
            f"eval.baselines `{required[0]}` is required and failed on {failed['failed']} of {failed['rows']} test "
            f"rows ({first_error}); the comparison is incomplete and nothing can be promoted. Fix the endpoint "
            f"and rerun `expert eval` (answers already received are cached and not paid again); see {out / 'report.md'}"
        )
