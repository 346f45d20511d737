"""The train stage under failure: a tracking server that dies mid-run, a loss that turns NaN; and QLoRA.

The outage test stops a real, private `mlflow server` (the session's server
stays up for the other tests) while the training runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.inference import models
from pipeline.training import checkpoints
from tests.conftest import shipped_recipe, write_recipe
from tests.support.mlflow_server import free_port, server_command

pytestmark = pytest.mark.smoke


def prepared_run(tmp_path: Path, model_dir: Path, name: str, **train_settings) -> tuple[Path, Path]:
    settings = {"max_steps": 8, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 4}
    recipe = shipped_recipe("ticket-classification", **{"model.base": str(model_dir), "train": {**settings, **train_settings}})
    recipe["name"] = name
    recipe_path = write_recipe(tmp_path, recipe)
    result = CliRunner().invoke(app, ["prep", str(recipe_path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    return recipe_path, tmp_path / "run"


def start_private_mlflow(workdir: Path) -> tuple[subprocess.Popen, str]:
    (workdir / "artifacts").mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        server_command(workdir, port), cwd=workdir, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("private mlflow server did not start")


def test_tracking_server_stopped_mid_run_training_completes(tiny_model_dir, tmp_path, monkeypatch):
    proc, uri = start_private_mlflow(tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; the default retries for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    recipe_path, run_dir = prepared_run(tmp_path, tiny_model_dir, "outage-test")
    seen_before_outage = {}

    def stop_server_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3 and proc.poll() is None:
            client = MlflowClient(uri)
            (mlflow_run,) = client.search_runs(
                [client.get_experiment_by_name("outage-test").experiment_id], "tags.`expert.stage` = 'train'"
            )
            seen_before_outage.update(mlflow_run.data.tags)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    monkeypatch.setattr(checkpoints.SealCheckpoints, "on_step_end", stop_server_at_step_3, raising=False)
    try:
        result = CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir", str(run_dir)])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode is not None, "the server must have been stopped during training"
    assert result.exit_code == 0, result.output
    assert seen_before_outage["expert.logging"] == "incomplete", "until fully logged, the run says it is not"
    metrics = json.loads((run_dir / "train/metrics.json").read_text())
    assert metrics["steps"] == 8
    assert metrics["mlflow_logging"].startswith("incomplete:")
    assert (run_dir / "train/adapter/adapter_model.safetensors").is_file()
    assert "MLflow logging failed" in result.output and "incompletely logged" in result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "complete"


def test_nan_loss_stops_with_the_step_and_a_suggestion(tiny_model_dir, tracking_env, tmp_path):
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    recipe_path, run_dir = prepared_run(tmp_path, broken, "nan-test")

    result = CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "loss became nan by step 1" in result.output and "lower train.learning_rate" in result.output
    assert not (run_dir / "train/adapter").exists()
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["status"] == "failed"
    client = MlflowClient(tracking_env)
    (mlflow_run,) = client.search_runs(
        [client.get_experiment_by_name("nan-test").experiment_id], "tags.`expert.stage` = 'train'"
    )
    assert mlflow_run.info.status == "FAILED"


def test_qlora_trains_adapter_on_4bit_base_that_stays_frozen(tiny_model_dir, tracking_env, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    # 4-bit matmuls on a CPU are slow: a few steps, validation only at the end
    recipe_path, run_dir = prepared_run(tmp_path, tiny_model_dir, "qlora-test", max_steps=3, eval_steps=50)
    recipe = json.loads(json.dumps(__import__("yaml").safe_load(recipe_path.read_text())))
    recipe["model"]["quantization"] = "4bit"
    write_recipe(tmp_path, recipe)
    loaded = {}
    load_base_model = models.load_base_model

    def spy(section, source, *args, **kwargs):
        model = load_base_model(section, source, *args, **kwargs)
        loaded["model"] = model
        loaded["before"] = {
            name: module.weight.data.clone() for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)
        }
        return model

    monkeypatch.setattr(models, "load_base_model", spy)
    result = CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output

    before = loaded["before"]
    assert len(before) == 14, "every linear layer of the 2-layer model is 4-bit (7 per layer)"
    after = {
        name.replace(".base_layer", ""): module
        for name, module in loaded["model"].named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    assert set(after) == set(before)
    for name, module in after.items():
        assert module.weight.dtype == torch.uint8 and module.weight.quant_state.quant_type == "nf4"
        assert module.weight.quant_state.nested, "double quantisation"
        assert torch.equal(module.weight.data, before[name]), f"base weight {name} changed"
    adapter = load_file(run_dir / "train/adapter/adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, tracking_env, tmp_path):
    recipe_path, run_dir = prepared_run(tmp_path, tiny_model_dir, "plan-test", max_steps=None, epochs=2, batch_size=8)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    result = CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir", str(run_dir), "--dry-run"])
    assert result.exit_code == 0, result.output
    train_rows = len((run_dir / "prep/train.jsonl").read_text().splitlines())
    steps_per_epoch = -(-train_rows // 8)
    out = " ".join(result.output.split())
    assert f"{2 * steps_per_epoch} ({steps_per_epoch} × 2.0)" in out
    assert f"{train_rows:,} / " in out and "real tokens/s over 4 steps" in out and "process RSS" in out
    assert "estimated time" in out
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no train/, no checkpoints
    client = MlflowClient()
    experiment = client.get_experiment_by_name("plan-test")
    runs = client.search_runs([experiment.experiment_id], "tags.`expert.stage` = 'train'") if experiment else []
    assert runs == []
