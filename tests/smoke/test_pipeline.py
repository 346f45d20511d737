"""The whole loop on a tiny random Llama: prep -> train -> eval -> push, for both task types.

Against a real `mlflow server` and a local OpenAI-compatible endpoint; checks
what landed in MLflow through `MlflowClient`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.smoke
SECRET = "sk-smoke-secret-1234567890"


def oracle(rows: list[dict], answer_of) -> callable:
    """A 'frontier' that knows the gold answer of every shipped text."""
    by_text = {r["text"].strip(): answer_of(r) for r in rows}

    def respond(body: dict) -> str:
        return by_text[body["messages"][-1]["content"]]

    return respond


def smoke_recipe(name: str, tiny_model_dir, base_url: str, model_name: str) -> dict:
    return shipped_recipe(
        name,
        **{
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1},
            "eval.max_new_tokens": 24,
            "eval.baselines": [
                {"name": "base-zero-shot", "kind": "base_model"},
                {
                    "name": "frontier",
                    "kind": "openai",
                    "model": "fake-frontier",
                    "base_url": base_url,
                    "api_key_env": "SMOKE_FRONTIER_KEY",
                    "price_per_mtok": {"input": 2.5, "output": 10.0},
                    "max_retries": 2,
                },
            ],
            "registry.model_name": model_name,
        },
    )


def all_text_of_runs(client: MlflowClient, experiment_id: str) -> str:
    chunks = []
    for run in client.search_runs([experiment_id]):
        chunks += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    return "\n".join(chunks)


CASES = {
    "ticket-classification": ("tickets/tickets.jsonl", lambda r: r["queue"], "accuracy"),
    "schema-extraction": ("orders/orders.jsonl", lambda r: json.dumps(r["fields"]), "field_exact_match"),
}


@pytest.mark.parametrize("recipe_name", list(CASES))
def test_full_loop(recipe_name, tiny_model_dir, tracking_env, tmp_path, monkeypatch, clean_secret_env):
    data_file, answer_of, metric = CASES[recipe_name]
    monkeypatch.setenv("SMOKE_FRONTIER_KEY", SECRET)
    model_name = f"smoke-{recipe_name}"
    runner = CliRunner()
    with FakeOpenAIServer(oracle(shipped_rows(data_file), answer_of), api_key=SECRET) as frontier:
        recipe = smoke_recipe(recipe_name, tiny_model_dir, frontier.base_url, model_name)
        # with its key set, the frontier's recorded stand-in is neither read nor shown: the endpoint answers
        recipe["eval"]["baselines"][1]["stand_in"] = {"path": str(tmp_path / "never-read.jsonl"), "rule": "unused"}
        recipe_path = write_recipe(tmp_path, recipe)
        result = runner.invoke(app, ["run", str(recipe_path)])
        assert result.exit_code == 0, result.output
        calls_first_run = len(frontier.requests)

        # a finished run does no work and says so
        again = runner.invoke(app, ["run", str(recipe_path)])
        assert again.exit_code == 0, again.output
        assert "nothing to do" in again.output
        assert len(frontier.requests) == calls_first_run

    run_dir = next((tmp_path / "runs" / recipe_name).iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s: manifest["stages"][s]["status"] for s in ("prep", "train", "eval", "push")} == dict.fromkeys(
        ("prep", "train", "eval", "push"), "complete"
    )
    test_rows = (run_dir / "prep/test.jsonl").read_text().splitlines()
    assert calls_first_run == len(test_rows), "the frontier is asked exactly once per test example"
    assert (run_dir / "train/adapter/adapter_model.safetensors").is_file()

    metrics = json.loads((run_dir / "eval/metrics.json").read_text())["systems"]
    assert set(metrics) == {"expert", "base-zero-shot", "frontier"}
    assert metrics["frontier"][metric] == 1.0, "the oracle frontier must score perfectly"
    assert metrics["frontier"]["cost_per_1k"] > 0
    verdict = json.loads((run_dir / "eval/verdict.json").read_text())
    assert verdict["passed"] is False, "a 4-step tiny model cannot match a perfect frontier"
    assert verdict["best_baseline"] == "frontier" and verdict["frontier_baselines"] == ["frontier"]
    assert metrics["frontier"]["stand_in"] is None and "stand-in" not in (run_dir / "eval/report.md").read_text()

    client = MlflowClient(tracking_env)
    experiment = client.get_experiment_by_name(recipe_name)
    runs = {r.data.tags["expert.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"prep", "train", "eval", "push"}, "re-running must not create new MLflow runs"
    assert runs["prep"].data.tags["expert.data_fingerprint"] == manifest["stages"]["prep"]["fingerprint"]
    train_run = runs["train"]
    assert train_run.data.params["model.adapter.r"] == "16"
    assert "final_train_loss" in train_run.data.metrics
    assert {d.dataset.name for d in train_run.inputs.dataset_inputs} == {f"{recipe_name}.train",
                                                                         f"{recipe_name}.validation"}
    assert [o.model_id for o in client.get_run(train_run.info.run_id).outputs.model_outputs] == \
        [manifest["stages"]["train"]["mlflow_model_id"]], "the adapter is the train run's logged model"
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 4
    assert runs["eval"].data.metrics[f"frontier.{metric}"] == 1.0
    assert f"expert.{metric}" in runs["eval"].data.metrics

    version = client.get_model_version_by_alias(model_name, "challenger")
    assert version.tags["data_fingerprint"] == manifest["stages"]["prep"]["fingerprint"]
    assert version.tags["verdict"] == "fail"
    assert version.tags["base_model"] == str(tiny_model_dir)
    provenance = json.loads(open(client.download_artifacts(version.run_id, "version_provenance.json",
                                                           str(tmp_path))).read())
    assert len(provenance["recipe_hash"]) == 64
    assert "champion" not in client.get_registered_model(model_name).aliases, "a failed gate must not promote"

    everything = all_text_of_runs(client, experiment.experiment_id) + json.dumps(version.tags) + version.description
    assert SECRET not in everything
    version_files = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version.version}",
                                                             dst_path=str(tmp_path / "dl")))
    for path in [*run_dir.rglob("*"), *version_files.rglob("*")]:
        if path.is_file() and path.suffix in {".json", ".jsonl", ".md", ".yaml", ".txt", ""}:
            assert SECRET not in path.read_text(), f"secret leaked into {path}"


def test_missing_key_skips_frontier_and_gate_uses_the_rest(tiny_model_dir, tracking_env, tmp_path, clean_secret_env):
    recipe = smoke_recipe("ticket-classification", tiny_model_dir, "http://127.0.0.1:9/v1", "smoke-no-key")
    recipe["name"] = "smoke-no-key"
    result = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path, recipe))])
    assert result.exit_code == 0, result.output
    assert "SMOKE_FRONTIER_KEY is not set" in result.output
    run_dir = next((tmp_path / "runs" / "smoke-no-key").iterdir())
    metrics = json.loads((run_dir / "eval/metrics.json").read_text())
    assert set(metrics["systems"]) == {"expert", "base-zero-shot"}
    assert "frontier" in metrics["skipped"]


def test_bad_data_exits_2_and_names_rows(tiny_model_dir, tracking_env, tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [{"text": f"message number {i}", "queue": "billing" if i % 2 else "shipping"} for i in range(20)]
    rows[3]["queue"] = "astrology"
    rows[5]["text"] = "   "
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    recipe = shipped_recipe("ticket-classification", **{"model.base": str(tiny_model_dir), "data.source": str(data)})
    recipe["data"]["fields"] = {"text": "text", "target": "queue"}
    result = CliRunner().invoke(app, ["prep", str(write_recipe(tmp_path, recipe))])
    assert result.exit_code == 2, result.output
    assert "label_outside_set: 1" in result.output and "empty_text: 1" in result.output
    rejected = [json.loads(line) for line in next((tmp_path / "runs").rglob("rejected.jsonl")).read_text().splitlines()]
    assert {(r["line"], r["reason"]) for r in rejected} == {(4, "label_outside_set"), (6, "empty_text"), (21, "unparsable")}
