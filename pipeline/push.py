"""Stage 4, push: register the expert in the MLflow Model Registry, promote it on evidence.

A new version of `registry.model_name` is an MLflow pyfunc model (see
`pipeline/expert_model.py`) whose bundle holds the adapter and tokenizer, the
resolved recipe, the prompt and label set or schema, the cascade threshold and
the eval report, verdict and metrics. The base model is recorded, not copied,
unless `--include-base`. Every push sets alias `challenger`; `champion` moves
only when the gate passed and the candidate is not worse than the current
champion on the same test set (same data fingerprint), or with `--force` and
a recorded reason. Output: `push/registered.json`.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import contracts, models, tracking
from pipeline.contracts import PushOptions, StageOptions
from pipeline.errors import UserError
from pipeline.recipe import Recipe, dump_recipe
from pipeline.rundir import RunDir, atomic_write_json
from pipeline.ui import console

STAGE = "push"
OUTPUTS = [f"{STAGE}/registered.json"]
ARTIFACT_PATH = "expert"
LIBRARIES = ("torch", "transformers", "peft", "trl", "mlflow", "accelerate")


def installed(library: str) -> tuple[str, str]:
    """(distribution, version) of a library: MLflow may be installed as `mlflow-skinny` (its client alone)."""
    try:
        return library, metadata.version(library)
    except metadata.PackageNotFoundError:
        if library != "mlflow":
            raise
        return "mlflow-skinny", metadata.version("mlflow-skinny")


@dataclass(frozen=True)
class Candidate:
    """What promotion compares: the gate metric's value and the test set it was measured on."""

    version: str | None
    metric: str
    value: float
    fingerprint: str


def decide_promotion(passed: bool, candidate: Candidate, champion: Candidate | None, options: PushOptions) -> tuple[bool, str]:
    """Whether `champion` moves to the candidate, and why, in words a reviewer can audit."""
    if options.force:
        return True, f"forced: {options.reason}"
    if not passed:
        return False, "the eval gate failed"
    if champion is None:
        return True, "gate passed and there is no champion yet"
    if champion.fingerprint != candidate.fingerprint:
        return False, (
            f"champion v{champion.version} was evaluated on another test set (fingerprint "
            f"{champion.fingerprint[:12]} vs {candidate.fingerprint[:12]}), so the two cannot be compared; "
            "review both and promote with --force --reason"
        )
    if champion.metric != candidate.metric:
        return False, f"champion v{champion.version} was gated on {champion.metric}, the candidate on {candidate.metric}"
    if candidate.value < champion.value:
        return False, (
            f"{candidate.metric} {candidate.value:.4f} is worse than champion v{champion.version} ({champion.value:.4f})"
        )
    return True, f"gate passed and {candidate.metric} {candidate.value:.4f} >= champion v{champion.version} ({champion.value:.4f})"


# push bundles the whole recipe into the version, so every key is an input
RECIPE_KEYS: tuple[str, ...] = ()
BUNDLED = ["train/adapter", "train/record.json", "train/metrics.json", "prep/spec.json", "eval/verdict.json",
           "eval/metrics.json", "eval/cascade.json", "eval/report.md", "eval/record.json"]


def inputs_of(recipe: Recipe, run: RunDir) -> dict[str, str]:
    inputs = contracts.recipe_inputs(run, STAGE, recipe, RECIPE_KEYS)
    for rel in BUNDLED:
        inputs[rel] = run.output_hash(rel.partition("/")[0], rel)
    return inputs


def run(recipe: Recipe, run: RunDir, stage_options: StageOptions = StageOptions()) -> dict[str, Any]:
    options = stage_options.push
    if options.force and not (options.reason and options.reason.strip()):
        raise UserError("--force needs --reason TEXT: the reason is recorded on the version for reviewers")
    inputs = inputs_of(recipe, run)
    if not (options.force or options.dry_run or STAGE in stage_options.redo) and run.is_current(STAGE, inputs):
        console.print(f"[green]push[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    verdict = json.loads((run.path / "eval/verdict.json").read_text(encoding="utf-8"))
    metrics = json.loads((run.path / "eval/metrics.json").read_text(encoding="utf-8"))
    manifest = run.read_manifest()
    fingerprint = manifest["stages"]["prep"]["fingerprint"]
    name = recipe.registry.model_name
    mlflow_client = tracking.client()
    candidate = Candidate(None, verdict["metric"], verdict["expert"], fingerprint)
    promote, why = decide_promotion(verdict["passed"], candidate, current_champion(mlflow_client, name), options)
    if options.dry_run:
        console.print(
            f"[bold]push --dry-run[/]: would register a new version of {name} as @challenger; "
            f"@champion {'would move' if promote else 'would stay'}: {why}"
        )
        return {"dry_run": True, "promote": promote, "why": why}

    with run.attempt(STAGE, inputs, recipe, RECIPE_KEYS):
        repair_interrupted_push(run, mlflow_client)
        tags = version_tags(recipe, metrics, verdict, fingerprint, manifest)
        tags[PUSH_STATE] = "incomplete"  # set to complete last: a version left incomplete is rolled back
        tags["promotion"] = why
        if options.force:
            tags["forced_reason"] = options.reason
        run_tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base}
        with tracking.stage_run(recipe.name, STAGE, run.path.name, run_tags) as (
            mlflow_client,
            mlflow_run_id,
        ):
            aliases = ["challenger"] + (["champion"] if promote else [])
            atomic_write_json(run.stage_dir(STAGE) / PENDING, {
                "model_name": name, "mlflow_run_id": mlflow_run_id,
                "previous_aliases": current_aliases(mlflow_client, name, aliases)})
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = save_pyfunc(run, Path(tmp), recipe, options.include_base)
                mlflow_client.log_artifacts(mlflow_run_id, str(model_dir), ARTIFACT_PATH)
            mlflow_client.log_artifacts(mlflow_run_id, str(run.path / "eval"), "eval")  # report renders in the UI
            source = f"{mlflow_client.get_run(mlflow_run_id).info.artifact_uri}/{ARTIFACT_PATH}"
            if not mlflow_client.search_registered_models(filter_string=f"name = '{name}'"):
                mlflow_client.create_registered_model(name, description=f"Expert for recipe `{recipe.name}`")
            version = mlflow_client.create_model_version(
                name, source=source, run_id=mlflow_run_id, tags=tags, description=describe(recipe, metrics, verdict, why)
            )
            for alias in aliases:
                mlflow_client.set_registered_model_alias(name, alias, version.version)
            tracking.log_metrics(mlflow_client, mlflow_run_id, {"model_version": float(version.version)})
            mlflow_client.set_model_version_tag(name, version.version, PUSH_STATE, "complete")
        registered = {"model_name": name, "version": version.version, "aliases": aliases, "source": source, "promotion": why}
        atomic_write_json(run.stage_dir(STAGE) / "registered.json", registered)
        (run.stage_dir(STAGE) / PENDING).unlink()
        console.print(
            f"[green]push[/]: registered {name} version {version.version} as "
            f"{', '.join('@' + a for a in aliases)}; champion {'moved' if promote else 'stayed'}: {why}"
        )
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=mlflow_run_id, model_version=version.version)
    return run.stage_record(STAGE)


PENDING = "pending.json"  # in push/: written before a version is created, removed once it is complete
PUSH_STATE = "push_state"  # version tag: `incomplete` until every alias and tag is set, then `complete`


def current_aliases(mlflow_client, name: str, aliases: list[str]) -> dict[str, str | None]:
    """Which version each alias points to now (None: unset), so an interrupted push can put them back."""
    from mlflow.exceptions import MlflowException

    out: dict[str, str | None] = {}
    for alias in aliases:
        try:
            out[alias] = mlflow_client.get_model_version_by_alias(name, alias).version
        except MlflowException:
            out[alias] = None
    return out


def repair_interrupted_push(run: RunDir, mlflow_client) -> None:
    """Roll back what a push of this run directory that was killed midway left behind: its incomplete version
    (whose tags may already say the gate passed) is deleted, the aliases it may have moved are put back, and
    its MLflow run, left RUNNING, is marked KILLED."""
    pending_path = run.stage_dir(STAGE) / PENDING
    if not pending_path.is_file():
        return
    pending = json.loads(pending_path.read_text(encoding="utf-8"))
    name, run_id = pending["model_name"], pending["mlflow_run_id"]
    versions = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if any(v.tags.get(PUSH_STATE) == "complete" for v in versions):  # it finished; only the clean-up was cut short
        pending_path.unlink()
        return
    for version in versions:
        mlflow_client.delete_model_version(name, version.version)
        console.print(f"[yellow]push[/]: removed version {version.version} of {name}, left incomplete by an "
                      "interrupted push of this run")
    for alias, previous in pending["previous_aliases"].items():
        if previous is None:
            try:
                mlflow_client.delete_registered_model_alias(name, alias)
            except Exception:  # noqa: BLE001 - already gone with the deleted version
                pass
        else:
            mlflow_client.set_registered_model_alias(name, alias, previous)
    if mlflow_client.get_run(run_id).info.status == "RUNNING":
        mlflow_client.set_terminated(run_id, "KILLED")
    pending_path.unlink()


def current_champion(mlflow_client, name: str) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow_client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    tags = version.tags
    metric = tags.get("gate_metric", "")
    value = tags.get(f"metric.expert.{metric}")
    if value is None:
        return Candidate(version.version, metric, float("-inf"), tags.get("data_fingerprint", ""))
    return Candidate(version.version, metric, float(value), tags.get("data_fingerprint", ""))


def save_pyfunc(run: RunDir, tmp: Path, recipe: Recipe, include_base: bool) -> Path:
    """Assemble the bundle and save it as a pyfunc model directory (MLmodel + code + artifacts)."""
    import mlflow.pyfunc

    bundle = tmp / "bundle"
    shutil.copytree(run.path / "train/adapter", bundle / "adapter")
    # the recipe as this push checked it: every key the stages read is the value they ran with
    (bundle / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    shutil.copy2(run.path / "prep/spec.json", bundle / "spec.json")
    for name in ("report.md", "verdict.json", "metrics.json", "cascade.json"):
        shutil.copy2(run.path / "eval" / name, bundle / name)
    shutil.copy2(run.path / "train/metrics.json", bundle / "train_metrics.json")
    shutil.copy2(run.path / "train/record.json", bundle / "train_record.json")
    shutil.copy2(run.path / "eval/record.json", bundle / "eval_record.json")
    if include_base:
        trained = contracts.read_record(run.path / "train/record.json", contracts.TrainRecord)
        shutil.copytree(models.recorded_base(trained.base), bundle / "base")
    model_dir = tmp / ARTIFACT_PATH
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=str(Path(__file__).with_name("expert_model_entry.py")),
        artifacts={"bundle": str(bundle)},
        pip_requirements=[f"{distribution}=={version}" for distribution, version in map(installed, LIBRARIES)]
        + [f"expert-pipeline=={metadata.version('expert-pipeline')}"],
    )
    return model_dir


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_tags(recipe: Recipe, metrics, verdict, fingerprint: str, manifest) -> dict[str, str]:
    tags = {
        "verdict": "pass" if verdict["passed"] else "fail",
        "gate_metric": verdict["metric"],
        "data_fingerprint": fingerprint,
        "recipe_hash": recipe.recipe_hash(),
        "recipe": recipe.name,
        "task": recipe.task.type,
        "base_model": recipe.model.base,
        "base_model.lineage": json.dumps(manifest["stages"]["train"].get("base_model", {}), sort_keys=True),
        "run_dir_id": manifest["run_id"],
        "train_mlflow_run_id": manifest["stages"]["train"].get("mlflow_run_id", ""),
        "eval_mlflow_run_id": manifest["stages"]["eval"].get("mlflow_run_id", ""),
        "git_commit": git_commit(),
        "python": platform.python_version(),
    }
    tags.update({f"lib.{lib}": installed(lib)[1] for lib in LIBRARIES})
    for system, m in metrics["systems"].items():
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tags[f"metric.{system}.{key}"] = f"{value:.4f}"
    for baseline, c in (metrics.get("comparisons") or {}).items():
        tags[f"difference.expert_minus.{baseline}"] = (
            f"{c['metric']} {c['difference']:+.4f} (95% CI {c['ci_low']:+.4f} to {c['ci_high']:+.4f}; "
            f"McNemar p={c['mcnemar']['p_value']:.3g})"
        )
    tags["decision"] = verdict.get("decision", "")
    for name, failed in (verdict.get("incomplete_baselines") or {}).items():
        tags[f"incomplete_baseline.{name}"] = f"failed on {failed['failed']} of {failed['rows']} test rows"
    threshold = verdict.get("threshold")
    tags["cascade_threshold"] = "none" if threshold is None else f"{threshold:.4f}"
    route = verdict.get("route")
    tags["route"] = "none" if route is None else " -> ".join(
        f"{name} >= {t:.4f}" for name, t in zip(route["chain"], route["thresholds"])) + f" -> {route['chain'][-1]}"
    return tags


def describe(recipe: Recipe, metrics, verdict, promotion: str) -> str:
    expert = metrics["systems"]["expert"]
    gate = verdict["metric"]
    best = verdict["best_baseline"]
    vs = f" vs `{best}` {verdict['best_baseline_value']:.3f}" if best else ""
    comparison = (metrics.get("comparisons") or {}).get(best or "")
    interval = (
        f" (difference {comparison['difference']:+.3f}, 95% CI {comparison['ci_low']:+.3f} to {comparison['ci_high']:+.3f})"
        if comparison else ""
    )
    decision = f" Decision: {verdict['decision']}." if verdict.get("decision") else ""
    return (
        f"{recipe.task.type} expert for `{recipe.name}` on `{recipe.model.base}` "
        f"(LoRA r={recipe.model.adapter.r}). {gate} {expert[gate]:.3f}{vs}{interval}; "
        f"gate {'passed' if verdict['passed'] else 'failed'}.{decision} Promotion: {promotion}."
    )
