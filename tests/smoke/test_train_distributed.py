"""Two CPU processes (torchrun, gloo backend) train the tiny model: one MLflow run, loss close to one process.

The same global batch: 2 processes x 4 examples vs 1 process x 8 examples.
"""

from __future__ import annotations

import json
import os
import shutil
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
