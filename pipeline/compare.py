"""`expert compare`: run directories and registered versions side by side (metrics, verdict, data fingerprint).

Reads what eval wrote (a run's `eval/metrics.json`, `eval/verdict.json`) and what push tagged on a version; never
needs the training data or a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.errors import UserError


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
