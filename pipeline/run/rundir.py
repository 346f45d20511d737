"""The run directory: where a run's files live, and the manifest that says which are done.

`runs/<recipe name>/<run id>/` holds everything one run made. `manifest.json`
records, per stage, its status, times, input and output content hashes and the
MLflow run id. A stage is skipped when it finished and neither its inputs nor
its outputs changed since, which is what makes `expert run` resumable.
Every write goes through a temp file and a rename, so a reader (or a run killed
mid-write) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.files import (
    LockHeld,
    atomic_write_json,
    atomic_write_text,
    holder_lock,
    tree_hash,
)
from pipeline.recipe.keys import recipe_keys

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe

STAGES = ("prep", "train", "eval", "push")
LOCK_FILE = "run.lock"  # held (flock) by the process working in the run directory
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
OPEN_MLFLOW_RUNS = "open_mlflow_runs"  # manifest key: stage -> the MLflow run it has open, until that run ends


def later_stages(stage: str) -> tuple[str, ...]:
    """The stages that build on `stage`: when it runs, they are stale (the run marks them, the plan says so)."""
    return STAGES[STAGES.index(stage) + 1 :]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class RunDir:
    path: Path

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.path}: not a run directory (no {MANIFEST}); start one with `expert prep`") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{self.manifest_path}: damaged manifest ({err}); start a new run") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def stage_record(self, stage: str) -> dict[str, Any]:
        return self.read_manifest()["stages"].get(stage, {})

    def is_current(self, stage: str, inputs: dict[str, str]) -> bool:
        """True when the stage completed with these inputs and its outputs are untouched."""
        return self.why_stale(stage, inputs) is None

    def why_stale(self, stage: str, inputs: dict[str, str]) -> str | None:
        """Why the stage would run again with these inputs (None: it is up to date)."""
        rec = self.stage_record(stage)
        if rec.get("status") != "complete":
            return f"its status is {rec.get('status', 'not run')}"
        changed = sorted(k for k in rec.get("inputs", {}).keys() | inputs.keys() if rec["inputs"].get(k) != inputs.get(k))
        if changed:
            return f"its inputs changed: {', '.join(changed)}"
        for rel, digest in rec.get("outputs", {}).items():
            p = self.path / rel
            if not p.exists() or tree_hash(p) != digest:
                return f"its output {rel} was changed or removed"
        return None

    def start_stage(self, stage: str, inputs: dict[str, str], recipe: Recipe | None = None,
                    reads: tuple[str, ...] = ()) -> None:
        """Mark the stage running with its inputs and, when given, the recipe it runs with: `recipe.yaml` then
        holds the recipe of the latest stage that ran, and the stage's record the hashes of the keys it `reads`."""
        from pipeline.recipe.schema import dump_recipe

        manifest = self.read_manifest()
        manifest["stages"][stage] = {"status": "running", "started": now_iso(), "inputs": inputs}
        if recipe is not None:
            atomic_write_text(self.path / RECIPE_FILE, dump_recipe(recipe))
            manifest["recipe_hash"] = recipe.recipe_hash()
            manifest["stages"][stage].update(reads=list(reads), recipe_keys=recipe_keys(recipe, reads))
        made_stale = {}
        for later in later_stages(stage):
            if later in manifest["stages"]:
                made_stale[later] = manifest["stages"][later]["status"]
                manifest["stages"][later]["status"] = "stale"
        manifest["stages"][stage]["made_stale"] = made_stale
        self.write_manifest(manifest)

    def finish_stage(self, stage: str, outputs: list[str], **extra: Any) -> None:
        """Mark the stage complete with its outputs' hashes. A later stage it made stale when it started is
        complete again when every output of this stage it read (its inputs named `<stage>/...`) came out the same
        and every stage between them is complete again: a re-run that changed nothing they read does not cost a
        70-minute retraining (their recipe keys and other inputs are still checked by `contracts.why_stale`). A
        stage killed or failed keeps them all stale."""
        manifest = self.read_manifest()
        rec = manifest["stages"][stage]
        rec.update(extra)
        rec["outputs"] = {rel: tree_hash(self.path / rel) for rel in outputs}
        rec["status"] = "complete"
        rec["ended"] = now_iso()
        made_stale = rec.pop("made_stale", {})
        for later in later_stages(stage):  # in order: one that stays stale keeps every stage after it stale
            later_rec = manifest["stages"].get(later)
            if later_rec is None:
                continue
            read = {k: v for k, v in later_rec.get("inputs", {}).items() if k.startswith(f"{stage}/")}
            if not (made_stale.get(later) == "complete" and later_rec.get("status") == "stale"
                    and all(rec["outputs"].get(k) == v for k, v in read.items())):
                break
            later_rec["status"] = "complete"
        self.write_manifest(manifest)

    def fail_stage(self, stage: str, error: str) -> None:
        manifest = self.read_manifest()
        rec = manifest["stages"].setdefault(stage, {})
        rec.update(status="failed", ended=now_iso(), error=error)
        self.write_manifest(manifest)

    @contextmanager
    def attempt(self, stage: str, inputs: dict[str, str], recipe: Recipe | None = None,
                reads: tuple[str, ...] = ()) -> Iterator[None]:
        """Mark the stage running; if the body raises, mark it failed (with the error) and re-raise."""
        self.start_stage(stage, inputs, recipe, reads)
        try:
            yield
        except BaseException as err:
            self.fail_stage(stage, f"{type(err).__name__}: {err}"[:2000])
            raise

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run directory for this process: a second process that asks is refused (exit 2) with who holds
        it. An OS file lock (`files.holder_lock`), so a killed holder never leaves a stale lock behind."""
        import socket

        holder = f"`expert {command}` (pid {os.getpid()} on {socket.gethostname()}, since {now_iso()})"
        with ExitStack() as held:
            try:
                held.enter_context(holder_lock(self.path / LOCK_FILE, holder))
            except LockHeld as other:
                raise UserError(f"{self.path} is in use by {other.holder}; wait for it to finish, or give this "
                                "command another run directory (--run-dir, or `expert run --new`)") from None
            yield

    def open_mlflow_run(self, stage: str) -> str | None:
        """The MLflow run the stage has open (`tracking.stage_run`); one still recorded was left by a killed process."""
        return self.read_manifest().get(OPEN_MLFLOW_RUNS, {}).get(stage)

    def set_open_mlflow_run(self, stage: str, run_id: str | None) -> None:
        manifest = self.read_manifest()
        open_runs = manifest.setdefault(OPEN_MLFLOW_RUNS, {})
        if run_id is None:
            open_runs.pop(stage, None)
        else:
            open_runs[stage] = run_id
        self.write_manifest(manifest)

    def output_hash(self, stage: str, rel: str) -> str:
        """The recorded hash of an upstream output; the upstream stage must be complete."""
        rec = self.stage_record(stage)
        if rec.get("status") != "complete":
            raise UserError(f"{self.path}: stage `{stage}` has not completed; run `expert {stage}` first")
        if rel not in rec["outputs"]:  # made by an older version of the stage
            raise UserError(f"{self.path}: stage `{stage}` did not record {rel}; redo it (`expert run --force {stage}`)")
        return rec["outputs"][rel]


def create_run(runs_root: Path, recipe_name: str, recipe_yaml: str, recipe_hash: str) -> RunDir:
    path = runs_root / recipe_name / new_run_id()
    path.mkdir(parents=True)
    return init_run(path, recipe_name, recipe_yaml, recipe_hash)


def init_run(path: Path, recipe_name: str, recipe_yaml: str, recipe_hash: str) -> RunDir:
    """Make `path` a run directory: the resolved recipe plus an empty manifest."""
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path)
    atomic_write_text(path / RECIPE_FILE, recipe_yaml)
    run.write_manifest(
        {"recipe_name": recipe_name, "run_id": path.name, "created": now_iso(), "recipe_hash": recipe_hash, "stages": {}}
    )
    return run


def latest_run(runs_root: Path, recipe_name: str, complete: str | None = None) -> RunDir | None:
    """The newest run of a recipe; with `complete`, the newest whose stage of that name is complete."""
    root = runs_root / recipe_name
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.iterdir() if (p / MANIFEST).is_file()), reverse=True):
        run = RunDir(path)
        if complete is None or run.stage_record(complete).get("status") == "complete":
            return run
    return None


def open_run(path: Path) -> RunDir:
    run = RunDir(path)
    run.read_manifest()
    return run
