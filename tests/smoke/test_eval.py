"""The eval stage end to end on a tiny random Llama: every baseline kind, the cascade, the verdict, MLflow.

A real local OpenAI-compatible server plays the frontier (an oracle that knows
every gold label, with a 429 and a 500 thrown in), a real `mlflow server`
records the run, and a JSONL file plays recorded predictions.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.evaluation.baselines import baseline_rows, load_fewshot, load_recorded
from pipeline.files import file_hash
from pipeline.recipe.schema import PredictionsBaseline, Recipe
from pipeline.run.rundir import RunDir
from pipeline.tasks import classification
from tests.conftest import shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer

SECRET = "sk-eval-secret-1234567890"


def test_eval_stage_with_cascade_recorded_and_few_shot_baselines(tiny_model_dir, tracking_env, tmp_path, monkeypatch,
                                                                clean_secret_env):
    monkeypatch.setenv("EVAL_FRONTIER_KEY", SECRET)
    rows = shipped_rows("tickets/tickets.jsonl")
    gold = {r["text"].strip(): r["queue"] for r in rows}
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text("".join(json.dumps({"id": r["id"], "output": f" {r['queue'].upper()}.\n"}) + "\n" for r in rows))
    runner = CliRunner()
    with FakeOpenAIServer(lambda body: gold[body["messages"][-1]["content"]], api_key=SECRET) as srv:
        recipe = shipped_recipe("ticket-classification", **{
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1},
            "eval.baselines": [
                {"name": "base-2-shot", "kind": "base_model", "shots": 2},
                {"name": "recorded", "kind": "predictions", "path": str(recorded)},
                {"name": "frontier", "kind": "openai", "model": "oracle", "base_url": srv.base_url,
                 "api_key_env": "EVAL_FRONTIER_KEY", "price_per_mtok": {"input": 2.5, "output": 10.0}, "max_retries": 3},
            ],
            "eval.cascade": {"target_metric": "accuracy", "target": 0.95, "frontier": "frontier"},
            "eval.bootstrap_samples": 200,
        })
        recipe["name"] = "eval-cascade"
        recipe_path = write_recipe(tmp_path, recipe)
        assert runner.invoke(app, ["prep", str(recipe_path)]).exit_code == 0
        run_dir = next((tmp_path / "runs" / "eval-cascade").iterdir())
        assert runner.invoke(app, ["train", str(recipe_path), "--run-dir", str(run_dir)]).exit_code == 0

        fewshot = run_dir / "prep/fewshot.json"
        fewshot.rename(tmp_path / "fewshot.json")  # as if prep had not written it
        result = runner.invoke(app, ["eval", str(recipe_path), "--run-dir", str(run_dir)])
        assert result.exit_code == 2, "k-shot without prep/fewshot.json is a recipe error"
        assert "eval -> baselines -> 0 -> shots" in result.output and "fewshot.json" in result.output
        assert srv.requests == [], "nothing is paid for before the inputs are checked"

        (tmp_path / "fewshot.json").rename(fewshot)
        srv.faults += [("status", 429, {"Retry-After": "0"}), ("status", 500, {})]
        result = runner.invoke(app, ["eval", str(recipe_path), "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
        n_test = len((run_dir / "prep/test.jsonl").read_text().splitlines())
        n_val = len((run_dir / "prep/validation.jsonl").read_text().splitlines())
        # no terminal here (as in a log file): progress comes as plain lines, the last one with the full count
        assert f"eval: expert (test) {n_test:,}/{n_test:,} examples" in result.output
        assert len(srv.requests) == n_test + n_val + 2, "test + validation (for the cascade) + the two retried faults"
        shots_prompt = srv.requests[0]["messages"]
        assert len(shots_prompt) == 2, "the frontier gets the plain prompt; shots are for the base model only"

        # a forced re-run of eval is answered from the response cache: zero calls
        again = runner.invoke(app, ["run", str(recipe_path), "--run-dir", str(run_dir), "--force", "eval"])
        assert again.exit_code == 0, again.output
        assert len(srv.requests) == n_test + n_val + 2

    out = run_dir / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    systems = metrics["systems"]
    assert set(systems) == {"expert", "base-2-shot", "recorded", "frontier"}
    assert systems["recorded"]["accuracy"] == 1.0, "a recorded answer that is one label is parsed (case, punctuation, whitespace)"
    assert systems["frontier"]["accuracy"] == 1.0 and systems["frontier"]["cache_hits"] == n_test
    assert systems["frontier"]["api_calls"] == 0, "the forced re-run made no calls"
    assert systems["expert"]["latency_ms_p95"] >= systems["expert"]["latency_ms_p50"] > 0
    assert 0 <= systems["expert"]["ece"] <= 1
    vs = metrics["comparisons"]["frontier"]
    assert vs["ci_low"] <= vs["difference"] <= vs["ci_high"] <= 0 and vs["difference"] < 0
    assert vs["mcnemar"]["baseline_only_correct"] > 0 and vs["mcnemar"]["expert_only_correct"] == 0

    cascade = json.loads((out / "cascade.json").read_text())
    assert cascade["frontier"] == "frontier" and cascade["target_metric"] == "accuracy" and cascade["target"] == 0.95
    assert cascade["threshold"] is not None, "a perfect frontier makes the target reachable"
    assert cascade["validation"]["metric"] >= 0.95
    assert {"threshold", "escalation_rate", "metric", "cost_per_1k"} <= set(cascade["curve"][0])
    chosen = cascade["validation"]
    cheaper = [p for p in cascade["validation_curve"] if p["cost_per_1k"] < chosen["cost_per_1k"]]
    assert all(p["metric"] < 0.95 for p in cheaper), "no cheaper threshold meets the target"

    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["passed"] is False and verdict["decision"] == "cascade"
    assert verdict["threshold"] == cascade["threshold"]
    assert verdict["best_baseline"] in ("frontier", "recorded") and verdict["best_baseline_value"] == 1.0
    for png in ("confusion_expert.png", "confusion_frontier.png", "reliability_expert.png", "cascade.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "95% CI" in report and "McNemar" in report and "CASCADE" in report and "plots/cascade.png" in report
    assert len((out / "predictions/frontier.validation.jsonl").read_text().splitlines()) == n_val

    client = MlflowClient(tracking_env)
    exp = client.get_experiment_by_name("eval-cascade")
    eval_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["expert.stage"] == "eval"]
    latest = max(eval_runs, key=lambda r: r.info.start_time)
    assert latest.data.tags["expert.decision"] == "cascade"
    assert latest.data.metrics["expert_vs_frontier.ci_high"] == pytest.approx(vs["ci_high"])
    assert "cascade.threshold" in latest.data.metrics
    # the MLflow 3 evidence: the splits and the adapter's logged model as inputs, the expert's metrics against
    # that model and the test dataset, a real duration, the verdict as the description, a trace per test example
    inputs = {d.dataset.name: d.dataset.digest for d in latest.inputs.dataset_inputs}
    assert inputs == {"eval-cascade.test": file_hash(run_dir / "prep/test.jsonl")[:12],
                      "eval-cascade.validation": file_hash(run_dir / "prep/validation.jsonl")[:12]}
    model_id = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["mlflow_model_id"]
    assert [m.model_id for m in client.get_run(latest.info.run_id).inputs.model_inputs] == [model_id]
    model_metrics = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert model_metrics["expert.accuracy"].value == pytest.approx(systems["expert"]["accuracy"])
    assert model_metrics["expert.accuracy"].dataset_name == "eval-cascade.test"
    assert "frontier.accuracy" not in model_metrics, "only the expert's numbers are the model's"
    timings = json.loads((out / "timings.json").read_text())
    assert (latest.info.end_time - latest.info.start_time) / 1000 >= timings["stage_s"] - 1.5
    assert latest.data.tags["mlflow.note.content"].startswith(
        f"**Decision: cascade** (gate failed on `macro_f1`, {n_test} test examples")
    traces = client.search_traces(locations=[exp.experiment_id], run_id=latest.info.run_id, max_results=500)
    assert len(traces) == n_test
    expert_rows = {r["id"]: r for r in map(json.loads, (out / "predictions/expert.jsonl").read_text().splitlines())}
    frontier_rows = {r["id"]: r for r in map(json.loads, (out / "predictions/frontier.jsonl").read_text().splitlines())}
    split_with_frontier = 0
    for trace in traces:
        example_id = trace.info.trace_metadata["expert.example_id"]
        row = expert_rows[example_id]
        got = {a.name: a.value for a in trace.info.assessments}
        assert got["target"] == row["target"] and got["expert_correct"] == (row["prediction"] == row["target"])
        assert got["expert_confidence"] == pytest.approx(row["confidence"], abs=1e-5)
        assert json.loads(trace.info.response_preview)["frontier"] == frontier_rows[example_id]["prediction"]
        assert got["disagreement"] == (got["expert_correct"] != got["frontier_correct"]
                                       or got["expert_correct"] != got["recorded_correct"]
                                       or got["expert_correct"] != got["base-2-shot_correct"])
        split_with_frontier += got["expert_correct"] != got["frontier_correct"]
        assert SECRET not in json.dumps(trace.to_dict())
    assert split_with_frontier == vs["mcnemar"]["baseline_only_correct"] + vs["mcnemar"]["expert_only_correct"] > 0
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".md"}:
            assert SECRET not in path.read_text(), f"secret leaked into {path}"


def _recipe(**eval_section) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b"]},
        "data": {"source": "d.jsonl", "fields": {"text": "t", "target": "l"}}, "model": {"base": "m"},
        "eval": eval_section, "registry": {"model_name": "m"},
    })


def test_recorded_predictions_missing_ids_are_listed(tmp_path):
    path = tmp_path / "rec.jsonl"
    path.write_text('{"id": "1", "output": "a"}\n{"id": 2, "output": "B"}\n')
    b = PredictionsBaseline(name="rec", kind="predictions", path=path)
    splits = {"test": [{"id": "1"}, {"id": "2"}, {"id": "7"}, {"id": "9"}]}
    with pytest.raises(UserError, match=r"2 test example id\(s\) have no recorded output: 7, 9"):
        load_recorded(b, splits, classification, ["a", "b"])
    got = load_recorded(b, {"test": splits["test"][:2]}, classification, ["a", "b"])
    assert [r["prediction"] for r in got["test"]] == ["a", "b"]
    path.write_text('{"id": "1", "output": "a"}\n{"id": "1", "output": "b"}\n')
    with pytest.raises(UserError, match="rec.jsonl:2: id 1 appears twice"):
        load_recorded(b, splits, classification, ["a", "b"])


def test_few_shot_prompts_and_missing_file(tmp_path):
    recipe = _recipe(baselines=[{"name": "zero", "kind": "base_model"}, {"name": "three", "kind": "base_model", "shots": 3}])
    (tmp_path / "prep").mkdir()
    with pytest.raises(UserError, match=r"eval -> baselines -> 1 -> shots: `three` asks for 3 few-shot examples"):
        load_fewshot(RunDir(tmp_path), recipe)
    examples = [{"text": f"q{i}", "target": "a", "completion": [{"role": "assistant", "content": f"ans{i}"}]}
                for i in range(3)]
    (tmp_path / "prep/fewshot.json").write_text(json.dumps({"examples": examples}))
    loaded = load_fewshot(RunDir(tmp_path), recipe)
    row = {"id": "1", "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}
    prompt = baseline_rows([row], "B", loaded, 2)[0]["prompt"]
    assert [m["content"] for m in prompt] == ["B", "q0", "ans0", "q1", "ans1", "Q"]
    assert [m["content"] for m in baseline_rows([row], "B")[0]["prompt"]] == ["B", "Q"]


def test_cascade_recipe_errors_name_their_keys():
    with pytest.raises(ValueError, match="cascade needs an openai or predictions baseline"):
        _recipe(cascade={"target": 0.9})
    with pytest.raises(ValueError, match="cascade.frontier `nope`"):
        _recipe(baselines=[{"name": "r", "kind": "predictions", "path": "p.jsonl"}], cascade={"target": 0.9, "frontier": "nope"})
    with pytest.raises(ValueError, match=r"baselines\.0\.openai\.shots\s+Extra inputs are not permitted"):
        _recipe(baselines=[{"name": "f", "kind": "openai", "model": "m", "api_key_env": "K", "shots": 2}])


def test_recorded_predictions_path_is_relative_to_the_recipe(tmp_path):
    from pipeline.recipe.schema import load_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.yaml").write_text(
        "name: r\ntask: {type: classification, instruction: x, labels: [a, b]}\n"
        "data: {source: d.jsonl, fields: {text: t, target: l}}\nmodel: {base: m}\nregistry: {model_name: m}\n"
        "eval: {baselines: [{name: rec, kind: predictions, path: out/rec.jsonl}], cascade: {target: 0.9}}\n"
    )
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.eval.baselines[0].path == folder / "out/rec.jsonl"
    assert recipe.eval.cascade_frontier() == "rec"
