"""Two CPU processes (torchrun, gloo backend) train the tiny model: one MLflow run, loss close to one process.

The same global batch: 2 processes x 4 examples vs 1 process x 8 examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import ROOT, shipped_recipe, write_recipe
from tests.support.mlflow_server import free_port

pytestmark = pytest.mark.smoke
SETTINGS = {"max_steps": 8, "learning_rate": 5e-3, "logging_steps": 1, "eval_steps": 4}


def recipe_file(directory: Path, tiny_model_dir: Path, name: str, batch_size: int) -> Path:
    recipe = shipped_recipe(
        "ticket-classification", **{"model.base": str(tiny_model_dir), "train": {**SETTINGS, "batch_size": batch_size}}
    )
    recipe["name"] = name
    directory.mkdir()
    return write_recipe(directory, recipe)


def test_two_gloo_processes_train_like_one(tiny_model_dir, tracking_env, tmp_path):
    single = recipe_file(tmp_path / "single", tiny_model_dir, "ddp-single", batch_size=8)
    double = recipe_file(tmp_path / "double", tiny_model_dir, "ddp-two", batch_size=4)
    runner = CliRunner()
    for recipe in (single, double):
        result = runner.invoke(app, ["prep", str(recipe), "--run-dir", str(recipe.parent / "run")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", str(single), "--run-dir", str(single.parent / "run")])
    assert result.exit_code == 0, result.output

    port = str(free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    proc = subprocess.run(
        [*torchrun, "-m", "pipeline.cli", "train", str(double), "--run-dir", str(double.parent / "run")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("train: 8 steps") == 1, "only rank 0 reports and writes"

    one = json.loads((single.parent / "run/train/metrics.json").read_text())
    two = json.loads((double.parent / "run/train/metrics.json").read_text())
    assert two["steps"] == one["steps"] == 8
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.02)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=0.02)

    client = MlflowClient(tracking_env)
    runs = client.search_runs([client.get_experiment_by_name("ddp-two").experiment_id], "tags.`expert.stage` = 'train'")
    assert len(runs) == 1, "one MLflow run per training, not one per process"
    assert runs[0].info.status == "FINISHED"
    assert len({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}) == 8


KILL_RANK0_AFTER_STEP = """
import os, signal, sys
from pipeline.training import checkpoints
def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == {step} and state.is_world_process_zero:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.SealCheckpoints.on_step_end = on_step_end
from pipeline.cli import app
sys.argv = ["expert", "train", {recipe!r}, "--run-dir", {run_dir!r}]
app()
"""


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=timeout)


def prepared_run(tmp_path: Path, name: str, **overrides) -> tuple[Path, Path]:
    """The shipped ticket recipe named `name` with `overrides`, and a run directory with prep done."""
    recipe = shipped_recipe("ticket-classification", **overrides)
    recipe["name"] = name
    (tmp_path / name).mkdir()
    recipe_path = write_recipe(tmp_path / name, recipe)
    run_dir = tmp_path / name / "run"
    result = CliRunner().invoke(app, ["prep", str(recipe_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return recipe_path, run_dir


def test_two_processes_resume_from_the_same_checkpoint(tiny_model_dir, tracking_env, tmp_path):
    """Rank 0 is SIGKILLed after step 7 (checkpoint 6 sealed); `--resume` under two processes must start both
    ranks at step 6: a plan made on rank 0 alone would start rank 1 from step 0 and the ranks would hang or fail
    on mismatched collectives."""
    recipe_path, run_dir = prepared_run(tmp_path, "ddp-resume", **{
        "model.base": str(tiny_model_dir),
        "train": {**SETTINGS, "max_steps": 10, "eval_steps": 2, "batch_size": 4, "keep_checkpoints": 2}})
    script = tmp_path / "killed_train.py"
    script.write_text(KILL_RANK0_AFTER_STEP.format(step=7, recipe=str(recipe_path), run_dir=str(run_dir)))
    killed = torchrun(str(script))
    assert killed.returncode != 0 and "checkpoint-6" in {p.name for p in (run_dir / "train/checkpoints").iterdir()}

    resumed = torchrun("-m", "pipeline.cli", "train", str(recipe_path), "--run-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from checkpoint-6" in resumed.stderr
    metrics = json.loads((run_dir / "train/metrics.json").read_text())
    record = json.loads((run_dir / "train/record.json").read_text())
    assert (metrics["steps"], metrics["resumed_from_step"], record["processes"]) == (10, 6, 2)
    assert record["launch"] == "ddp"


def test_qlora_under_two_gloo_processes(tiny_model_dir, tracking_env, tmp_path):
    """A 4-bit base on each rank (bitsandbytes on the CPU here), LoRA gradients averaged by DDP, one adapter."""
    from safetensors.torch import load_file

    recipe_path, run_dir = prepared_run(tmp_path, "ddp-qlora", **{
        "model.base": str(tiny_model_dir), "model.quantization": "4bit",
        "train": {**SETTINGS, "max_steps": 4, "eval_steps": 4, "batch_size": 4}})
    proc = torchrun("-m", "pipeline.cli", "train", str(recipe_path), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((run_dir / "train/record.json").read_text())
    assert (json.loads((run_dir / "train/metrics.json").read_text())["steps"], record["processes"], record["launch"]) == (
        4, 2, "ddp")
    adapter = load_file(run_dir / "train/adapter/adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items()), "the adapter moved"
    assert not (run_dir / "train/adapter/training_args.bin").exists(), "no pickle in the adapter"
