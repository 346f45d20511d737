"""Crash and resume: kill -9 between checkpoints and during a checkpoint write, a damaged checkpoint.

Every interrupted training resumes to the same final step count and adapter
weights (allclose) as an uninterrupted run with the same seed, and stays one
MLflow run. The kills are real SIGKILLs of a training subprocess, placed at a
chosen step by a fault-injection patch in the child.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.recipe.schema import load_recipe
from pipeline.run.rundir import open_run
from pipeline.stages import train
from pipeline.training import checkpoints
from tests.conftest import ROOT, shipped_recipe, write_recipe

pytestmark = pytest.mark.smoke
STEPS = 10
SETTINGS = {
    "max_steps": STEPS,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "eval_steps": 2,
    "keep_checkpoints": 2,
}

KILL_BETWEEN_CHECKPOINTS = """
import os, signal
from pipeline.training import checkpoints
def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.SealCheckpoints.on_step_end = on_step_end
"""

KILL_DURING_CHECKPOINT_WRITE = """
import os, signal
from transformers import Trainer
save_rng_state = Trainer._save_rng_state
def killed_mid_write(self, output_dir):
    if self.state.global_step == {step}:  # adapter and optimizer are on disk, RNG and trainer state are not
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)
Trainer._save_rng_state = killed_mid_write
"""

CLI = """
import sys
from pipeline.cli import app
from pipeline.recipe.schema import load_recipe
from pipeline.run.rundir import open_run
sys.argv = ["expert", "train", {recipe!r}, "--run-dir", {run_dir!r}]
app()
"""


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    """A recipe and a run directory with prep done, copied for each scenario."""
    base = tmp_path_factory.mktemp("resume")
    recipe = shipped_recipe("ticket-classification", **{"model.base": str(tiny_model_dir), "train": SETTINGS})
    recipe["name"] = "resume-test"
    recipe_path = write_recipe(base, recipe)
    result = CliRunner().invoke(app, ["prep", str(recipe_path), "--run-dir", str(base / "prepared")])
    assert result.exit_code == 0, result.output
    return recipe_path, base / "prepared"


def fresh_run(prepared, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(prepared[1], run_dir)
    return run_dir


def adapter_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train/adapter/adapter_model.safetensors")


def train_cli(recipe_path: Path, run_dir: Path, *extra: str):
    return CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir", str(run_dir), *extra])


def killed_training(recipe_path: Path, run_dir: Path, fault: str) -> None:
    code = fault + CLI.format(recipe=str(recipe_path), run_dir=str(run_dir))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, f"the fault injection must SIGKILL the child:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory, mlflow_uri):
    """An uninterrupted run with the same seed."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(prepared[1], run_dir)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    try:
        result = train_cli(prepared[0], run_dir)
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    metrics = json.loads((run_dir / "train/metrics.json").read_text())
    expected = json.loads((reference / "train/metrics.json").read_text())
    assert metrics["steps"] == expected["steps"] == STEPS
    assert metrics["best_checkpoint_step"] == expected["best_checkpoint_step"]
    got, want = adapter_of(run_dir), adapter_of(reference)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), f"{name} differs from the uninterrupted run"
    assert not (run_dir / "train/checkpoints").exists(), "checkpoints are removed once the adapter is final"


def train_runs_of(client: MlflowClient, run_dir: Path):
    experiment = client.get_experiment_by_name("resume-test")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`expert.run_dir_id` = '{run_dir.name}'"
    )


def test_kill_between_checkpoints_then_resume(prepared, reference, tracking_env, tmp_path):
    run_dir = fresh_run(prepared, tmp_path, "killed-between")
    killed_training(prepared[0], run_dir, KILL_BETWEEN_CHECKPOINTS.format(step=7))
    assert checkpoints._step_of(checkpoints.latest_complete_checkpoint(run_dir / "train/checkpoints")) == 6

    refused = train_cli(prepared[0], run_dir)
    assert refused.exit_code == 2 and "--resume" in refused.output, "plain `train` must not guess"

    result = train_cli(prepared[0], run_dir, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from checkpoint-6" in result.output
    assert_same_as_reference(run_dir, reference)
    assert json.loads((run_dir / "train/metrics.json").read_text())["resumed_from_step"] == 6

    client = MlflowClient(tracking_env)
    (mlflow_run,) = train_runs_of(client, run_dir)  # the resumed training continues its MLflow run
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["expert.logging"] == "complete"
    steps = {m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")}
    assert steps == set(range(1, STEPS + 1))


def test_kill_during_checkpoint_write_falls_back(prepared, reference, tracking_env, tmp_path, capsys):
    run_dir = fresh_run(prepared, tmp_path, "killed-writing")
    killed_training(prepared[0], run_dir, KILL_DURING_CHECKPOINT_WRITE.format(step=6))
    half_written = run_dir / "train/checkpoints/checkpoint-6"
    assert (half_written / "adapter_model.safetensors").is_file(), "the kill must land mid-write"
    assert checkpoints.checkpoint_problem(half_written) is not None, "a half-written checkpoint must not look complete"

    # `expert run` calls the stage with its default, resume=True: it continues on its own after a crash
    train.run(load_recipe(prepared[0]), open_run(run_dir))
    output = capsys.readouterr().err
    assert "checkpoint-6 is incomplete" in output and "resuming from checkpoint-4" in output
    assert_same_as_reference(run_dir, reference)


def test_damaged_latest_checkpoint_falls_back_with_warning(prepared, reference, tracking_env, tmp_path, monkeypatch):
    run_dir = fresh_run(prepared, tmp_path, "damaged")

    def crash(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C
    monkeypatch.setattr(checkpoints.SealCheckpoints, "on_step_end", crash, raising=False)
    interrupted = train_cli(prepared[0], run_dir)
    assert interrupted.exit_code != 0
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_env)

    latest = run_dir / "train/checkpoints/checkpoint-4/adapter_model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated, e.g. a full disk
    result = train_cli(prepared[0], run_dir, "--resume")
    assert result.exit_code == 0, result.output
    assert "checkpoint-4 is damaged" in result.output and "falling back" in result.output
    assert "resuming from checkpoint-2" in result.output
    assert_same_as_reference(run_dir, reference)
