"""Using registered experts: predict with the cascade, compare runs and versions.

These back `expert predict` and `expert compare`; they read what push wrote
(a pyfunc version with its bundle and tags) and what eval wrote (run
directories), and never need the training data.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pipeline import frontier, tasks, tracking
from pipeline.errors import UserError
from pipeline.ui import console


def read_inputs(source: TextIO, name: str) -> Iterator[dict[str, Any]]:
    """JSONL rows with a non-empty `text`; a bad line is an error naming it."""
    for line_no, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{name}:{line_no}: not JSON ({err.msg}); each line must be an object with a `text` field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise UserError(f"{name}:{line_no}: each line must be a JSON object with a non-empty string `text`")
        yield row


def load_version(model_uri: str):
    """The pyfunc model and its ExpertModel (for the recipe and threshold)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    tracking.configure()
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"{model_uri}: cannot load ({err.message}); check the name, version or alias") from None
    return loaded, loaded.unwrap_python_model()


def predict_with_cascade(model_uri: str, rows: list[dict[str, Any]], escalate: bool = True) -> list[dict[str, Any]]:
    """Expert answers; rows under the version's threshold go to its frontier baseline when a key is set."""
    loaded, expert = load_version(model_uri)
    answers = loaded.predict([r["text"] for r in rows])
    baseline = next((b for b in expert.recipe.eval.baselines if b.name == expert.frontier and b.kind == "openai"), None)
    key = os.environ.get(baseline.api_key_env) if (baseline and escalate) else None
    out = [{**row, **answer, "escalated": False} for row, answer in zip(rows, answers)]
    unsure = [i for i, r in enumerate(out) if r["escalate"]]
    if unsure and key:
        task = tasks.for_type(expert.recipe.task.type)
        prompts = [
            [{"role": "system", "content": expert.baseline_system_prompt}, {"role": "user", "content": out[i]["text"]}]
            for i in unsure
        ]
        schema = expert.spec if expert.recipe.task.type == "extraction" else None
        replies = frontier.ask_all(baseline, key, prompts, expert.recipe.eval.max_new_tokens, schema)
        for i, reply in zip(unsure, replies):
            if reply.get("raw") is None:
                out[i]["escalation_error"] = reply["error"]
                continue
            out[i].update(expert_answer=out[i]["answer"], answer=task.parse_answer(reply["raw"], expert.spec), escalated=True)
    elif unsure:
        if not escalate:
            why = "--no-escalate"
        elif baseline is None:
            why = f"the cascade frontier `{expert.frontier}` is not an openai baseline"
        else:
            why = f"{baseline.api_key_env} is not set"
        console.print(f"[yellow]predict[/]: {len(unsure)} row(s) under the threshold marked `escalate` but not sent ({why})")
    return out


def write_jsonl(rows: list[dict[str, Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up at call time: stdout may have been replaced since import
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def describe_item(ref: str) -> dict[str, Any]:
    """Summary of a run directory or a registered version (`models:/name/3`, `models:/name@champion`)."""
    if ref.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        body = ref.removeprefix("models:/")
        client = tracking.client()
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = body.rsplit("/", 1)
                version = client.get_model_version(name, number)
        except (MlflowException, ValueError):
            raise UserError(f"{ref}: no such registered version; use models:/NAME/VERSION or models:/NAME@ALIAS") from None
        metrics = {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}
        return {"label": f"{name} v{version.version}", "metrics": metrics, "verdict": version.tags.get("verdict", "?"),
                "fingerprint": version.tags.get("data_fingerprint", "")}
    run = Path(ref)
    metrics_file, verdict_file = run / "eval/metrics.json", run / "eval/verdict.json"
    if not metrics_file.is_file():
        raise UserError(f"{ref}: neither a models:/ URI nor a run directory with eval/metrics.json")
    systems = json.loads(metrics_file.read_text())["systems"]
    metrics = {f"{s}.{k}": float(v) for s, m in systems.items() for k, v in m.items() if isinstance(v, (int, float))}
    verdict = json.loads(verdict_file.read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    return {"label": run.name, "metrics": metrics, "verdict": "pass" if verdict["passed"] else "fail",
            "fingerprint": manifest["stages"]["prep"].get("fingerprint", "")}


def compare_table(refs: list[str]):
    from rich.table import Table

    items = [describe_item(r) for r in refs]
    table = Table(title="compare")
    table.add_column("metric")
    for item in items:
        table.add_column(item["label"], justify="right")
    table.add_row("verdict", *(i["verdict"] for i in items))
    table.add_row("data fingerprint", *(i["fingerprint"][:12] for i in items))
    keys = sorted({k for i in items for k in i["metrics"]}, key=lambda k: (not k.startswith("expert."), k))
    for key in keys:
        table.add_row(key, *(f"{i['metrics'][key]:.4f}" if key in i["metrics"] else "-" for i in items))
    if len({i["fingerprint"] for i in items}) > 1:
        table.caption = "different data fingerprints: these were measured on different test sets"
    return table
