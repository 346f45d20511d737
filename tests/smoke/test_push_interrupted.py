"""A push SIGKILLed midway is rolled back by the next push: no orphan version whose tags say the gate passed,
no alias left on it, no MLflow run left RUNNING. The kill is real (a child process, fault-injected), the MLflow
server is the session's real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import ROOT, registry_recipe

pytestmark = pytest.mark.smoke
MODEL = "push-interrupted"

KILL_BEFORE_THE_VERSION_IS_COMPLETE = """
import os, signal, sys
from mlflow import MlflowClient
real = MlflowClient.set_model_version_tag
def killed(self, name, version, key, value):
    if key == "push_state":  # the version exists, its aliases are set, its last tag is not
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, version, key, value)
MlflowClient.set_model_version_tag = killed
from pipeline.cli import app
sys.argv = ["expert", "push", {recipe!r}, "--run-dir", {run_dir!r}]
app()
"""


def test_the_next_push_rolls_back_an_interrupted_one(tiny_model_dir, tracking_env, tmp_path, clean_secret_env):
    recipe_path, run_dir = registry_recipe(tiny_model_dir, tmp_path, MODEL), tmp_path / "run"
    runner = CliRunner()
    for stage in ("prep", "train", "eval"):
        result = runner.invoke(app, [stage, str(recipe_path), "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
    code = KILL_BEFORE_THE_VERSION_IS_COMPLETE.format(recipe=str(recipe_path), run_dir=str(run_dir))
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(tracking_env)
    orphan = client.get_model_version(MODEL, "1")
    assert orphan.tags["push_state"] == "incomplete" and client.get_registered_model(MODEL).aliases["champion"] == "1"
    orphan_run = orphan.run_id
    assert client.get_run(orphan_run).info.status == "RUNNING"

    result = runner.invoke(app, ["push", str(recipe_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "removed version 1 of push-interrupted" in result.output
    versions = {v.version: v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert set(versions) == {"2"}, "the orphan is gone, one version for one run directory"
    assert versions["2"].tags["push_state"] == "complete"
    assert client.get_registered_model(MODEL).aliases == {"challenger": "2", "champion": "2"}
    assert client.get_run(orphan_run).info.status == "KILLED"
    assert not (run_dir / "push/pending.json").exists()
    assert json.loads((run_dir / "push/registered.json").read_text())["version"] == "2"
