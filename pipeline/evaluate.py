"""Stage 3, eval: the expert and every baseline on the same held-out test split.

Outputs under `eval/`: `predictions/<system>.jsonl`, `metrics.json` (quality,
cost per 1,000 requests and latency per system), `report.md` and
`verdict.json` (did the expert pass the recipe's gate). Logs to MLflow.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import frontier, models, predict, tasks, tracking
from pipeline.recipe import Recipe
from pipeline.ui import console
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text

STAGE = "eval"
OUTPUTS = [f"{STAGE}/predictions", f"{STAGE}/metrics.json", f"{STAGE}/report.md", f"{STAGE}/verdict.json"]


def inputs_of(recipe: Recipe, run: RunDir) -> dict[str, str]:
    return {
        "recipe:task,model,eval": recipe.section_hash("task", "model", "eval"),
        "prep/test.jsonl": run.output_hash("prep", "prep/test.jsonl"),
        "prep/spec.json": run.output_hash("prep", "prep/spec.json"),
        "train/adapter": run.output_hash("train", "train/adapter"),
    }


def run(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    inputs = inputs_of(recipe, run)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]eval[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs):
        out = run.stage_dir(STAGE)
        task = tasks.for_type(recipe.task.type)
        spec_doc = json.loads((run.path / "prep/spec.json").read_text(encoding="utf-8"))
        spec = spec_doc["spec"]
        test = [json.loads(line) for line in (run.path / "prep/test.jsonl").read_text(encoding="utf-8").splitlines()]
        golds = [row["target"] for row in test]

        systems: dict[str, list[dict[str, Any]]] = {}
        costs: dict[str, float | None] = {}
        skipped: dict[str, str] = {}
        model, tokenizer = load_expert(recipe, run.path / "train/adapter")
        systems["expert"] = infer_local(model, tokenizer, test, recipe, task, spec, "expert")
        for baseline in recipe.eval.baselines:
            if baseline.kind == "base_model":
                with model.disable_adapter():
                    systems[baseline.name] = infer_local(model, tokenizer, test, recipe, task, spec, baseline.name)
            else:
                key = frontier.api_key(baseline)
                if key is None:
                    skipped[baseline.name] = f"environment variable {baseline.api_key_env} is not set"
                    console.print(f"[yellow]eval[/]: baseline `{baseline.name}` skipped: {skipped[baseline.name]}")
                    continue
                with _progress(baseline.name, len(test)) as advance:
                    rows = frontier.ask_all(baseline, key, [r["prompt"] for r in test], recipe.eval.max_new_tokens, advance)
                rows = [{**r, "prediction": task.parse_answer(r["raw"], spec) if r["raw"] is not None else None} for r in rows]
                systems[baseline.name] = rows
                costs[baseline.name] = frontier.cost_per_1k(baseline, rows)

        metrics: dict[str, Any] = {}
        for name, rows in systems.items():
            preds = [r["prediction"] for r in rows]
            m = task.metrics(golds, preds, spec)
            latencies = [r["latency_s"] for r in rows]
            m["latency_ms_p50"] = 1000 * statistics.median(latencies)
            m["latency_ms_mean"] = 1000 * statistics.fmean(latencies)
            m["errors"] = sum(1 for r in rows if r.get("error"))
            if name in costs:
                m["cost_per_1k"] = costs[name]
            else:  # local systems: machine time per request at the recipe's hourly price
                m["cost_per_1k"] = 1000 * statistics.fmean(latencies) * recipe.eval.expert_cost_per_hour / 3600
            metrics[name] = m
            atomic_write_jsonl(
                out / "predictions" / f"{name}.jsonl",
                [{"id": t["id"], "target": t["target"], **r} for t, r in zip(test, rows)],
            )
        verdict = gate_verdict(recipe, metrics, skipped)
        atomic_write_json(out / "metrics.json", {"systems": metrics, "skipped": skipped, "test_examples": len(test)})
        atomic_write_json(out / "verdict.json", verdict)
        atomic_write_text(out / "report.md", render_report(recipe, metrics, skipped, verdict, len(test)))

        tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base, "expert.verdict": _verdict_word(verdict)}
        with tracking.stage_run(recipe.name, STAGE, run.path.name, tags) as (mlflow_client, mlflow_run_id):
            tracking.log_params(mlflow_client, mlflow_run_id, tracking.flatten(recipe.model_dump(mode="json", by_alias=True)))
            tracking.log_metrics(mlflow_client, mlflow_run_id, flat_metrics(metrics))
            mlflow_client.log_artifacts(mlflow_run_id, str(out), "eval")
        print_summary(metrics, skipped, verdict, recipe.eval.gate.metric)
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=mlflow_run_id, verdict=verdict["passed"])
    return run.stage_record(STAGE)


def load_expert(recipe: Recipe, adapter_dir: Path):
    from peft import PeftModel

    source, _ = models.resolve_base(recipe.model.base)
    tokenizer = models.load_tokenizer(adapter_dir, recipe.model.trust_remote_code)
    base = models.load_base_model(recipe.model, source)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, tokenizer


class _progress:
    """A rich progress bar for one system's pass over the test split; yields an `advance(n)` callback."""

    def __init__(self, name: str, total: int):
        self.bar = Progress(
            TextColumn(f"[bold]eval[/] {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task = self.bar.add_task(name, total=total)

    def __enter__(self):
        self.bar.start()
        return lambda n: self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        self.bar.stop()


def infer_local(model, tokenizer, test, recipe: Recipe, task, spec, name: str) -> list[dict[str, Any]]:
    prompts = [row["prompt"] for row in test]
    with _progress(name, len(test)) as advance:
        if recipe.task.type == "classification":
            return predict.classify(model, tokenizer, prompts, spec, recipe.eval.batch_size, advance)
        rows = predict.generate(model, tokenizer, prompts, recipe.eval.max_new_tokens, recipe.eval.batch_size, advance)
    return predict.parse_generated(rows, lambda text: task.parse_answer(text, spec))


def gate_verdict(recipe: Recipe, metrics: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    """Pass when the expert is within `max_drop_vs_best_baseline` of the best baseline and above `min_value`."""
    gate = recipe.eval.gate
    expert = metrics["expert"][gate.metric]
    baselines = {n: m[gate.metric] for n, m in metrics.items() if n != "expert"}
    reasons = []
    best_name, best = (max(baselines.items(), key=lambda kv: kv[1]) if baselines else (None, None))
    passed = True
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
    return {
        "passed": passed,
        "metric": gate.metric,
        "expert": expert,
        "best_baseline": best_name,
        "best_baseline_value": best,
        "max_drop_vs_best_baseline": gate.max_drop_vs_best_baseline,
        "min_value": gate.min_value,
        "skipped_baselines": skipped,
        "reasons": reasons,
    }


def _verdict_word(verdict: dict[str, Any]) -> str:
    return "pass" if verdict["passed"] else "fail"


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for system, m in metrics.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and v is not None:
                out[f"{system}.{k}"] = float(v)
    return out


def _quality_columns(metrics: dict[str, Any]) -> list[str]:
    first = next(iter(metrics.values()))
    return [k for k in ("accuracy", "macro_f1", "valid_json_rate", "field_exact_match", "exact_match") if k in first]


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render_report(recipe: Recipe, metrics, skipped, verdict, n_test: int) -> str:
    cols = _quality_columns(metrics)
    lines = [
        f"# Evaluation: {recipe.name}",
        "",
        f"Test examples: {n_test}. Gate: `{verdict['metric']}`, at most {verdict['max_drop_vs_best_baseline']} "
        f"below the best baseline. **Verdict: {'PASS' if verdict['passed'] else 'FAIL'}**.",
        "",
        "| system | " + " | ".join(cols) + " | cost / 1k requests ($) | latency p50 (ms) | errors | unparsed |",
        "|---" * (len(cols) + 5) + "|",
    ]
    for name, m in metrics.items():
        quality = " | ".join(f"{m[c]:.4f}" for c in cols)
        lines.append(
            f"| {name} | {quality} | {_fmt(m['cost_per_1k'], '.4f')} | {m['latency_ms_p50']:.1f} | {m['errors']} | {m['unparsed']} |"
        )
    lines += ["", "## Verdict", ""] + [f"- {r}" for r in verdict["reasons"]]
    if skipped:
        lines += ["", "## Skipped baselines", ""] + [f"- `{n}`: {why}" for n, why in skipped.items()]
    lines += [
        "",
        "Local systems' cost is machine time per request at `eval.expert_cost_per_hour` "
        f"(${recipe.eval.expert_cost_per_hour}/h); latency of local systems is per example within a batch of "
        f"{recipe.eval.batch_size}.",
        "",
    ]
    return "\n".join(lines)


def summary_table(metrics: dict[str, Any], skipped: dict[str, str], gate_metric: str) -> Table:
    cols = _quality_columns(metrics)
    table = Table(title=f"expert vs baselines (gate metric: {gate_metric})")
    for c in ["system", *cols, "cost / 1k req ($)", "latency p50 (ms)"]:
        table.add_column(c, justify="left" if c == "system" else "right")
    for name, m in sorted(metrics.items(), key=lambda kv: kv[0] != "expert"):
        table.add_row(name, *(f"{m[c]:.3f}" for c in cols), _fmt(m["cost_per_1k"], ".4f"), f"{m['latency_ms_p50']:.1f}")
    for name in skipped:
        table.add_row(name, *("skipped" for _ in cols), "", "")
    if skipped:
        table.caption = "skipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items())
    return table


def print_summary(metrics, skipped, verdict, gate_metric: str) -> None:
    console.print(summary_table(metrics, skipped, gate_metric))
    word = "[green]PASS[/]" if verdict["passed"] else "[red]FAIL[/]"
    console.print(f"gate: {word} - " + "; ".join(verdict["reasons"]))
