"""Stage contracts on a tiny model: later stages load what train recorded, and refuse a recipe that changed
under the stages they build on.

One run directory is prepared, trained and evaluated once (module fixture); each test then asks something of
it through the CLI, in-process.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.inference import models
from pipeline.registry import versions
from tests.conftest import shipped_recipe, write_recipe

pytestmark = pytest.mark.smoke


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, mlflow_uri, tmp_path_factory):
    """prep -> train -> eval on a copy of the tiny base, trained where the CPU is said to lack bf16 (so `auto`
    resolves to fp32), with the run's files as they were after eval."""
    tmp = tmp_path_factory.mktemp("contracts")
    base = tmp / "base"
    shutil.copytree(tiny_model_dir, base)
    recipe = shipped_recipe("ticket-classification", **{
        "name": "contracts", "model.base": str(base), "train": {"max_steps": 2, "batch_size": 8},
        "eval.baselines": [], "registry.model_name": "contracts-expert",
    })
    path = write_recipe(tmp, recipe)
    run_dir = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        mp.setenv("EXPERT_CACHE", str(tmp / "cache"))
        mp.setattr(models, "cpu_has_native_bf16", lambda: False)
        for stage in ("prep", "train"):
            result = invoke(stage, path, "--run-dir", run_dir)
            assert result.exit_code == 0, result.output
    return path, run_dir, base, tmp


@pytest.fixture
def env(trained, mlflow_uri, monkeypatch):
    path, run_dir, base, tmp = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("EXPERT_CACHE", str(tmp / "cache"))
    return trained


def test_train_records_what_it_decided(env):
    _, run_dir, base, _ = env
    record = json.loads((run_dir / "train/record.json").read_text())
    assert record["precision"] == "fp32", "auto on a CPU without bf16"
    assert record["base"]["kind"] == "local" and record["base"]["location"] == str(base.resolve())
    assert record["base"]["content_hash"] == models.weights_hash(base)
    assert {"attention", "padding_free", "padding_free_reason", "adapter_hash", "launch", "processes"} <= set(record)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "data.max_tokens" in manifest["stages"]["train"]["recipe_keys"], "train reads data.max_tokens"


def test_eval_and_the_registered_model_load_the_recorded_precision(env, monkeypatch, tmp_path):
    path, run_dir, _, _ = env
    # this machine now says it has bf16: re-deriving `train.precision: auto` would load the base in bf16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_precision("auto") == "bf16"
    result = invoke("eval", path, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "eval/record.json").read_text())["precision"] == "fp32"
    result = invoke("push", path, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    registered = json.loads((run_dir / "push/registered.json").read_text())
    _, expert = versions.load_version(f"models:/{registered['model_name']}/{registered['version']}")
    assert expert.precision == "fp32"
    assert next(expert.model.parameters()).dtype == torch.float32


def test_a_stage_refuses_a_recipe_changed_under_its_upstream(env):
    path, run_dir, _, _ = env
    before = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "manifest.json")}
    result = invoke("eval", path, "--run-dir", run_dir, "--set", "data.split.seed=99", "--set", "train.max_steps=3")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "prep: data.split.seed" in message and "train: train.max_steps" in message, message
    assert {name: (run_dir / name).read_bytes() for name in before} == before, "a refused command writes nothing"


def test_push_refuses_a_base_changed_after_eval(env):
    """The version's recipe must name the base its adapter was trained on: editing model.base after eval and
    pushing is refused, naming the key."""
    path, run_dir, _, tmp = env
    other = tmp / "other-base"
    shutil.copytree(env[2], other, dirs_exist_ok=True)
    result = invoke("push", path, "--run-dir", run_dir, "--set", f"model.base={other}")
    assert result.exit_code == 2, result.output
    assert "model.base" in result.output


def test_run_dry_run_says_which_stages_would_run_and_why(env):
    path, run_dir, _, _ = env
    before = (run_dir / "manifest.json").read_bytes()
    result = invoke("run", path, "--run-dir", run_dir, "--dry-run", "--set", "train.learning_rate=0.001")
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.strip().startswith(("run", "skip"))}
    assert lines["prep"].split()[0] == "skip", result.output
    assert lines["train"].split()[0] == "run" and "train.learning_rate" in lines["train"], result.output
    assert lines["eval"].split()[0] == "run" and "train runs before it" in lines["eval"], result.output
    assert (run_dir / "manifest.json").read_bytes() == before


def test_changed_base_weights_are_refused_not_swapped(env, tmp_path):
    """The record's content hash pins the base: weights changed after training are an error at eval."""
    path, run_dir, base, _ = env
    weights = base / "model.safetensors"
    original = weights.read_bytes()
    try:
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        first = next(iter(tensors))
        tensors[first] = tensors[first] + 1
        save_file(tensors, weights, metadata={"format": "pt"})
        result = invoke("eval", path, "--run-dir", run_dir, "--set", "eval.seed=7")
        assert result.exit_code == 2, result.output
        assert "not the ones the adapter was trained on" in " ".join(result.output.split())
    finally:
        weights.write_bytes(original)


def test_train_loads_the_base_prep_recorded_not_model_base_resolved_again(tiny_model_dir, mlflow_uri, tmp_path,
                                                                          monkeypatch):
    """A hub base: prep resolves it once and records its commit; a push to the hub before train changes what
    `model.base` resolves to, and train still loads prep's commit (and refuses when those weights changed). No
    hub here: `hub_snapshot` (huggingface_hub's snapshot_download) serves local folders named by commit, as the
    hub cache names them."""
    snapshots = tmp_path / "snapshots"
    shutil.copytree(tiny_model_dir, snapshots / "c0ffee01")
    newest = ["c0ffee01"]

    def hub_snapshot(repo: str, revision: str | None):
        assert repo == "org/tiny-model"
        return snapshots / (revision or newest[0])

    monkeypatch.setattr(models, "hub_snapshot", hub_snapshot)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    path = write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "name": "hub-base", "model.base": "org/tiny-model", "train": {"max_steps": 1, "batch_size": 8},
        "eval.baselines": [], "registry.model_name": "hub-base-expert"}))
    run_dir = tmp_path / "run"
    assert invoke("prep", path, "--run-dir", run_dir).exit_code == 0
    prepared = json.loads((run_dir / "prep/record.json").read_text())["base"]
    assert (prepared["kind"], prepared["revision"]) == ("hub", "c0ffee01")

    # a push to the hub: the newest commit now has other weights
    pushed = snapshots / "beef0002"
    shutil.copytree(tiny_model_dir, pushed)
    (pushed / "config.json").write_text((pushed / "config.json").read_text().replace("}", ', "pushed": 1}', 1))
    newest[0] = "beef0002"
    result = invoke("train", path, "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "train/record.json").read_text())["base"] == prepared, "train used prep's base"

    # the recorded commit's weights changed under the run: training (here its --dry-run plan, which loads the
    # base as training does) refuses rather than load other weights
    recorded = snapshots / "c0ffee01" / "config.json"
    recorded.write_text(recorded.read_text().replace("}", ', "changed": 1}', 1))
    refused = invoke("train", path, "--run-dir", run_dir, "--dry-run")
    assert refused.exit_code == 2 and "not the ones prep measured the data with" in " ".join(refused.output.split())
