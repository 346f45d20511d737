"""Training checkpoints: sealed once complete, verified before a resume, and the resume plan.

A checkpoint's seal (`SEAL`) records every file's checksum and is written last, atomically: a checkpoint
without it, or whose files do not match it, is never resumed from. `RESUME_STATE` records which inputs and
MLflow run the checkpoints belong to, so `plan_resume` starts over when the data or settings changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.files import atomic_write_json, file_hash

SEAL = "expert-complete.json"  # written last, atomically: a checkpoint without it is incomplete
RESUME_STATE = "resume.json"  # in train/checkpoints: which inputs and MLflow run the checkpoints belong to


def seal_checkpoint(checkpoint: Path) -> None:
    """Record every file's checksum in the seal, written last and atomically: the commit point."""
    files = {p.relative_to(checkpoint).as_posix(): file_hash(p) for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    files.pop(SEAL, None)
    atomic_write_json(checkpoint / SEAL, {"files": files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and intact."""
    seal = checkpoint / SEAL
    if not seal.is_file():
        return "is incomplete (the run stopped while writing it)"
    try:
        files = json.loads(seal.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError) as err:
        return f"has an unreadable {SEAL} ({err})"
    for rel, digest in files.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"is damaged: {rel} is missing"
        if file_hash(path) != digest:
            return f"is damaged: {rel} does not match its recorded checksum"
    return None


def best_step(trainer) -> int | None:
    best = trainer.state.best_model_checkpoint
    return _step_of(Path(best)) if best else None


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def checkpoint_dirs(directory: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
    return sorted((p for p in found if p.name.rsplit("-", 1)[1].isdigit()), key=_step_of, reverse=True)


def latest_complete_checkpoint(directory: Path) -> Path | None:
    """The newest intact checkpoint; newer incomplete or damaged ones are removed with a warning."""
    for checkpoint in checkpoint_dirs(directory):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        console.print(
            f"[yellow]warning[/]: {checkpoint} {problem}; removing it and falling back to the previous checkpoint"
        )
        shutil.rmtree(checkpoint)
    return None


def plan_resume(directory: Path, inputs: dict[str, str], resume: bool | None) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, MLflow run to continue), clearing checkpoints that cannot be used."""
    state_file = directory / RESUME_STATE
    state: dict[str, Any] = {}
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except ValueError:
            state = {}
    if not checkpoint_dirs(directory):
        shutil.rmtree(directory, ignore_errors=True)
        return None, None
    if state.get("inputs") != inputs:
        console.print(f"[yellow]train[/]: {directory} holds checkpoints of other data or settings; starting over")
        shutil.rmtree(directory)
        return None, None
    if resume is None:
        newest = checkpoint_dirs(directory)[0].name
        raise UserError(
            f"{directory} holds checkpoints of an interrupted training (newest: {newest}); "
            "pass --resume to continue from the latest complete one, or --restart to start over"
        )
    if not resume:
        console.print(f"[yellow]train[/]: starting over; removing the checkpoints in {directory}")
        shutil.rmtree(directory)
        return None, None
    checkpoint = latest_complete_checkpoint(directory)
    if checkpoint is None:
        console.print(f"[yellow]train[/]: no complete checkpoint in {directory}; starting over")
        shutil.rmtree(directory)
        return None, None
    return checkpoint, state.get("mlflow_run_id")


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once every rank finished writing it (each its own `rng_state_<rank>.pth`), on rank 0:
    a seal made while another rank still writes records a partial file, and the checkpoint is judged damaged and
    deleted on resume."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                seal_checkpoint(checkpoint)
