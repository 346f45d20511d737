"""Stage 3, eval: the expert and every baseline on the same held-out test split, with evidence.

Outputs under `eval/`: `predictions/<system>.jsonl` (test split; the cascade's
frontier and the expert also get `<system>.validation.jsonl`), `metrics.json`
(quality, cost per 1,000 requests and latency per system, the paired bootstrap
interval and McNemar test of the expert against each baseline, calibration),
`cascade.json` (threshold chosen on validation, curve on test), `verdict.json`
(`replace`, `cascade` or `keep_frontier`, with the gate), `plots/*.png` and
`report.md`, `timings.json` (the stage's seconds and MLflow logging's share), `record.json` (the base, the
precision and the runtime the expert ran on, `pipeline/runtime.py`: serving runs the same). Everything is logged to MLflow:
the test and validation splits and the adapter's logged model as the run's inputs, the expert's metrics against
that model and the test dataset, one trace per test example (`pipeline/eval_traces.py`), and the verdict as the
run's description.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline import baselines, contracts, eval_traces, frontier, routing, runtime, stats, tasks, tracking
from pipeline.contracts import StageOptions
from pipeline.errors import UserError
from pipeline.eval_inference import infer_local, load_expert, read_split
from pipeline.eval_report import print_summary, render_report, write_plots
from pipeline.evidence import (
    cascade_result,
    compare_all,
    evidence_markdown,
    flat_metrics,
    gate_verdict,
    prediction_rows,
    system_metrics,
    verdict_word,
)
from pipeline.recipe import Recipe
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text, file_hash, tree_hash
from pipeline.ui import console

STAGE = "eval"
OUTPUTS = [
    f"{STAGE}/{name}"
    for name in ("predictions", "plots", "metrics.json", "cascade.json", "route.json", "report.md", "verdict.json",
                 "record.json", "timings.json")
]
FEWSHOT = baselines.FEWSHOT


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
    if any(b.kind == "base_model" and b.shots for b in recipe.eval.baselines) and (run.path / FEWSHOT).is_file():
        inputs[FEWSHOT] = file_hash(run.path / FEWSHOT)
    for b in recipe.eval.baselines:
        if b.kind == "predictions" and b.path.is_file():
            inputs[f"predictions:{b.name}"] = file_hash(b.path)
    return inputs


def label_mix_warning(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Validation's label mix against test's, with a warning when they differ (thresholds chosen on a split
    unlike test need not hold there)."""
    shift = stats.label_mix_shift([r["target"] for r in splits["validation"]], [r["target"] for r in splits["test"]])
    if stats.label_mix_differs(shift):
        console.print(f"[yellow]eval[/]: the validation split's label mix differs from test's (total variation "
                      f"{shift['tvd']:.3f}, chi-squared p={shift['p_value']:.2g}; {stats.moved_labels(shift)}): "
                      "thresholds chosen on validation may not hold on test")
    return shift


def run(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, Any]:
    inputs = inputs_of(recipe, run)
    if contracts.why_stale(run, STAGE, recipe, lambda: inputs, options) is None:
        console.print(f"[green]eval[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs, recipe, RECIPE_KEYS):
        stage_started = time.perf_counter()
        out = run.stage_dir(STAGE)
        task = tasks.for_type(recipe.task.type)
        spec_doc = json.loads((run.path / "prep/spec.json").read_text(encoding="utf-8"))
        spec, baseline_system = spec_doc["spec"], spec_doc["baseline_system_prompt"]
        tiers = recipe.eval.tier_names()  # systems that also answer the validation split, to choose thresholds on
        splits = {"test": read_split(run, "test")}
        if tiers:
            splits["validation"] = read_split(run, "validation")
        fewshot = baselines.load_fewshot(run, recipe)  # bad inputs fail before any model loads or API call is paid for
        recorded = {b.name: baselines.load_recorded(b, splits, task, spec)
                    for b in recipe.eval.baselines if b.kind == "predictions"}

        # system -> split -> rows ({prediction, confidence?, latency_s, ...}), all in split order
        outputs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        costs: dict[str, float | None] = {}
        skipped: dict[str, str] = {}
        trained = contracts.read_record(run.path / "train/record.json", contracts.TrainRecord)
        model, tokenizer = load_expert(recipe, trained, run.path / "train/adapter")
        needs_api = any(b.kind == "openai" for b in recipe.eval.baselines)
        cache = frontier.ResponseCache(frontier.default_cache_path()) if needs_api else None
        context = baselines.BaselineContext(recipe, task, spec, baseline_system, fewshot, model, tokenizer, recorded,
                                            cache)
        test = splits["test"]
        model_id = run.stage_record("train").get("mlflow_model_id")  # the adapter's logged model, if train made one
        tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base}
        with tracking.stage_run(recipe.name, STAGE, run, tags) as (mlflow_client, mlflow_run_id), \
                ThreadPoolExecutor(1) as background:
            outputs["expert"] = {}  # first: reports and traces list the expert before its baselines
            try:  # the baselines first: the base-model ones need the adapter separate, and the expert runs merged
                for baseline in recipe.eval.baselines:
                    wanted = splits if baseline.name in tiers else {"test": splits["test"]}
                    result = baselines.run_baseline(baseline, wanted, context)
                    if result.skipped is not None:
                        skipped[baseline.name] = result.skipped
                        console.print(f"[yellow]eval[/]: baseline `{baseline.name}` skipped: {result.skipped}")
                        continue
                    outputs[baseline.name] = result.outputs
                    if baseline.kind not in ("base_model", "expert"):  # local models: priced by machine time
                        costs[baseline.name] = result.cost_per_1k
            finally:
                if cache is not None:
                    cache.close()

            # the expert as `expert serve` will run it (adapter merged where it can be, the bit-identical speed-ups),
            # after the base-model baselines, which need the adapter separate to switch it off
            model, ran_as = runtime.prepare(model, recipe)
            for note in ran_as.speedups:
                console.print(f"eval: {note}")
            contracts.write_record(out / contracts.RECORD, contracts.EvalRecord(
                base=trained.base, precision=trained.precision, adapter_hash=tree_hash(run.path / "train/adapter"),
                device=str(model.device), runtime=ran_as))

            for split, rows in splits.items():
                outputs["expert"][split] = infer_local(model, tokenizer, rows, recipe, spec, f"expert ({split})")

            # one trace per test example, uploaded while the evidence is computed: they need only the answers
            console.print(f"eval: logging {len(test):,} per-example results to MLflow (one trace each)")
            examples = background.submit(
                eval_traces.log_examples, tracking.configure(), mlflow_client.get_run(mlflow_run_id).info.experiment_id,
                mlflow_run_id, test, {name: by_split["test"] for name, by_split in outputs.items()})
            golds = [row["target"] for row in test]
            metrics = {name: system_metrics(recipe, task, spec, test, by_split["test"], costs, name)
                       for name, by_split in outputs.items()}
            comparisons = compare_all(recipe, spec, golds, outputs)
            calibration = stats.calibration(
                [r["confidence"] for r in outputs["expert"]["test"]],
                [r["prediction"] == g for r, g in zip(outputs["expert"]["test"], golds)],
            )
            metrics["expert"]["ece"] = calibration["ece"]
            cascade = cascade_result(recipe, spec, splits, outputs, metrics, skipped)
            route = routing.route_result(recipe, spec, splits, outputs, metrics, skipped)
            if recipe.eval.routing is not None and recipe.task.type == "classification" and splits["validation"]:
                route["label_mix"] = label_mix_warning(splits)
            verdict = gate_verdict(recipe, metrics, skipped, comparisons, cascade, route)

            for name, by_split in outputs.items():
                for split, rows in by_split.items():
                    suffix = "" if split == "test" else f".{split}"
                    atomic_write_jsonl(out / "predictions" / f"{name}{suffix}.jsonl", prediction_rows(splits[split], rows))
            write_plots(out / "plots", recipe, spec, golds, outputs, calibration, cascade, metrics, route)
            atomic_write_json(out / "metrics.json", {
                "systems": metrics, "skipped": skipped, "test_examples": len(test), "comparisons": comparisons,
                "calibration": calibration,
            })
            atomic_write_json(out / "cascade.json", cascade)
            if "test_answers" in route:
                atomic_write_jsonl(out / "predictions" / "route.jsonl", [
                    {"id": e["id"], "target": e["target"], "prediction": answer, "tier": tier}
                    for e, (tier, answer) in zip(splits["test"], route.pop("test_answers"), strict=True)])
            atomic_write_json(out / "route.json", route)
            atomic_write_json(out / "verdict.json", verdict)
            atomic_write_text(out / "report.md", render_report(recipe, metrics, skipped, comparisons, calibration, cascade,
                                                               verdict, len(test), route))

            logging_started = time.perf_counter()
            mlflow_client.set_tag(mlflow_run_id, "expert.verdict", verdict_word(verdict))
            mlflow_client.set_tag(mlflow_run_id, "expert.decision", verdict["decision"])
            tracking.log_params(mlflow_client, mlflow_run_id, tracking.flatten(recipe.model_dump(mode="json", by_alias=True)))
            datasets = tracking.log_split_inputs(mlflow_client, mlflow_run_id, recipe, run, list(splits), model_id)
            flat = flat_metrics(metrics, comparisons, cascade, route)
            expert_keys = {k for k in flat if k.startswith("expert.")}  # the logged model's, measured on test
            tracking.log_metrics(mlflow_client, mlflow_run_id, {k: v for k, v in flat.items() if k in expert_keys},
                                 model_id=model_id, dataset=datasets["test"])
            tracking.log_metrics(mlflow_client, mlflow_run_id, {k: v for k, v in flat.items() if k not in expert_keys})
            mlflow_client.log_artifacts(mlflow_run_id, str(out), "eval")
            tracking.set_description(mlflow_client, mlflow_run_id, evidence_markdown(recipe, metrics, verdict, len(test)))
            examples.result()  # what is left of the upload, if the evidence was quicker
        logging_seconds = time.perf_counter() - logging_started
        stage_seconds = time.perf_counter() - stage_started
        atomic_write_json(out / "timings.json", {"stage_s": stage_seconds, "mlflow_logging_s": logging_seconds,
                                                 "mlflow_logging_share": logging_seconds / stage_seconds})
        print_summary(metrics, skipped, verdict, recipe.eval.gate.metric)
        required = [b.name for b in recipe.eval.baselines if b.kind == "openai" and b.required and b.name in verdict["incomplete_baselines"]]
        if required:  # everything above is written for inspection; the stage stays unfinished, so a rerun redoes it
            failed = verdict["incomplete_baselines"][required[0]]
            first_error = next((r["error"] for r in outputs[required[0]]["test"] if r.get("error")), "")
            raise UserError(
                f"eval.baselines `{required[0]}` is required and failed on {failed['failed']} of {failed['rows']} test "
                f"rows ({first_error}); the comparison is incomplete and nothing can be promoted. Fix the endpoint "
                f"and rerun `expert eval` (answers already received are cached and not paid again); see {out / 'report.md'}"
            )
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=mlflow_run_id, verdict=verdict["passed"],
                         decision=verdict["decision"])
    return run.stage_record(STAGE)


