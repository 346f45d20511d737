"""Stage 3, eval: the expert and every baseline on the same held-out test split, with evidence.

Outputs under `eval/`: `predictions/<system>.jsonl` (test split; the cascade's
frontier and the expert also get `<system>.validation.jsonl`), `metrics.json`
(quality, cost per 1,000 requests and latency per system, the paired bootstrap
interval and McNemar test of the expert against each baseline, calibration),
`cascade.json` (threshold chosen on validation, curve on test), `verdict.json`
(`replace`, `cascade` or `keep_frontier`, with the gate), `plots/*.png` and
`report.md`. Everything is logged to MLflow, predictions also as tables.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import frontier, models, plots, predict, stats, tasks, tracking
from pipeline.errors import UserError
from pipeline.recipe import BaselineSection, Recipe
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text, file_hash
from pipeline.ui import console

STAGE = "eval"
OUTPUTS = [
    f"{STAGE}/{name}"
    for name in ("predictions", "plots", "metrics.json", "cascade.json", "report.md", "verdict.json")
]
FEWSHOT = "prep/fewshot.json"


def inputs_of(recipe: Recipe, run: RunDir) -> dict[str, str]:
    inputs = {
        "recipe:task,model,eval": recipe.section_hash("task", "model", "eval"),
        "prep/test.jsonl": run.output_hash("prep", "prep/test.jsonl"),
        "prep/spec.json": run.output_hash("prep", "prep/spec.json"),
        "train/adapter": run.output_hash("train", "train/adapter"),
    }
    if recipe.eval.cascade is not None:
        inputs["prep/validation.jsonl"] = run.output_hash("prep", "prep/validation.jsonl")
    if any(b.shots for b in recipe.eval.baselines) and (run.path / FEWSHOT).is_file():
        inputs[FEWSHOT] = file_hash(run.path / FEWSHOT)
    for b in recipe.eval.baselines:
        if b.kind == "predictions" and b.path.is_file():
            inputs[f"predictions:{b.name}"] = file_hash(b.path)
    return inputs


def run(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    inputs = inputs_of(recipe, run)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]eval[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs):
        out = run.stage_dir(STAGE)
        task = tasks.for_type(recipe.task.type)
        spec_doc = json.loads((run.path / "prep/spec.json").read_text(encoding="utf-8"))
        spec, baseline_system = spec_doc["spec"], spec_doc["baseline_system_prompt"]
        cascade_to = recipe.eval.cascade_frontier()
        splits = {"test": read_split(run, "test")}
        if cascade_to is not None:
            splits["validation"] = read_split(run, "validation")
        fewshot = load_fewshot(run, recipe)  # bad inputs fail before any model loads or API call is paid for
        recorded = {b.name: load_recorded(b, splits, task, spec) for b in recipe.eval.baselines if b.kind == "predictions"}

        # system -> split -> rows ({prediction, confidence?, latency_s, ...}), all in split order
        outputs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        costs: dict[str, float | None] = {}
        skipped: dict[str, str] = {}
        model, tokenizer = load_expert(recipe, run.path / "train/adapter")
        outputs["expert"] = {s: infer_local(model, tokenizer, rows, recipe, spec, f"expert ({s})")
                             for s, rows in splits.items()}
        needs_api = any(b.kind == "openai" for b in recipe.eval.baselines)
        cache = frontier.ResponseCache(frontier.default_cache_path()) if needs_api else None
        try:
            for baseline in recipe.eval.baselines:
                wanted = splits if baseline.name == cascade_to else {"test": splits["test"]}
                if baseline.kind == "base_model":
                    with model.disable_adapter():
                        outputs[baseline.name] = {
                            s: infer_local(model, tokenizer, baseline_rows(rows, baseline_system, fewshot, baseline.shots),
                                           recipe, spec, f"{baseline.name} ({s})")
                            for s, rows in wanted.items()
                        }
                elif baseline.kind == "predictions":
                    outputs[baseline.name] = {s: recorded[baseline.name][s] for s in wanted}
                    costs[baseline.name] = frontier.cost_per_1k(baseline.price_per_mtok, recorded[baseline.name]["test"])
                else:
                    key = frontier.api_key(baseline)
                    if key is None:
                        skipped[baseline.name] = f"environment variable {baseline.api_key_env} is not set"
                        console.print(f"[yellow]eval[/]: baseline `{baseline.name}` skipped: {skipped[baseline.name]}")
                        continue
                    outputs[baseline.name] = {
                        s: ask_frontier(baseline, key, baseline_rows(rows, baseline_system), recipe, task, spec, cache, s)
                        for s, rows in wanted.items()
                    }
                    costs[baseline.name] = frontier.cost_per_1k(baseline.price_per_mtok, outputs[baseline.name]["test"])
        finally:
            if cache is not None:
                cache.close()

        test = splits["test"]
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
        verdict = gate_verdict(recipe, metrics, skipped, comparisons, cascade)

        for name, by_split in outputs.items():
            for split, rows in by_split.items():
                suffix = "" if split == "test" else f".{split}"
                atomic_write_jsonl(out / "predictions" / f"{name}{suffix}.jsonl", prediction_rows(splits[split], rows))
        write_plots(out / "plots", recipe, spec, golds, outputs, calibration, cascade, metrics)
        atomic_write_json(out / "metrics.json", {
            "systems": metrics, "skipped": skipped, "test_examples": len(test), "comparisons": comparisons,
            "calibration": calibration,
        })
        atomic_write_json(out / "cascade.json", cascade)
        atomic_write_json(out / "verdict.json", verdict)
        atomic_write_text(out / "report.md", render_report(recipe, metrics, skipped, comparisons, calibration, cascade,
                                                           verdict, len(test)))

        tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base, "expert.verdict": _verdict_word(verdict),
                "expert.decision": verdict["decision"]}
        with tracking.stage_run(recipe.name, STAGE, run.path.name, tags) as (mlflow_client, mlflow_run_id):
            tracking.log_params(mlflow_client, mlflow_run_id, tracking.flatten(recipe.model_dump(mode="json", by_alias=True)))
            tracking.log_metrics(mlflow_client, mlflow_run_id, flat_metrics(metrics, comparisons, cascade))
            mlflow_client.log_artifacts(mlflow_run_id, str(out), "eval")
            for name, by_split in outputs.items():
                mlflow_client.log_table(mlflow_run_id, table_of(splits["test"], by_split["test"]),
                                        f"eval/tables/{name}.json")
        print_summary(metrics, skipped, verdict, recipe.eval.gate.metric)
        required = [b.name for b in recipe.eval.baselines if b.required and b.name in verdict["incomplete_baselines"]]
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


def read_split(run: RunDir, split: str) -> list[dict[str, Any]]:
    path = run.path / f"prep/{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_expert(recipe: Recipe, adapter_dir: Path):
    from peft import PeftModel

    source, _ = models.resolve_base(recipe.model.base)
    tokenizer = models.load_tokenizer(adapter_dir, recipe.model.trust_remote_code)
    base = models.load_base_model(recipe.model, source, models.resolve_precision(recipe.train.precision),
                                  device_map=models.inference_device_map())
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, tokenizer


# -- baselines' inputs -------------------------------------------------------------------------------------------


def load_fewshot(run: RunDir, recipe: Recipe) -> list[dict[str, Any]]:
    """prep/fewshot.json examples when a base_model baseline asks for shots; a clear error when they are missing."""
    wanting = [(i, b) for i, b in enumerate(recipe.eval.baselines) if b.shots > 0]
    if not wanting:
        return []
    path = run.path / FEWSHOT
    i, first = wanting[0]
    where = f"eval -> baselines -> {i} -> shots"
    if not path.is_file():
        raise UserError(
            f"{where}: `{first.name}` asks for {first.shots} few-shot examples but {path} does not exist; "
            "re-run `expert prep` with a prep stage that writes it, or set shots: 0"
        )
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a few-shot file ({{\"examples\": [...]}} expected): {err}") from None
    most = max(b.shots for _, b in wanting)
    if len(examples) < most:
        raise UserError(f"{where}: {most} shots asked for but {path} holds only {len(examples)} examples; lower shots")
    return examples


def _completion_text(example: dict[str, Any]) -> str:
    completion = example["completion"]
    if isinstance(completion, list):  # TRL conversational form: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"]
    return str(completion)


def baseline_rows(
    rows: list[dict[str, Any]], system_prompt: str, fewshot: list[dict[str, Any]] = (), shots: int = 0
) -> list[dict[str, Any]]:
    """Rows as an untuned model is asked them: the baseline system prompt (instruction with the label list or
    schema) in place of the expert's, then `shots` user/assistant example turns, then the question."""
    turns = []
    for example in fewshot[:shots]:
        turns += [{"role": "user", "content": example["text"]}, {"role": "assistant", "content": _completion_text(example)}]
    system = [{"role": "system", "content": system_prompt}]
    return [{**row, "prompt": system + turns + [m for m in row["prompt"] if m["role"] != "system"]} for row in rows]


def load_recorded(baseline: BaselineSection, splits: dict[str, list[dict[str, Any]]], task, spec) -> dict[str, list]:
    """Recorded outputs matched to each split's rows by id; every needed id must be there."""
    path = baseline.path
    if not path.is_file():
        raise UserError(f"eval.baselines `{baseline.name}` -> path: {path} does not exist")
    by_id: dict[str, dict[str, Any]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "id" not in row or "output" not in row:
            raise UserError(f"{path}:{line_no}: each line needs `id` and `output` (the recorded answer)")
        key = str(row["id"])
        if key in by_id:
            raise UserError(f"{path}:{line_no}: id {key} appears twice; keep one answer per example")
        by_id[key] = row
    out = {}
    for split, rows in splits.items():
        missing = [str(r["id"]) for r in rows if str(r["id"]) not in by_id]
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise UserError(
                f"{path}: {len(missing)} {split} example id(s) have no recorded output: {shown}; "
                f"record an output for every {split} example"
            )
        out[split] = [recorded_row(by_id[str(r["id"])], task, spec) for r in rows]
    return out


def recorded_row(row: dict[str, Any], task, spec) -> dict[str, Any]:
    output = row["output"]
    raw = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    latency = row.get("latency_ms")
    return {
        "raw": raw,
        "prediction": task.parse_answer(raw, spec),
        "latency_s": latency / 1000 if isinstance(latency, (int, float)) else None,
        "input_tokens": row.get("input_tokens"),
        "output_tokens": row.get("output_tokens"),
    }


# -- inference ---------------------------------------------------------------------------------------------------


class _progress:
    """A rich progress bar for one system's pass over a split; yields an `advance(n)` callback.

    Without a terminal (a log file, CI) the bar is invisible, so a plain line
    with the count and the rate goes out every 10% of the examples.
    """

    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        self.bar = Progress(
            TextColumn(f"[bold]eval[/] {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task = self.bar.add_task(name, total=total)
        self.done = 0
        self.next_line = 0
        self.started = 0.0

    def __enter__(self):
        self.started = time.perf_counter()
        self.bar.start()
        return self.advance

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        self.done += n
        if not console.is_terminal and (self.done >= self.next_line or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            console.print(f"eval: {self.name} {self.done:,}/{self.total:,} examples, {rate:.1f}/s", highlight=False)
            self.next_line = self.done + max(1, self.total // 10)

    def __exit__(self, *exc):
        self.bar.stop()


def infer_local(model, tokenizer, rows, recipe: Recipe, spec, name: str) -> list[dict[str, Any]]:
    prompts = [row["prompt"] for row in rows]
    if not prompts:
        return []
    with _progress(name, len(prompts)) as advance:
        return predict.answer(model, tokenizer, prompts, recipe, spec, advance)


def ask_frontier(baseline: BaselineSection, key: str, rows, recipe: Recipe, task, spec, cache, split: str):
    schema = spec if recipe.task.type == "extraction" else None
    with _progress(f"{baseline.name} ({split})", len(rows)) as advance:
        answers = frontier.ask_all(baseline, key, [r["prompt"] for r in rows], recipe.eval.max_new_tokens, schema,
                                   cache, advance)
    failed = sum(1 for a in answers if a.get("error"))
    if failed:
        console.print(f"[yellow]eval[/]: `{baseline.name}` failed on {failed} of {len(rows)} {split} examples "
                      "after retries; they count as wrong (see the report)")
    return [{**a, "prediction": task.parse_answer(a["raw"], spec) if a["raw"] is not None else None} for a in answers]


def prediction_rows(examples: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": e["id"], "target": e["target"], **r} for e, r in zip(examples, rows, strict=True)]


def table_of(examples: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, list]:
    """Predictions as columns for an MLflow table (objects as JSON text so every cell is a scalar)."""
    def cell(v):
        return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, ensure_ascii=False)

    return {
        "id": [str(e["id"]) for e in examples],
        "text": [e.get("text", "") for e in examples],
        "target": [cell(e["target"]) for e in examples],
        "prediction": [cell(r["prediction"]) for r in rows],
        "confidence": [r.get("confidence") for r in rows],
        "correct": [r["prediction"] == e["target"] for e, r in zip(examples, rows)],
    }


# -- metrics, comparison, cascade, verdict -----------------------------------------------------------------------


def _percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return 1000 * (ordered[low] + (ordered[high] - ordered[low]) * (k - low))


def system_metrics(recipe: Recipe, task, spec, examples, rows, costs: dict[str, float | None], name: str) -> dict[str, Any]:
    m = task.metrics([e["target"] for e in examples], [r["prediction"] for r in rows], spec)
    latencies = [r["latency_s"] for r in rows if r.get("latency_s") is not None]
    m["latency_ms_p50"] = _percentile_ms(latencies, 0.5)
    m["latency_ms_p95"] = _percentile_ms(latencies, 0.95)
    m["latency_ms_mean"] = 1000 * statistics.fmean(latencies) if latencies else None
    m["errors"] = sum(1 for r in rows if r.get("error"))
    m["rows"] = len(rows)
    m["unparsed_ids"] = [str(e["id"]) for e, r in zip(examples, rows) if r["prediction"] is None]
    if name in costs:
        m["cost_per_1k"] = costs[name]
    else:  # local systems: measured machine seconds per request at the recipe's hourly price
        m["cost_per_1k"] = 1000 * statistics.fmean(latencies) * recipe.eval.expert_cost_per_hour / 3600
    if any("attempts" in r for r in rows):
        m["api_calls"] = sum(r.get("attempts", 0) for r in rows)
        m["cache_hits"] = sum(1 for r in rows if r.get("cached"))
        m["retries"] = sum(max(0, r.get("attempts", 0) - 1) for r in rows)
        m["input_tokens"] = sum(r.get("input_tokens") or 0 for r in rows if r.get("raw") is not None)
        m["output_tokens"] = sum(r.get("output_tokens") or 0 for r in rows if r.get("raw") is not None)
    return m


def compare_all(recipe: Recipe, spec, golds, outputs) -> dict[str, Any]:
    """Expert minus each baseline on the gate metric: paired bootstrap 95% interval and McNemar's exact test."""
    metric = recipe.eval.gate.metric
    expert = [r["prediction"] for r in outputs["expert"]["test"]]
    expert_correct = [p == g for p, g in zip(expert, golds)]
    out = {}
    for name, by_split in outputs.items():
        if name == "expert":
            continue
        other = [r["prediction"] for r in by_split["test"]]
        interval = stats.paired_bootstrap(metric, golds, expert, other, spec, recipe.eval.bootstrap_samples,
                                          recipe.eval.seed)
        test = stats.mcnemar_exact(expert_correct, [p == g for p, g in zip(other, golds)])
        out[name] = {"metric": metric, **interval, "mcnemar": {"expert_only_correct": test["a_only"],
                                                               "baseline_only_correct": test["b_only"],
                                                               "p_value": test["p_value"]}}
    return out


def cascade_result(recipe: Recipe, spec, splits, outputs, metrics, skipped) -> dict[str, Any]:
    """Threshold chosen on validation (cheapest meeting the target), curve reported on test."""
    section = recipe.eval.cascade
    name = recipe.eval.cascade_frontier()
    result: dict[str, Any] = {
        "threshold": None,
        "target_metric": section.target_metric if section else None,
        "target": section.target if section else None,
        "frontier": name,
        "curve": [],
        "validation_curve": [],
        "reason": None,
    }
    if section is None:
        result["reason"] = "no eval.cascade in the recipe"
        return result
    if name in skipped:
        result["reason"] = f"frontier baseline `{name}` was skipped: {skipped[name]}"
        return result
    if not splits["validation"]:
        result["reason"] = "the validation split is empty; set data.split.validation > 0 to choose a threshold"
        return result
    answers = [r for split in ("validation", "test") for r in outputs[name][split]]
    failed = sum(1 for r in answers if r.get("error"))
    if failed / len(answers) > recipe.eval.gate.max_baseline_failure_rate:
        result["reason"] = (f"frontier baseline `{name}` failed on {failed} of {len(answers)} validation and test rows; "
                            "a threshold chosen against answers it did not give proves nothing")
        return result
    expert_cost, frontier_cost = metrics["expert"]["cost_per_1k"], metrics[name]["cost_per_1k"]

    def curve(split: str, thresholds: list[float]) -> list[dict[str, Any]]:
        expert = outputs["expert"][split]
        return stats.cascade_curve(
            section.target_metric, [r["target"] for r in splits[split]], [r["prediction"] for r in expert],
            [r["confidence"] for r in expert], [r["prediction"] for r in outputs[name][split]], spec, thresholds,
            expert_cost, frontier_cost,
        )

    thresholds = stats.candidate_thresholds([r["confidence"] for r in outputs["expert"]["validation"]])
    result["validation_curve"] = curve("validation", thresholds)
    result["curve"] = curve("test", thresholds)
    chosen = stats.choose_threshold(result["validation_curve"], section.target)
    if chosen is None:
        best = max(p["metric"] for p in result["validation_curve"])
        result["reason"] = (f"no threshold reaches {section.target_metric} {section.target} on validation "
                            f"(best {best:.4f}, escalating everything)")
        return result
    result["threshold"] = chosen["threshold"]
    result["validation"] = chosen
    result["test"] = next(p for p in result["curve"] if p["threshold"] == chosen["threshold"])
    return result


def gate_verdict(recipe: Recipe, metrics: dict[str, Any], skipped: dict[str, str],
                 comparisons: dict[str, Any] | None = None, cascade: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gate (expert within `max_drop_vs_best_baseline` of the best baseline and above `min_value`) and a decision.

    `replace` when the gate passes; else `cascade` when a threshold met the
    cascade target on validation; else `keep_frontier`.
    """
    gate = recipe.eval.gate
    expert = metrics["expert"][gate.metric]
    baselines = {n: m[gate.metric] for n, m in metrics.items() if n != "expert"}
    reasons = []
    incomplete = incomplete_baselines(metrics, gate.max_baseline_failure_rate)
    best_name, best = (max(baselines.items(), key=lambda kv: kv[1]) if baselines else (None, None))
    passed = not incomplete
    for name, failed in incomplete.items():
        reasons.append(
            f"comparison incomplete: `{name}` failed on {failed['failed']} of {failed['rows']} test rows "
            f"(more than eval.gate.max_baseline_failure_rate {gate.max_baseline_failure_rate:g}); its score is no "
            "evidence, so the gate cannot pass")
    if expert < gate.min_value:
        passed = False
        reasons.append(f"expert {gate.metric} {expert:.4f} is below eval.gate.min_value {gate.min_value}")
    if best is not None and expert < best - gate.max_drop_vs_best_baseline:
        passed = False
        reasons.append(
            f"expert {gate.metric} {expert:.4f} is more than {gate.max_drop_vs_best_baseline} below "
            f"`{best_name}` ({best:.4f})"
        )
    if best is None:
        reasons.append("no baseline ran; only eval.gate.min_value was checked")
    if passed and best is not None:
        reasons.append(f"expert {gate.metric} {expert:.4f} vs best baseline `{best_name}` {best:.4f}")
    difference = (comparisons or {}).get(best_name)
    if difference is not None:
        reasons.append(
            f"expert - `{best_name}` {gate.metric}: {difference['difference']:+.4f} "
            f"(95% CI {difference['ci_low']:+.4f} to {difference['ci_high']:+.4f}; McNemar p={difference['mcnemar']['p_value']:.3g})"
        )
    threshold = (cascade or {}).get("threshold")
    if incomplete:
        decision = "incomplete"
    elif passed:
        decision = "replace"
    elif threshold is not None:
        decision = "cascade"
        test = cascade["test"]
        reasons.append(
            f"cascade: escalate when expert confidence < {threshold:.4f}; on test {test['escalation_rate']:.1%} "
            f"escalated, {cascade['target_metric']} {test['metric']:.4f} (target {cascade['target']})"
        )
    else:
        decision = "keep_frontier"
        if cascade and cascade.get("reason"):
            reasons.append(f"no cascade: {cascade['reason']}")
    return {
        "passed": passed,
        "decision": decision,
        "metric": gate.metric,
        "expert": expert,
        "best_baseline": best_name,
        "best_baseline_value": best,
        "max_drop_vs_best_baseline": gate.max_drop_vs_best_baseline,
        "min_value": gate.min_value,
        "difference_vs_best_baseline": difference,
        "threshold": threshold,
        "skipped_baselines": skipped,
        "incomplete_baselines": incomplete,
        "failed_rows": {n: m.get("errors", 0) for n, m in metrics.items()},
        "reasons": reasons,
    }


def incomplete_baselines(metrics: dict[str, Any], max_failure_rate: float) -> dict[str, dict[str, int]]:
    """Baselines that failed (no answer after retries) on more than `max_failure_rate` of the test rows."""
    out = {}
    for name, m in metrics.items():
        rows, failed = m.get("rows", 0), m.get("errors", 0)
        if name != "expert" and rows and failed / rows > max_failure_rate:
            out[name] = {"failed": failed, "rows": rows}
    return out


def _verdict_word(verdict: dict[str, Any]) -> str:
    return "pass" if verdict["passed"] else "fail"


def flat_metrics(metrics: dict[str, Any], comparisons: dict[str, Any] | None = None,
                 cascade: dict[str, Any] | None = None) -> dict[str, float]:
    out = {}
    for system, m in metrics.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                out[f"{system}.{k}"] = float(v)
        for field, prf in m.get("field_f1", {}).items():  # extraction: per top-level field
            out[f"{system}.field_f1.{field}"] = prf["f1"]
    for name, c in (comparisons or {}).items():
        for k in ("difference", "ci_low", "ci_high"):
            out[f"expert_vs_{name}.{k}"] = c[k]
        out[f"expert_vs_{name}.mcnemar_p"] = c["mcnemar"]["p_value"]
    if cascade and cascade.get("threshold") is not None:
        out["cascade.threshold"] = cascade["threshold"]
        out["cascade.test_escalation_rate"] = cascade["test"]["escalation_rate"]
        out["cascade.test_metric"] = cascade["test"]["metric"]
        if cascade["test"]["cost_per_1k"] is not None:
            out["cascade.test_cost_per_1k"] = cascade["test"]["cost_per_1k"]
    return out


# -- plots, report, terminal -------------------------------------------------------------------------------------


def write_plots(folder: Path, recipe: Recipe, spec, golds, outputs, calibration, cascade, metrics) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if recipe.task.type == "classification":
        for name, by_split in outputs.items():
            plots.confusion_matrix(folder / f"confusion_{name}.png", golds, [r["prediction"] for r in by_split["test"]],
                                   spec, f"{name}: confusion matrix (test)")
    plots.reliability_diagram(folder / "reliability_expert.png", calibration, "expert reliability")
    if cascade["curve"]:
        name, metric = cascade["frontier"], cascade["target_metric"]
        frontier_point = {"metric": stats.metric_value(metric, golds, [r["prediction"] for r in outputs[name]["test"]], spec),
                          "cost_per_1k": metrics[name]["cost_per_1k"]}
        expert_point = {"metric": stats.metric_value(metric, golds, [r["prediction"] for r in outputs["expert"]["test"]],
                                                     spec),
                        "cost_per_1k": metrics["expert"]["cost_per_1k"]}
        plots.cascade_plot(folder / "cascade.png", cascade["curve"], expert_point, frontier_point, cascade.get("test"),
                           metric, cascade["target"])


def _quality_columns(metrics: dict[str, Any]) -> list[str]:
    first = next(iter(metrics.values()))
    return [k for k in ("accuracy", "macro_f1", "valid_json_rate", "field_exact_match", "micro_f1", "exact_match")
            if k in first]


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render_report(recipe: Recipe, metrics, skipped, comparisons, calibration, cascade, verdict, n_test: int) -> str:
    cols = _quality_columns(metrics)
    decision = {"replace": "REPLACE the frontier with the expert", "cascade": "CASCADE: expert first, frontier when unsure",
                "keep_frontier": "KEEP the frontier",
                "incomplete": "NONE: the comparison is incomplete (a baseline did not answer)"}[verdict["decision"]]
    lines = [
        f"# Evaluation: {recipe.name}",
        "",
        f"Test examples: {n_test}. Gate: `{verdict['metric']}`, at most {verdict['max_drop_vs_best_baseline']} "
        f"below the best baseline. **Gate: {'PASS' if verdict['passed'] else 'FAIL'}. Decision: {decision}.**",
        "",
        "| system | " + " | ".join(cols) + " | cost / 1k requests ($) | latency p50 (ms) | latency p95 (ms) | errors | unparsed |",
        "|---" * (len(cols) + 6) + "|",
    ]
    for name, m in metrics.items():
        quality = " | ".join(f"{m[c]:.4f}" for c in cols)
        lines.append(
            f"| {name} | {quality} | {_fmt(m['cost_per_1k'], '.4f')} | {_fmt(m['latency_ms_p50'], '.1f')} | "
            f"{_fmt(m['latency_ms_p95'], '.1f')} | {m['errors']} | {m['unparsed']} |"
        )
    with_fields = {n: m for n, m in metrics.items() if "field_f1" in m}
    if with_fields:
        lines += ["", "## Fields (exact match per example; precision / recall / F1 over leaf values, micro-averaged)",
                  "", "| system | field | exact | precision | recall | F1 | gold values |", "|---|---|---|---|---|---|---|"]
        for name, m in with_fields.items():
            for field, prf in m["field_f1"].items():
                lines.append(f"| {name} | {field} | {m['per_field'][field]:.4f} | {prf['precision']:.4f} | "
                             f"{prf['recall']:.4f} | {prf['f1']:.4f} | {prf['support']} |")
    if comparisons:
        lines += ["", f"## Expert vs each baseline ({verdict['metric']}, paired bootstrap, {recipe.eval.bootstrap_samples} "
                  "resamples)", "",
                  "| baseline | expert - baseline | 95% CI | expert-only correct | baseline-only correct | McNemar exact p |",
                  "|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            mc = c["mcnemar"]
            lines.append(f"| {name} | {c['difference']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | "
                         f"{mc['expert_only_correct']} | {mc['baseline_only_correct']} | {mc['p_value']:.3g} |")
    api = {n: m for n, m in metrics.items() if "api_calls" in m}
    if api:
        lines += ["", "## API usage", "", "| baseline | calls made | cache hits | retries | input tokens | output tokens |",
                  "|---|---|---|---|---|---|"]
        for name, m in api.items():
            lines.append(f"| {name} | {m['api_calls']} | {m['cache_hits']} | {m['retries']} | {m['input_tokens']} | "
                         f"{m['output_tokens']} |")
    lines += ["", "## Calibration of the expert", "",
              f"Expected calibration error: {calibration['ece']:.4f} (10 equal-width bins). ![reliability](plots/reliability_expert.png)"]
    lines += ["", "## Cascade", ""]
    if cascade["threshold"] is not None:
        v, t = cascade["validation"], cascade["test"]
        lines += [
            f"Escalate to `{cascade['frontier']}` when the expert's confidence is below **{cascade['threshold']:.4f}** "
            f"(the cheapest threshold meeting {cascade['target_metric']} >= {cascade['target']} on validation: "
            f"{v['metric']:.4f}, {v['escalation_rate']:.1%} escalated).",
            f"On test: {cascade['target_metric']} {t['metric']:.4f}, {t['escalation_rate']:.1%} escalated, "
            f"cost / 1k requests {_fmt(t['cost_per_1k'], '.4f')}.",
        ]
    else:
        lines.append(f"No threshold: {cascade['reason']}.")
    if cascade["curve"]:
        lines += ["", "![cascade](plots/cascade.png)", "", "| threshold | escalated (test) | "
                  f"{cascade['target_metric']} (test) | cost / 1k (test) |", "|---|---|---|---|"]
        step = max(1, len(cascade["curve"]) // 12)
        for p in cascade["curve"][::step]:
            lines.append(f"| {p['threshold']:.4f} | {p['escalation_rate']:.1%} | {p['metric']:.4f} | "
                         f"{_fmt(p['cost_per_1k'], '.4f')} |")
    if recipe.task.type == "classification":
        lines += ["", "## Confusion matrices", ""] + [f"![{n}](plots/confusion_{n}.png)" for n in metrics]
    lines += ["", "## Verdict", ""] + [f"- {r}" for r in verdict["reasons"]]
    unparsed = {n: m["unparsed_ids"] for n, m in metrics.items() if m["unparsed_ids"]}
    if unparsed:
        lines += ["", "## Unparsable answers and failed calls (counted as wrong)", ""]
        for n, ids in unparsed.items():
            lines.append(f"- `{n}`: {len(ids)}: " + ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else ""))
    if skipped:
        lines += ["", "## Skipped baselines", ""] + [f"- `{n}`: {why}" for n, why in skipped.items()]
    lines += [
        "",
        "Local systems' cost is measured machine time per request at `eval.expert_cost_per_hour` "
        f"(${recipe.eval.expert_cost_per_hour}/h); latency of local systems is per example within a batch of "
        f"{recipe.eval.batch_size}. API latency is per call (cached answers keep the latency of the call that made "
        "them). Unparsable answers and failed calls count as wrong.",
        "",
    ]
    return "\n".join(lines)


def summary_table(metrics: dict[str, Any], skipped: dict[str, str], gate_metric: str) -> Table:
    cols = _quality_columns(metrics)
    table = Table(title=f"expert vs baselines (gate metric: {gate_metric})")
    for c in ["system", *cols, "cost / 1k req ($)", "latency p50 (ms)", "latency p95 (ms)"]:
        table.add_column(c, justify="left" if c == "system" else "right")
    for name, m in sorted(metrics.items(), key=lambda kv: kv[0] != "expert"):
        table.add_row(name, *(f"{m[c]:.3f}" for c in cols), _fmt(m["cost_per_1k"], ".4f"),
                      _fmt(m.get("latency_ms_p50"), ".1f"), _fmt(m.get("latency_ms_p95"), ".1f"))
    for name in skipped:
        table.add_row(name, *("skipped" for _ in cols), "", "", "")
    if skipped:
        table.caption = "skipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items())
    return table


def print_summary(metrics, skipped, verdict, gate_metric: str) -> None:
    console.print(summary_table(metrics, skipped, gate_metric))
    word = "[green]PASS[/]" if verdict["passed"] else "[red]FAIL[/]"
    console.print(f"gate: {word}; decision: [bold]{verdict['decision']}[/] - " + "; ".join(verdict["reasons"]))
