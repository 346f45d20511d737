"""Stage 4, push: register the expert in the MLflow Model Registry, promote it on evidence.

A new version of `registry.model_name` holds the adapter and tokenizer, the
resolved recipe, the prep spec (labels or schema) and the eval report,
verdict and metrics. It is tagged with its metrics, data fingerprint, recipe
hash and base model. Every push sets alias `challenger`; `champion` moves only
when the eval gate passed. Output: `push/registered.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any


from pipeline import tracking
from pipeline.recipe import Recipe
from pipeline.ui import console
from pipeline.rundir import RECIPE_FILE, RunDir, atomic_write_json

STAGE = "push"
OUTPUTS = [f"{STAGE}/registered.json"]
ARTIFACT_PATH = "expert"


def inputs_of(recipe: Recipe, run: RunDir) -> dict[str, str]:
    return {
        "recipe:registry": recipe.section_hash("registry"),
        "train/adapter": run.output_hash("train", "train/adapter"),
        "eval/verdict.json": run.output_hash("eval", "eval/verdict.json"),
        "eval/metrics.json": run.output_hash("eval", "eval/metrics.json"),
    }


def run(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    inputs = inputs_of(recipe, run)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]push[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs):
        verdict = json.loads((run.path / "eval/verdict.json").read_text(encoding="utf-8"))
        metrics = json.loads((run.path / "eval/metrics.json").read_text(encoding="utf-8"))
        manifest = run.read_manifest()
        fingerprint = manifest["stages"]["prep"]["fingerprint"]
        name = recipe.registry.model_name
        tags = version_tags(recipe, metrics, verdict, fingerprint, manifest)
        with tracking.stage_run(recipe.name, STAGE, run.path.name, {"expert.recipe": recipe.name}) as (
            mlflow_client,
            mlflow_run_id,
        ):
            with tempfile.TemporaryDirectory() as tmp:
                bundle = assemble_bundle(run, Path(tmp) / ARTIFACT_PATH)
                mlflow_client.log_artifacts(mlflow_run_id, str(bundle), ARTIFACT_PATH)
            source = f"{mlflow_client.get_run(mlflow_run_id).info.artifact_uri}/{ARTIFACT_PATH}"
            if not mlflow_client.search_registered_models(filter_string=f"name = '{name}'"):
                mlflow_client.create_registered_model(name, description=f"Expert for recipe `{recipe.name}`")
            version = mlflow_client.create_model_version(
                name, source=source, run_id=mlflow_run_id, tags=tags, description=describe(recipe, metrics, verdict)
            )
            aliases = ["challenger"] + (["champion"] if verdict["passed"] else [])
            for alias in aliases:
                mlflow_client.set_registered_model_alias(name, alias, version.version)
        registered = {"model_name": name, "version": version.version, "aliases": aliases, "source": source}
        atomic_write_json(run.stage_dir(STAGE) / "registered.json", registered)
        console.print(
            f"[green]push[/]: registered {name} version {version.version} with alias(es) {', '.join(aliases)}"
            + ("" if verdict["passed"] else " (gate failed: `champion` not moved)")
        )
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=mlflow_run_id, model_version=version.version)
    return run.stage_record(STAGE)


def assemble_bundle(run: RunDir, dest: Path) -> Path:
    """Everything needed to serve and judge the expert, in one directory (no base weights)."""
    shutil.copytree(run.path / "train/adapter", dest / "adapter")
    shutil.copy2(run.path / RECIPE_FILE, dest / RECIPE_FILE)
    shutil.copy2(run.path / "prep/spec.json", dest / "spec.json")
    for name in ("report.md", "verdict.json", "metrics.json"):
        shutil.copy2(run.path / "eval" / name, dest / name)
    shutil.copy2(run.path / "train/metrics.json", dest / "train_metrics.json")
    return dest


def version_tags(recipe: Recipe, metrics, verdict, fingerprint: str, manifest) -> dict[str, str]:
    tags = {
        "verdict": "pass" if verdict["passed"] else "fail",
        "data_fingerprint": fingerprint,
        "recipe_hash": recipe.recipe_hash(),
        "recipe": recipe.name,
        "base_model": recipe.model.base,
        "base_model.lineage": json.dumps(manifest["stages"]["train"].get("base_model", {}), sort_keys=True),
        "run_dir_id": manifest["run_id"],
        "train_mlflow_run_id": manifest["stages"]["train"].get("mlflow_run_id", ""),
        "eval_mlflow_run_id": manifest["stages"]["eval"].get("mlflow_run_id", ""),
    }
    for system, m in metrics["systems"].items():
        for key in ("accuracy", "macro_f1", "valid_json_rate", "field_exact_match", "exact_match", "cost_per_1k", "latency_ms_p50"):
            if m.get(key) is not None:
                tags[f"metric.{system}.{key}"] = f"{m[key]:.4f}"
    return tags


def describe(recipe: Recipe, metrics, verdict) -> str:
    expert = metrics["systems"]["expert"]
    gate = verdict["metric"]
    best = verdict["best_baseline"]
    vs = f" vs `{best}` {verdict['best_baseline_value']:.3f}" if best else ""
    return (
        f"{recipe.task.type} expert on `{recipe.model.base}` (LoRA r={recipe.model.adapter.r}). "
        f"{gate} {expert[gate]:.3f}{vs}; gate {'passed' if verdict['passed'] else 'failed'}."
    )
