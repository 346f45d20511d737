"""What a SIGKILLed eval or push leaves in MLflow is cleaned up by the next run of the stage: the eval's MLflow run
is marked KILLED instead of RUNNING for good, and the logged model an interrupted push made is deleted with its
version. And `--include-base` is one of push's inputs: a run pushed without it is pushed again with it.

The kills are real (a child process, fault-injected); the MLflow server is the session's real one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import ROOT, registry_recipe

pytestmark = pytest.mark.smoke
MODEL = "killed-stages"

KILLED_WHEN = """
import os, signal, sys
{patch}
from pipeline.cli import app
sys.argv = {argv!r}
app()
"""
# eval: its MLflow run is open, the expert about to be evaluated
IN_EVAL = """
from pipeline.inference import runtime
runtime.prepare = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
"""
# push: the version and its logged model exist, the version's last tag is not set
IN_PUSH = """
from mlflow import MlflowClient
real = MlflowClient.set_model_version_tag
def killed(self, name, version, key, value):
    if key == "push_state":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, version, key, value)
MlflowClient.set_model_version_tag = killed
"""


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result


def logged(version) -> str:
    """The logged model a version is registered from (push registers from `models:/<id>`)."""
    return version.source.removeprefix("models:/")


def killed(patch: str, *args: str) -> None:
    code = KILLED_WHEN.format(patch=patch, argv=["expert", *args])
    child = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=dict(os.environ), capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-3000:]


def test_killed_eval_and_push_are_cleaned_up_and_include_base_pushes_again(tiny_model_dir, tracking_env, tmp_path,
                                                                           clean_secret_env):
    recipe_path, run_dir = str(registry_recipe(tiny_model_dir, tmp_path, MODEL)), tmp_path / "run"
    client = MlflowClient(tracking_env)
    for stage in ("prep", "train"):
        cli(stage, recipe_path, "--run-dir", str(run_dir))

    killed(IN_EVAL, "eval", recipe_path, "--run-dir", str(run_dir))
    left = json.loads((run_dir / "manifest.json").read_text())["open_mlflow_runs"]["eval"]
    assert client.get_run(left).info.status == "RUNNING"
    again = cli("eval", recipe_path, "--run-dir", str(run_dir))
    assert f"MLflow run {left}, left running by an interrupted eval, marked KILLED" in again.output
    assert client.get_run(left).info.status == "KILLED"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["open_mlflow_runs"] == {}, "the finished eval's run is closed and no longer recorded"
    assert client.get_run(manifest["stages"]["eval"]["mlflow_run_id"]).info.status == "FINISHED"

    cli("push", recipe_path, "--run-dir", str(run_dir))
    first = client.get_model_version(MODEL, "1")
    assert not client.list_logged_model_artifacts(logged(first), "artifacts/bundle/base")

    # --include-base asks for another bundle: not "up to date" (the plan says so too); killed before its version is
    # complete
    plan = cli("run", recipe_path, "--run-dir", str(run_dir), "--include-base", "--dry-run").output
    assert re.search(r"\brun\s+push\b", plan) and not re.search(r"\bskip\s+push\b", plan), plan
    killed(IN_PUSH, "push", recipe_path, "--run-dir", str(run_dir), "--include-base")
    orphan = client.get_model_version(MODEL, "2")
    assert orphan.tags["push_state"] == "incomplete" and logged(orphan) != logged(first)
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    assert logged(orphan) in {m.model_id for m in client.search_logged_models([experiment])}

    repaired = cli("push", recipe_path, "--run-dir", str(run_dir), "--include-base")
    assert f"removed version 2 of {MODEL}" in repaired.output
    assert f"removed logged model {logged(orphan)}, made by the interrupted push" in repaired.output
    assert logged(orphan) not in {m.model_id for m in client.search_logged_models([experiment])}
    assert client.get_run(orphan.run_id).info.status == "KILLED"
    versions = {v.version: v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert set(versions) == {"1", "3"} and versions["3"].tags["push_state"] == "complete"
    assert client.list_logged_model_artifacts(logged(versions["3"]), "artifacts/bundle/base"), "the base is in it"

    # the version with the base loads, its base covered by the digest like every other file
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "I was charged twice this month"}\n')
    cli("predict", f"models:/{MODEL}/3", "--input", str(inputs))
    assert "up to date" in cli("push", recipe_path, "--run-dir", str(run_dir), "--include-base").output
