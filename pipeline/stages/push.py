"""Stage 4, push: register the expert in the MLflow Model Registry, promote it on evidence.

A new version of `registry.model_name` is an MLflow pyfunc model (see
`pipeline/expert_model.py`) whose bundle holds the adapter and tokenizer, the
resolved recipe, the prompt and label set or schema, the cascade threshold and
the eval report, verdict and metrics. The base model is recorded, not copied,
unless `--include-base`. Every push sets alias `challenger`; `champion` moves
only when the gate passed and the candidate is not worse than the current
champion on the same test set (same data fingerprint), or with `--force` and
a recorded reason. Output: `push/registered.json`.

The version's logged model holds `expert_manifest.json`, the sha256 of every file in it, and the registry records
the manifest's digest (and, with `EXPERT_VERSION_SIGNING_KEY` set, its HMAC signature) as tags: loading checks
them before it reads a file (`pipeline/registry/digest.py`).
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

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.evaluation.evidence import evidence_markdown, flat_metrics
from pipeline.files import atomic_write_json, tree_hash
from pipeline.inference import models
from pipeline.recipe.schema import Recipe, dump_recipe
from pipeline.registry import digest as version_digest
from pipeline.run import contracts, tracking
from pipeline.run.contracts import PushOptions, StageOptions
from pipeline.run.rundir import RunDir
from pipeline.run.stage_documents import (
    MetricsDocument,
    VerdictDocument,
    read_metrics,
    read_verdict,
)

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
    return True, (
        f"gate passed and {candidate.metric} {candidate.value:.4f} >= champion v{champion.version} ({champion.value:.4f})"
    )


# push bundles the whole recipe into the version, so every key is an input
RECIPE_KEYS: tuple[str, ...] = ()
BUNDLED = ["train/adapter", "train/record.json", "train/metrics.json", "prep/spec.json", "eval/verdict.json",
           "eval/metrics.json", "eval/cascade.json", "eval/report.md", "eval/record.json"]


def inputs_of(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, str]:
    inputs = contracts.recipe_inputs(run, STAGE, recipe, RECIPE_KEYS)
    for rel in BUNDLED:
        inputs[rel] = run.output_hash(rel.partition("/")[0], rel)
    if kept_triage(run) is not None:  # its router is bundled too (runs without triage keep their inputs)
        inputs["eval/triage"] = run.output_hash("eval", "eval/triage")  # evaluate.OUTPUTS names it
    if options.push.include_base:  # another bundle, so another version (recorded only when asked: earlier pushes stay current)
        inputs["--include-base"] = "yes"
    return inputs


def run(recipe: Recipe, run: RunDir, stage_options: StageOptions = StageOptions()) -> dict[str, Any]:
    options = stage_options.push
    if options.force and not (options.reason and options.reason.strip()):
        raise UserError("--force needs --reason TEXT: the reason is recorded on the version for reviewers")
    signing_key = version_digest.signing_key()  # a malformed key is refused before anything is written
    inputs = inputs_of(recipe, run, stage_options)
    if not options.dry_run and contracts.why_stale(run, STAGE, recipe, lambda: inputs, stage_options) is None:
        console.print(f"[green]push[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    verdict = read_verdict(run.path / "eval/verdict.json")
    metrics = read_metrics(run.path / "eval/metrics.json")
    manifest = run.read_manifest()
    fingerprint = manifest["stages"]["prep"]["fingerprint"]
    name = recipe.registry.model_name
    mlflow_client = tracking.client()
    candidate = Candidate(None, verdict.metric, verdict.expert, fingerprint)
    promote, why = decide_promotion(verdict.passed, candidate, current_champion(mlflow_client, name), options)
    if options.dry_run:
        console.print(
            f"[bold]push --dry-run[/]: would register a new version of {name} as @challenger; "
            f"@champion {'would move' if promote else 'would stay'}: {why}"
        )
        return {"dry_run": True, "promote": promote, "why": why}

    with run.attempt(STAGE, inputs, recipe, RECIPE_KEYS):
        repair_interrupted_push(run, mlflow_client)
        tags = version_tags(recipe, metrics, verdict, fingerprint, manifest)
        evaluated = contracts.read_record(run.path / "eval" / contracts.RECORD, contracts.EvalRecord)
        tags["runtime"] = f"adapter {evaluated.runtime.adapter}"  # what eval ran; serving runs the same
        tags[PUSH_STATE] = "incomplete"  # set to complete last: a version left incomplete is rolled back
        tags["promotion"] = why
        if options.force:
            tags["forced_reason"] = options.reason
        run_tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base}
        with tracking.stage_run(recipe.name, STAGE, run, run_tags) as (
            mlflow_client,
            mlflow_run_id,
        ):
            aliases = ["challenger"] + (["champion"] if promote else [])
            atomic_write_json(run.stage_dir(STAGE) / PENDING, {
                "model_name": name, "mlflow_run_id": mlflow_run_id,
                "previous_aliases": current_aliases(mlflow_client, name, aliases)})
            model_id = adapter_model(mlflow_client, run, recipe, manifest, mlflow_run_id)
            with tempfile.TemporaryDirectory() as tmp:
                model_dir, bundle_hash = save_pyfunc(run, Path(tmp), recipe, options.include_base)
                model_id, digest = pyfunc_model(mlflow_client, model_id, model_dir, bundle_hash, run, recipe,
                                                metrics, mlflow_run_id)
            tags[version_digest.DIGEST_TAG] = digest
            if signing_key is not None:
                tags[version_digest.SIGNATURE_TAG] = version_digest.sign(digest, signing_key)
                mlflow_client.set_logged_model_tags(model_id, {
                    version_digest.SIGNATURE_TAG: tags[version_digest.SIGNATURE_TAG]})
            mlflow_client.log_artifacts(mlflow_run_id, str(run.path / "eval"), "eval")  # report renders in the UI
            mlflow_client.log_dict(mlflow_run_id, version_provenance(recipe, metrics, verdict, manifest, model_id),
                                   PROVENANCE)
            source = f"models:/{model_id}"
            if not mlflow_client.search_registered_models(filter_string=f"name = '{name}'"):
                mlflow_client.create_registered_model(name, description=f"Expert for recipe `{recipe.name}`")
            version = mlflow_client.create_model_version(
                name, source=source, run_id=mlflow_run_id, tags=tags,
                description=describe(recipe, run, metrics, verdict, why), model_id=model_id)
            tracking.link_version_to_model(mlflow_client, model_id, name, version.version)
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
CREATED_BY = "expert.created_by_push"  # logged-model tag: the push (MLflow run) that made it, to roll back
BUNDLE_TAG = "expert.bundle_hash"  # on a logged model: the bundle its pyfunc holds (a version's content never changes)
PROVENANCE = "version_provenance.json"  # in the push run's artifacts: what the short version tags leave out
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
    (whose tags may already say the gate passed) and the logged models it made are deleted, and the aliases it
    may have moved are put back (its MLflow run, left RUNNING, is marked KILLED by `tracking.stage_run`)."""
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
    experiment = mlflow_client.get_run(run_id).info.experiment_id
    for model in mlflow_client.search_logged_models([experiment], filter_string=f"tags.`{CREATED_BY}` = '{run_id}'"):
        mlflow_client.delete_logged_model(model.model_id)
        console.print(f"[yellow]push[/]: removed logged model {model.model_id}, made by the interrupted push")
    pending_path.unlink()


def current_champion(mlflow_client, name: str) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow_client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    tags = version.tags
    metric = tags.get("gate_metric", "")
    value = tags.get("gate_value", tags.get(f"metric.expert.{metric}"))  # versions pushed before had metric.* tags
    if value is None:
        return Candidate(version.version, metric, float("-inf"), tags.get("data_fingerprint", ""))
    return Candidate(version.version, metric, float(value), tags.get("data_fingerprint", ""))


def adapter_model(mlflow_client, run: RunDir, recipe: Recipe, manifest, push_run_id: str) -> str:
    """The logged model train made of the adapter; made now when train's MLflow logging could not."""
    train = manifest["stages"]["train"]
    return train.get("mlflow_model_id") or new_adapter_model(mlflow_client, run, recipe,
                                                             train.get("mlflow_run_id") or push_run_id, push_run_id)


def new_adapter_model(mlflow_client, run: RunDir, recipe: Recipe, source_run_id: str, push_run_id: str) -> str:
    """A logged model of the run's adapter (uploaded), an output of `source_run_id` (the train run, if any),
    tagged with the push that made it (an interrupted push's are deleted by the next one)."""
    from pipeline.stages.train import adapter_params

    trained = contracts.read_record(run.path / "train/record.json", contracts.TrainRecord)
    steps = json.loads((run.path / "train/metrics.json").read_text(encoding="utf-8"))["steps"]
    logged: dict[str, str] = {}
    tracking.log_adapter_model(mlflow_client, source_run_id, run.path / "train/adapter", recipe.registry.model_name,
                               adapter_params(recipe, trained.base, trained.model_dump(), steps), logged,
                               tags={CREATED_BY: push_run_id})
    return logged["model_id"]


def pyfunc_model(mlflow_client, model_id: str, model_dir: Path, bundle_hash: str, run: RunDir, recipe: Recipe,
                 metrics, push_run_id: str) -> tuple[str, str]:
    """The logged model this version is registered from, and its content digest: the adapter's, with the pyfunc
    and the manifest of every file added around it. Pushed before with the same bundle: as it is. With another
    bundle (a new eval of the same adapter, `--include-base`), or holding files a killed push left: a new logged
    model of the same adapter, the expert's test metrics logged against it too, because a registered version's
    files must never change under it."""
    from pipeline.run.tracking import ADAPTER_PATH

    held = mlflow_client.get_logged_model(model_id).tags
    if held.get(BUNDLE_TAG) == bundle_hash and version_digest.is_digest(held.get(version_digest.DIGEST_TAG)):
        return model_id, held[version_digest.DIGEST_TAG]
    if BUNDLE_TAG in held or not holds_only_the_adapter(mlflow_client, model_id):
        model_id = new_adapter_model(mlflow_client, run, recipe,
                                     run.stage_record("train").get("mlflow_run_id") or push_run_id, push_run_id)
        test = tracking.split_dataset(recipe, run, "test")
        expert = {k: v for k, v in flat_metrics(metrics.systems).items() if k.startswith("expert.")}
        tracking.log_metrics(mlflow_client, push_run_id, expert, model_id=model_id, dataset=test)
    # the adapter is in the logged model already, uploaded from this run's train/adapter (an input of push)
    digest = version_digest.write_manifest(model_dir, version_digest.file_digests(model_dir) | version_digest.file_digests(
        run.path / "train/adapter", ADAPTER_PATH))
    mlflow_client.log_model_artifacts(model_id, str(model_dir))
    mlflow_client.set_logged_model_tags(model_id, {BUNDLE_TAG: bundle_hash, version_digest.DIGEST_TAG: digest})
    return model_id, digest


def holds_only_the_adapter(mlflow_client, model_id: str) -> bool:
    """Whether the logged model's bundle folder has nothing but the adapter train uploaded (a push killed while
    uploading leaves more, which this push's files would not all replace)."""
    from pipeline.run.tracking import BUNDLE

    listed = mlflow_client.list_logged_model_artifacts(model_id, f"artifacts/{BUNDLE}")
    return [Path(f.path).name for f in listed] == ["adapter"]


def kept_triage(run: RunDir) -> str | None:
    """The triage router eval's route keeps (verdict.json route.triage), if any."""
    route = read_verdict(run.path / "eval/verdict.json").route
    return None if route is None or route.triage is None else route.triage.router


def bundle_triage(run: RunDir, bundle: Path) -> None:
    """The kept triage router (eval/triage/<router>/) into the bundle's `triage/<router>/`, where loading reads
    it (`cascade.load_triage`); the manifest's digest covers it like every other file. A router that does not
    load is refused here, before a version that could not be served is registered."""
    from pipeline.routing import triage

    router = kept_triage(run)
    if router is None:
        return
    source = run.path / "eval" / triage.FOLDER / router
    if not source.is_dir():
        raise UserError(f"{source}: missing, yet eval/verdict.json's route keeps the `{router}` triage router; redo "
                        "eval (`expert run --force eval`)")
    triage.load(source)
    shutil.copytree(source, bundle / triage.FOLDER / router)


def save_pyfunc(run: RunDir, tmp: Path, recipe: Recipe, include_base: bool) -> tuple[Path, str]:
    """Assemble the bundle and save it as a pyfunc model directory (MLmodel + code + artifacts), less the adapter
    (its logged model holds it, where the bundle reads it); returns the directory and the bundle's hash."""
    import mlflow.pyfunc

    bundle = tmp / "bundle"
    bundle.mkdir()
    # the recipe as this push checked it: every key the stages read is the value they ran with
    (bundle / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    shutil.copy2(run.path / "prep/spec.json", bundle / "spec.json")
    for name in ("report.md", "verdict.json", "metrics.json", "cascade.json"):
        shutil.copy2(run.path / "eval" / name, bundle / name)
    shutil.copy2(run.path / "train/metrics.json", bundle / "train_metrics.json")
    shutil.copy2(run.path / "train/record.json", bundle / "train_record.json")
    shutil.copy2(run.path / "eval/record.json", bundle / "eval_record.json")
    bundle_triage(run, bundle)
    if include_base:
        trained = contracts.read_record(run.path / "train/record.json", contracts.TrainRecord)
        shutil.copytree(models.recorded_base(trained.base), bundle / "base")
    model_dir = tmp / ARTIFACT_PATH
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=str(Path(__file__).parents[1] / "expert_model_entry.py"),
        artifacts={"bundle": str(bundle)},
        pip_requirements=[f"{distribution}=={version}" for distribution, version in map(installed, LIBRARIES)]
        + [f"expert-pipeline=={metadata.version('expert-pipeline')}"],
    )
    return model_dir, tree_hash(bundle)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_tags(recipe: Recipe, metrics: MetricsDocument, verdict: VerdictDocument, fingerprint: str,
                 manifest) -> dict[str, str]:
    """The short set of tags a reviewer scans on the version page (and push's promotion reads); the rest of the
    version's provenance is `version_provenance` (one JSON artifact)."""
    gate = verdict.metric
    route = verdict.route
    threshold = verdict.threshold
    tags = {
        "verdict": "pass" if verdict.passed else "fail",
        "decision": verdict.decision or "",
        "gate_metric": gate,
        "gate_value": f"{metrics.systems['expert'][gate]:.4f}",
        "data_fingerprint": fingerprint,
        "recipe": recipe.name,
        "base_model": recipe.model.base,
        "run_dir_id": manifest["run_id"],
        "cascade_threshold": "none" if threshold is None else f"{threshold:.4f}",
        "route": "none" if route is None else " -> ".join(
            f"{name} >= {t:.4f}" for name, t in zip(route.chain, route.thresholds)) + f" -> {route.chain[-1]}",
        "provenance": f"{PROVENANCE} in the push run's artifacts",
    }
    incomplete = verdict.incomplete_baselines
    if incomplete:  # a comparison with holes is what a reviewer must see first
        tags["incomplete_baselines"] = "; ".join(f"{name}: failed on {failed['failed']} of {failed['rows']} test rows"
                                                 for name, failed in incomplete.items())
    return tags


def version_provenance(recipe: Recipe, metrics: MetricsDocument, verdict: VerdictDocument, manifest,
                       model_id: str) -> dict[str, Any]:
    """Everything else a version is traced by: the recipe hash, the base's lineage, the stages' MLflow runs and
    logged model, code and library versions, every system's metrics and the comparisons."""
    train, evaluation = manifest["stages"]["train"], manifest["stages"]["eval"]
    return {
        "recipe_hash": recipe.recipe_hash(),
        "task": recipe.task.type,
        "base_model_lineage": train.get("base_model", {}),
        "train_mlflow_run_id": train.get("mlflow_run_id", ""),
        "eval_mlflow_run_id": evaluation.get("mlflow_run_id", ""),
        "mlflow_model_id": model_id,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "libraries": {lib: installed(lib)[1] for lib in LIBRARIES},
        "metrics": metrics.systems,
        "comparisons": metrics.comparisons,
        "incomplete_baselines": {name: f"failed on {failed['failed']} of {failed['rows']} test rows"
                                 for name, failed in verdict.incomplete_baselines.items()},
    }


def describe(recipe: Recipe, run: RunDir, metrics: MetricsDocument, verdict: VerdictDocument, promotion: str) -> str:
    """The version's description: eval's evidence (the same Markdown as the eval run's) and the promotion."""
    return (f"{evidence_markdown(recipe, metrics.systems, verdict, metrics.test_examples)}\n\n"
            f"**Promotion:** {promotion}\n\nRun directory `{run.path.name}`; LoRA r={recipe.model.adapter.r}.")

