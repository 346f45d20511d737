"""Push: aliases move only on evidence, --force records its reason, and the version loads and predicts.

Against a real `mlflow server`; runs the tiny-model pipeline several times.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import shipped_recipe, write_recipe

pytestmark = pytest.mark.smoke
MODEL = "smoke-push"


def push_recipe(tiny_model_dir, **gate) -> dict:
    return shipped_recipe(
        "ticket-classification",
        **{
            "name": "smoke-push",
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "seed": 5},
            "eval.baselines": [{"name": "base-zero-shot", "kind": "base_model"}],
            "eval.gate": {"metric": "accuracy", **gate},
            "registry.model_name": MODEL,
        },
    )


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result


def latest_run_dir(tmp_path):
    return max((tmp_path / "runs" / "smoke-push").iterdir())


def test_promotion_force_dry_run_and_pyfunc(tiny_model_dir, tracking_env, tmp_path, clean_secret_env):
    client = MlflowClient(tracking_env)
    lenient = write_recipe(tmp_path, push_recipe(tiny_model_dir, max_drop_vs_best_baseline=1.0))

    invoke("run", str(lenient))
    first = latest_run_dir(tmp_path)
    assert client.get_registered_model(MODEL).aliases == {"challenger": "1", "champion": "1"}

    # the same recipe again, in a new run: identical evidence on the same test set, so not worse -> promoted
    invoke("run", "--new", str(lenient))
    second = latest_run_dir(tmp_path)
    assert second != first
    v1, v2 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
    assert v1.tags["data_fingerprint"] == v2.tags["data_fingerprint"]
    assert v1.tags["gate_metric"] == "accuracy" and v1.tags["gate_value"] == v2.tags["gate_value"]
    assert client.get_registered_model(MODEL).aliases == {"challenger": "2", "champion": "2"}

    # a failing gate: challenger moves, champion stays
    strict = push_recipe(tiny_model_dir, min_value=1.0)
    strict_path = tmp_path / "strict.yaml"
    strict_path.write_text(json.dumps(strict))
    invoke("run", str(strict_path))
    failing = latest_run_dir(tmp_path)
    assert json.loads((failing / "eval/verdict.json").read_text())["passed"] is False
    assert client.get_registered_model(MODEL).aliases == {"challenger": "3", "champion": "2"}
    assert client.get_model_version(MODEL, "3").tags["promotion"] == "the eval gate failed"

    # dry run: says what would happen, registers nothing
    dry = invoke("push", str(strict_path), "--run-dir", str(failing), "--dry-run")
    assert "would stay" in dry.output and "the eval gate failed" in dry.output
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 3

    # --force without a reason is refused; with one it promotes and records it
    refused = CliRunner().invoke(app, ["push", str(strict_path), "--run-dir", str(failing), "--force"])
    assert refused.exit_code == 2 and "--reason" in refused.output
    invoke("push", str(strict_path), "--run-dir", str(failing), "--force", "--reason", "approved by on-call, ticket 42")
    assert client.get_registered_model(MODEL).aliases == {"challenger": "4", "champion": "4"}
    forced = client.get_model_version(MODEL, "4")
    assert forced.tags["forced_reason"] == "approved by on-call, ticket 42"
    assert len(forced.tags) <= 16, "a short set of tags; the rest is one JSON artifact"
    provenance = json.loads(open(client.download_artifacts(forced.run_id, "version_provenance.json", str(tmp_path))).read())
    assert provenance["libraries"]["transformers"] and provenance["git_commit"]
    assert provenance["metrics"]["expert"]["accuracy"] == pytest.approx(float(forced.tags["gate_value"]), abs=1e-4)
    assert forced.source == f"models:/{provenance['mlflow_model_id']}", "registered from the adapter's logged model"
    assert forced.description.startswith("**Decision: ") and "**Promotion:** forced" in forced.description

    # the champion loads as a pyfunc and answers exactly as the eval stage did
    eval_rows = [json.loads(line) for line in (failing / "eval/predictions/expert.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (failing / "prep/test.jsonl").read_text().splitlines()]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    answers = model.predict([r["text"] for r in test_rows])
    assert [a["answer"] for a in answers] == [r["prediction"] for r in eval_rows]
    assert [a["confidence"] for a in answers] == pytest.approx([r["confidence"] for r in eval_rows], abs=1e-4)

    # the version holds what serving and review need, and not the base weights
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/4")
    bundle = next(p for p in (tmp_path / local).rglob("spec.json")).parent
    assert {"recipe.yaml", "spec.json", "report.md", "verdict.json", "metrics.json"} <= {p.name for p in bundle.iterdir()}
    assert (bundle / "adapter" / "adapter_model.safetensors").is_file()
    assert not (bundle / "base").exists()
    assert not list((tmp_path / local).rglob("*.pkl")), "nothing in a version should need unpickling"

    # --include-base copies the base weights into the version
    invoke("push", str(strict_path), "--run-dir", str(failing), "--force", "--reason", "bundle test", "--include-base")
    with_base = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/5", dst_path=str(tmp_path / "v5")))
    assert next(with_base.rglob("base/config.json")).is_file()
    assert next(with_base.rglob("base/model.safetensors")).is_file()
    # the same adapter pushed with another bundle is another logged model: version 4 is as it was
    v4, v5 = client.get_model_version(MODEL, "4"), client.get_model_version(MODEL, "5")
    assert v4.source != v5.source and v4.source.startswith("models:/m-")
    again = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/4", dst_path=str(tmp_path / "v4")))
    assert not list(again.rglob("base")) and next(again.rglob("adapter_model.safetensors")).is_file()


def test_predict_and_compare_commands(tiny_model_dir, tracking_env, tmp_path, clean_secret_env):
    recipe = push_recipe(tiny_model_dir, max_drop_vs_best_baseline=1.0)
    recipe["registry"]["model_name"] = "smoke-predict"
    invoke("run", str(write_recipe(tmp_path, recipe)))
    run_dir = latest_run_dir(tmp_path)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"id": 1, "text": "I was charged twice this month"}\n{"id": 2, "text": "my parcel never came"}\n')
    result = invoke("predict", "models:/smoke-predict@challenger", "--input", str(inputs))
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in rows] == [1, 2]
    labels = json.loads((run_dir / "prep/spec.json").read_text())["spec"]
    assert all(r["answer"] in labels and 0 < r["confidence"] <= 1 and r["escalated"] is False for r in rows)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    failed = CliRunner().invoke(app, ["predict", "models:/smoke-predict@challenger", "--input", str(bad)])
    assert failed.exit_code == 2 and f"{bad}:2" in failed.output

    table = invoke("compare", str(run_dir), "models:/smoke-predict/1")
    assert "smoke-predict v1" in table.output
    # the same names and numbers as the eval run's MLflow metrics, for the run directory and for the version
    eval_run = MlflowClient(tracking_env).get_run(
        json.loads((run_dir / "manifest.json").read_text())["stages"]["eval"]["mlflow_run_id"])
    for key in ("expert.accuracy", "expert.macro_f1", "expert.cost_per_1k"):
        row = next(line for line in table.output.splitlines() if f" {key} " in line)
        assert row.count(f"{eval_run.data.metrics[key]:.4f}") == 2, row


def test_predict_escalates_unsure_rows_to_the_frontier(tiny_model_dir, tracking_env, tmp_path, monkeypatch, clean_secret_env):
    from tests.conftest import shipped_rows
    from tests.support.openai_server import FakeOpenAIServer

    gold = {r["text"].strip(): r["queue"] for r in shipped_rows("tickets/tickets.jsonl")}
    monkeypatch.setenv("CASCADE_KEY", "sk-cascade-test")
    with FakeOpenAIServer(lambda body: gold.get(body["messages"][-1]["content"], "billing"), api_key="sk-cascade-test") as srv:
        recipe = push_recipe(tiny_model_dir, max_drop_vs_best_baseline=1.0)
        recipe["registry"]["model_name"] = "smoke-cascade"
        recipe["eval"]["baselines"].append(
            {"name": "frontier", "kind": "openai", "model": "fake", "base_url": srv.base_url, "api_key_env": "CASCADE_KEY",
             "price_per_mtok": {"input": 2.5, "output": 10.0}}
        )
        recipe["eval"]["cascade"] = {"target_metric": "accuracy", "target": 0.95}
        invoke("run", str(write_recipe(tmp_path, recipe)))
        run_dir = latest_run_dir(tmp_path)
        threshold = json.loads((run_dir / "eval/cascade.json").read_text())["threshold"]
        assert threshold is not None, "a perfect frontier lets the cascade reach the target"
        tests = [json.loads(line) for line in (run_dir / "prep/test.jsonl").read_text().splitlines()][:12]
        inputs = tmp_path / "cascade-in.jsonl"
        inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in tests))
        calls_before = len(srv.requests)
        rows = [json.loads(line) for line in invoke("predict", "models:/smoke-cascade@challenger", "--input", str(inputs))
                .stdout.splitlines() if line.startswith("{")]
        unsure = [r for r in rows if r["confidence"] < threshold]
        assert unsure, "the tiny expert is unsure of some rows"
        assert all(r["escalated"] and r["answer"] == gold[r["text"]] for r in unsure)
        assert all(not r["escalated"] for r in rows if r["confidence"] >= threshold)
        assert len(srv.requests) - calls_before == len(unsure)

    # frontier down: the expert's answer comes back, the row is marked with the error
    down = [json.loads(line) for line in invoke("predict", "models:/smoke-cascade@challenger", "--input", str(inputs))
            .stdout.splitlines() if line.startswith("{")]
    assert all(r["escalate"] and not r["escalated"] and "escalation_error" in r for r in down if r["confidence"] < threshold)
