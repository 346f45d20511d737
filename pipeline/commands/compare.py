"""`expert compare`: run directories and registered versions side by side (metrics, verdict, data fingerprint).

Reads what eval wrote: a run's `eval/metrics.json` and `eval/verdict.json`, or the same files in a registered
version's bundle; never needs the training data or a model. The metric names and values are the ones eval logged
to its MLflow run (`evidence.flat_metrics`), so the table and the UI say the same thing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.evaluation.evidence import flat_metrics, stand_in_note
from pipeline.run import tracking
from pipeline.run.stage_documents import (
    MetricsDocument,
    VerdictDocument,
    read_metrics,
    read_verdict,
)


def _summary(label: str, metrics_doc: MetricsDocument, verdict: VerdictDocument, fingerprint: str) -> dict[str, Any]:
    stand_ins = {name: m["stand_in"] for name, m in metrics_doc.systems.items() if m.get("stand_in")}
    return {"label": label, "metrics": flat_metrics(metrics_doc.systems, metrics_doc.comparisons),
            "verdict": "pass" if verdict.passed else "fail", "decision": verdict.decision_text(),
            "stand_ins": stand_ins, "fingerprint": fingerprint}


def describe_item(ref: str) -> dict[str, Any]:
    """Summary of a run directory or a registered version (`models:/name/3`, `models:/name@champion`)."""
    if ref.startswith("models:/"):
        from mlflow.artifacts import download_artifacts
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
        docs = {}
        where = client.get_model_version_download_uri(name, version.version)  # its logged model's storage
        with tempfile.TemporaryDirectory() as tmp:
            for doc in ("metrics.json", "verdict.json"):  # the bundle's copies of eval's files
                try:
                    path = download_artifacts(artifact_uri=f"{where}/artifacts/bundle/{doc}", dst_path=tmp)
                except MlflowException as err:
                    raise UserError(f"{ref}: its bundle has no {doc} ({err.message})") from None
                docs[doc] = Path(path)
            return _summary(f"{name} v{version.version}", read_metrics(docs["metrics.json"]),
                            read_verdict(docs["verdict.json"]), version.tags.get("data_fingerprint", ""))
    run = Path(ref)
    metrics_file, verdict_file = run / "eval/metrics.json", run / "eval/verdict.json"
    if not metrics_file.is_file():
        raise UserError(f"{ref}: neither a models:/ URI nor a run directory with eval/metrics.json")
    manifest = json.loads((run / "manifest.json").read_text())
    return _summary(run.name, read_metrics(metrics_file), read_verdict(verdict_file),
                    manifest["stages"]["prep"].get("fingerprint", ""))


def compare_table(refs: list[str]):
    from rich.markup import escape
    from rich.table import Table

    items = [describe_item(r) for r in refs]
    table = Table(title="compare")
    table.add_column("metric (as logged to the eval run in MLflow)")
    for item in items:
        table.add_column(item["label"], justify="right")
    table.add_row("verdict", *(i["verdict"] for i in items))
    table.add_row("decision", *(i["decision"] for i in items))
    table.add_row("data fingerprint", *(i["fingerprint"][:12] for i in items))
    keys = sorted({k for i in items for k in i["metrics"]}, key=lambda k: (not k.startswith("expert."), k))
    for key in keys:
        table.add_row(key, *(f"{i['metrics'][key]:.4f}" if key in i["metrics"] else "-" for i in items))
    table.add_row("recorded stand-ins", *(", ".join(i["stand_ins"]) or "none" for i in items))
    captions = [f"{i['label']}: {stand_in_note(name, stand_in)}" for i in items for name, stand_in in i["stand_ins"].items()]
    if len({i["fingerprint"] for i in items}) > 1:
        captions.append("different data fingerprints: these were measured on different test sets")
    table.caption = escape("\n".join(captions)) if captions else None
    return table
