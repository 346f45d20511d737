"""No promotion without evidence, no key in any stored answer: eval and push against frontiers that fail.

The frontier is a real local endpoint that refuses every connection (a closed port) or a real local
OpenAI-compatible server that echoes the key in its error bodies; MLflow is the session's real server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import shipped_recipe, write_recipe
from tests.support.mlflow_server import free_port
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.smoke
KEY_ENV, KEY = "EVIDENCE_FRONTIER_KEY", "sk-evidence-secret-1234567890"


def recipe_with_frontier(tiny_model_dir, base_url: str, name: str, **frontier) -> dict:
    recipe = shipped_recipe("ticket-classification", **{
        "model.base": str(tiny_model_dir),
        "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3},
        "eval.baselines": [{"name": "frontier", "kind": "openai", "model": "m", "base_url": base_url,
                            "api_key_env": KEY_ENV, "max_retries": 0, "timeout_s": 5, **frontier}],
        "eval.gate": {"metric": "accuracy", "max_drop_vs_best_baseline": 0.02},
        "registry.model_name": name,
    })
    recipe["name"] = name
    return recipe


@pytest.fixture
def trained(tiny_model_dir, tracking_env, tmp_path, monkeypatch, clean_secret_env):
    """A run directory with prep and train done, for a recipe whose frontier is set per test."""
    monkeypatch.setenv(KEY_ENV, KEY)
    recipe_path = write_recipe(tmp_path, recipe_with_frontier(tiny_model_dir, "http://127.0.0.1:9/v1", "evidence"))
    runner = CliRunner()
    assert runner.invoke(app, ["prep", str(recipe_path), "--run-dir", str(tmp_path / "run")]).exit_code == 0
    assert runner.invoke(app, ["train", str(recipe_path), "--run-dir", str(tmp_path / "run")]).exit_code == 0
    return tmp_path / "run"


def eval_with(tiny_model_dir, run_dir, base_url: str, name: str, **frontier):
    recipe_path = write_recipe(run_dir.parent, recipe_with_frontier(tiny_model_dir, base_url, name, **frontier))
    return recipe_path, CliRunner().invoke(app, ["eval", str(recipe_path), "--run-dir", str(run_dir)])


def test_a_frontier_that_never_answers_lets_nothing_replace_it(tiny_model_dir, trained, tracking_env):
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: every call is refused
    recipe_path, result = eval_with(tiny_model_dir, trained, down, "evidence")
    assert result.exit_code == 0, result.output
    verdict = json.loads((trained / "eval/verdict.json").read_text())
    n_test = len((trained / "prep/test.jsonl").read_text().splitlines())
    assert not verdict["passed"] and verdict["decision"] == "incomplete"
    assert verdict["incomplete_baselines"] == {"frontier": {"failed": n_test, "rows": n_test}}
    assert "comparison incomplete" in result.output
    assert "the comparison is incomplete" in (trained / "eval/report.md").read_text()

    pushed = CliRunner().invoke(app, ["push", str(recipe_path), "--run-dir", str(trained)])
    assert pushed.exit_code == 0, pushed.output
    client = MlflowClient(tracking_env)
    assert client.get_registered_model("evidence").aliases == {"challenger": "1"}, "@champion does not move"
    tags = client.get_model_version("evidence", "1").tags
    assert tags["decision"] == "incomplete"
    assert tags["incomplete_baselines"] == f"frontier: failed on {n_test} of {n_test} test rows"


def test_a_required_frontier_that_fails_stops_eval_with_exit_2(tiny_model_dir, trained):
    down = f"http://127.0.0.1:{free_port()}/v1"
    _, result = eval_with(tiny_model_dir, trained, down, "evidence", required=True)
    assert result.exit_code == 2, result.output
    assert "eval.baselines `frontier` is required and failed on" in result.output
    assert (trained / "eval/verdict.json").is_file(), "what was measured is kept for inspection"
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "failed", "the stage is not recorded as finished"


def test_a_key_echoed_by_the_endpoint_is_in_no_eval_output(tiny_model_dir, trained, tracking_env):
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.faults += [("echo_auth", 401)] * 500
        _, result = eval_with(tiny_model_dir, trained, srv.base_url, "evidence")
    assert result.exit_code == 0, result.output
    predictions = (trained / "eval/predictions/frontier.jsonl").read_text()
    assert "Invalid credentials" in predictions and "[REDACTED]" in predictions
    for path in sorted((trained / "eval").rglob("*")):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md"):
            assert KEY not in path.read_text(), f"the key reached {path}"
    assert KEY not in result.output
    client = MlflowClient(tracking_env)
    run_id = json.loads((trained / "manifest.json").read_text())["stages"]["eval"]["mlflow_run_id"]
    local = client.download_artifacts(run_id, "eval", str(trained.parent / "artifacts"))
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        assert KEY.encode() not in path.read_bytes(), f"the key reached MLflow artifact {path}"
    shutil.rmtree(trained.parent / "artifacts")
