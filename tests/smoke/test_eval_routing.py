"""Three tiers over real HTTP: the tiny expert, a mid tier and a frontier, both local OpenAI-compatible servers.

The mid tier is right on a known share of the rows and says so through its log-probabilities (confident when
right, unsure when wrong); its first request fails beyond its retries, so that row passes on to the frontier
(an oracle). The thresholds are chosen together on validation, the route is measured on test against the
frontier alone, and the verdict, report, plot and MLflow metrics say so.
"""

from __future__ import annotations

import json
import shutil
import zlib

from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer

MID_KEY, FRONTIER_KEY = "sk-mid-tier-secret-0001", "sk-frontier-secret-0002"


def mid_knows(text: str) -> bool:
    """The rows the mid tier answers right: a fixed two thirds of them."""
    return zlib.crc32(text.encode()) % 3 != 0


def test_three_tiers_chosen_together_on_validation_and_measured_on_test(tiny_model_dir, tracking_env, tmp_path,
                                                                        monkeypatch, clean_secret_env):
    monkeypatch.setenv("MID_KEY", MID_KEY)
    monkeypatch.setenv("FRONTIER_KEY", FRONTIER_KEY)
    rows = shipped_rows("tickets/tickets.jsonl")
    gold = {r["text"].strip(): r["queue"] for r in rows}
    queues = sorted(set(gold.values()))

    def mid_answer(body):
        text = body["messages"][-1]["content"]
        right = gold[text]
        return right if mid_knows(text) else next(q for q in queues if q != right)

    runner = CliRunner()
    with FakeOpenAIServer(mid_answer, api_key=MID_KEY) as mid, \
            FakeOpenAIServer(lambda body: gold[body["messages"][-1]["content"]], api_key=FRONTIER_KEY) as frontier:
        mid.token_logprob = lambda request, answer: -0.05 if answer == gold[request["messages"][-1]["content"]] else -2.0
        mid.faults += [("status", 500, {})] * 2  # max_retries 1: the first request fails for good
        recipe = shipped_recipe("ticket-classification", **{
            "name": "routed-tickets",
            "registry.model_name": "routed-tickets",  # the MLflow server is the session's: a name of its own
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1},
            "eval.baselines": [
                {"name": "mid", "kind": "openai", "model": "mid-model", "base_url": mid.base_url, "api_key_env": "MID_KEY",
                 "price_per_mtok": {"input": 0.1, "output": 0.4}, "logprobs": True, "max_retries": 1,
                 "max_concurrency": 1},
                {"name": "frontier", "kind": "openai", "model": "big-model", "base_url": frontier.base_url,
                 "api_key_env": "FRONTIER_KEY", "price_per_mtok": {"input": 2.5, "output": 10.0}},
            ],
            "eval.routing": {"tiers": ["expert", "mid", "frontier"], "target": {"metric": "accuracy", "below_last": 0.05}},
            "eval.gate.max_baseline_failure_rate": 0.5,
            "eval.bootstrap_samples": 300,
        })
        recipe_path = write_recipe(tmp_path, recipe)
        result = runner.invoke(app, ["run", str(recipe_path), "--run-dir", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        asked = len(mid.requests), len(frontier.requests)
        # the registered version carries the route: `expert predict` climbs it, live
        texts = [r["text"] for r in rows[:12]]
        inputs = tmp_path / "inputs.jsonl"
        inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        registered = json.loads((tmp_path / "run/push/registered.json").read_text())
        uri = f"models:/{registered['model_name']}/{registered['version']}"
        predicted = runner.invoke(app, ["predict", uri, "--input", str(inputs)])
        assert predicted.exit_code == 0, predicted.output
    answered = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert len(answered) == len(texts)
    run_dir = tmp_path / "run"
    splits = {s: [json.loads(line) for line in (run_dir / f"prep/{s}.jsonl").read_text().splitlines()]
              for s in ("validation", "test")}
    n = sum(len(r) for r in splits.values())
    assert asked == (n + 1, n), "in eval every tier answers validation and test"
    assert all(r.get("logprobs") for r in mid.requests), "the mid tier is asked for its log-probabilities"

    out = run_dir / "eval"
    route = json.loads((out / "route.json").read_text())
    assert set(route["options"]) | set(route["unmet"]) == {"point", "margin"}, "each choice is a route or says why not"
    assert route["chain"] == ["expert", "mid", "frontier"] and route["reason"] is None
    assert "log-probabilities" in route["confidence"]["mid"]
    assert route["target"] == 1.0 - 0.05, "the oracle frontier scores 1.0 on validation"
    point = route["options"]["point"]
    assert point["thresholds"] == route["thresholds"] and len(route["thresholds"]) == 2
    assert point["validation"]["metric"] >= route["target"]
    test = point["test"]
    assert abs(sum(test["shares"].values()) - 1) < 1e-9 and test["shares"]["mid"] > 0
    vs = test["vs_last_tier"]
    assert vs["tier"] == "frontier" and 0 < vs["cost_saving"] < 1, "the mid tier answers part of the traffic cheaply"
    assert vs["cost_saving_interval_95"][0] <= vs["cost_saving"] <= vs["cost_saving_interval_95"][1]
    assert test["latency_ms_p95"] >= test["latency_ms_p50"] > 0
    # the chosen point is the cheapest on validation that meets the target
    rows = [json.loads(line) for line in (out / "predictions/route.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in splits["test"]]
    assert {r["tier"] for r in rows} <= {"expert", "mid", "frontier"}
    assert sum(r["prediction"] == r["target"] for r in rows) / len(rows) == test["metric"]
    # the failed mid-tier row passed on: it was answered above the mid tier
    failed = [r for r in (json.loads(line) for line in (out / "predictions/mid.jsonl").read_text().splitlines())
              if r.get("error")]
    failed += [r for r in (json.loads(line) for line in (out / "predictions/mid.validation.jsonl").read_text().splitlines())
               if r.get("error")]
    assert len(failed) == 1
    by_id = {r["id"]: r for r in rows}
    if failed[0]["id"] in by_id:
        assert by_id[failed[0]["id"]]["tier"] != "mid"
    assert len(route["test_grid"]) > 100 and route["test_front"]
    assert 0 <= route["label_mix"]["tvd"] <= 1 and route["label_mix"]["p_value"] > 0.01, "stratified splits look alike"

    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["route"]["chain"] == route["chain"] and verdict["route"]["thresholds"] == route["thresholds"]
    assert verdict["decision"] == ("route" if route["holds_on_test"] else "keep_frontier") or verdict["passed"]
    report = (out / "report.md").read_text()
    assert "## Routing across tiers" in report and "plots/route.png" in report and "cost saving vs `frontier`" in report
    assert (out / "plots/route.png").stat().st_size > 0
    for secret in (MID_KEY, FRONTIER_KEY):
        assert all(secret not in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())

    # each row climbed from the expert with the version's thresholds: mid answers only when sure, on texts it knows
    expert_threshold, mid_threshold = route["thresholds"]
    for text, row in zip(texts, answered):
        assert row["tier"] == ("expert" if row["confidence"] >= expert_threshold else
                               "mid" if mid_knows(text.strip()) else "frontier"), row
        if row["tier"] != "expert":
            assert row["answer"] == gold[text.strip()] and row["tiers_tried"][0]["tier"] == "mid"
    climbed = sum(r["tier"] != "expert" for r in answered)
    assert len(mid.requests) - asked[0] == climbed

    client = MlflowClient()
    eval_run = max(client.search_runs([client.get_experiment_by_name("routed-tickets").experiment_id],
                                      "tags.`expert.stage` = 'eval'"), key=lambda r: r.info.start_time)
    assert eval_run.data.metrics["route.test_cost_saving"] == vs["cost_saving"]
    assert eval_run.data.metrics["route.threshold.mid"] == route["thresholds"][1]
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["route"].startswith("expert >= ") and version.tags["route"].endswith("-> frontier")


def test_another_expert_and_recorded_answers_as_tiers(tiny_model_dir, tracking_env, tmp_path):
    """A route with no API at all: this run's expert, a sibling expert from another run directory (loaded as its
    train record says, asked with its own instruction, so it has a confidence) and recorded frontier answers
    with token counts and a price. A run directory that is not trained is an error naming the key."""
    rows = shipped_rows("tickets/tickets.jsonl")
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text("".join(json.dumps({"id": r["id"], "output": r["queue"], "input_tokens": 120,
                                            "output_tokens": 2}) + "\n" for r in rows))
    runner = CliRunner()
    train = {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1}
    sibling = write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "name": "sibling", "model.base": str(tiny_model_dir), "train": {**train, "seed": 7, "learning_rate": 5e-2},
        "eval.routing": None}))
    for step in ("prep", "train"):
        result = runner.invoke(app, [step, str(sibling), "--run-dir", str(tmp_path / "sibling")])
        assert result.exit_code == 0, result.output

    def routed(run_dir: str):
        return shipped_recipe("ticket-classification", **{
            "name": "routed-offline", "registry.model_name": "routed-offline", "model.base": str(tiny_model_dir),
            "train": train,
            "eval.baselines": [{"name": "sibling", "kind": "expert", "run_dir": run_dir},
                               {"name": "recorded", "kind": "predictions", "path": str(recorded),
                                "price_per_mtok": {"input": 2.5, "output": 10.0}}],
            "eval.routing": {"tiers": ["expert", "sibling", "recorded"], "target": {"value": 0.9}, "choose": "margin"},
            "eval.bootstrap_samples": 200})

    untrained = write_recipe(tmp_path, routed(str(tmp_path / "nowhere")))
    run_dir = tmp_path / "run"
    for step in ("prep", "train"):
        assert runner.invoke(app, [step, str(untrained), "--run-dir", str(run_dir)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(untrained), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "eval.baselines `sibling` -> run_dir" in result.output
    assert "not a trained run directory" in result.output

    recipe = write_recipe(tmp_path, routed(str(tmp_path / "sibling")))
    result = runner.invoke(app, ["run", str(recipe), "--run-dir", str(tmp_path / "run2")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run2/eval"
    sibling_rows = [json.loads(line) for line in (out / "predictions/sibling.validation.jsonl").read_text().splitlines()]
    assert sibling_rows and all(0 < r["confidence"] <= 1 for r in sibling_rows)
    ours = [json.loads(line) for line in (out / "predictions/expert.validation.jsonl").read_text().splitlines()]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(ours, sibling_rows)) > 1e-3, \
        "the sibling is a different model (another seed and learning rate), not this run's expert again"
    route = json.loads((out / "route.json").read_text())
    assert route["chain"] == ["expert", "sibling", "recorded"] and route["choose"] == "margin"
    assert route["confidence"]["sibling"] == "that expert's answer probability"
    assert route["options"]["margin"]["validation"]["metric"] >= 0.9 and route["thresholds"] is not None
    metrics = json.loads((out / "metrics.json").read_text())["systems"]
    assert metrics["recorded"]["cost_per_1k"] > metrics["expert"]["cost_per_1k"] > 0

    # a registered version as a tier: run2's expert, pushed above, loaded from the registry and asked on the same
    # validation rows, answers as run2's own expert did there (same weights, same rows; within a tolerance)
    registered = json.loads((tmp_path / "run2/push/registered.json").read_text())
    uri = f"models:/{registered['model_name']}/{registered['version']}"

    def with_version(version: str):
        doc = routed(str(tmp_path / "sibling"))
        doc["eval"]["baselines"][0] = {"name": "sibling", "kind": "expert", "version": version}
        return write_recipe(tmp_path, doc)

    shutil.copytree(tmp_path / "run2", tmp_path / "run3", ignore=shutil.ignore_patterns("run.lock"))
    result = runner.invoke(app, ["eval", str(with_version("models:/no-such-expert/1")), "--run-dir",
                                 str(tmp_path / "run3")])
    assert result.exit_code == 2 and "eval.baselines `sibling` -> version: models:/no-such-expert/1" in result.output
    result = runner.invoke(app, ["eval", str(with_version(uri)), "--run-dir", str(tmp_path / "run3")])
    assert result.exit_code == 0, result.output
    as_version = [json.loads(line) for line in
                  (tmp_path / "run3/eval/predictions/sibling.validation.jsonl").read_text().splitlines()]
    assert [r["id"] for r in as_version] == [r["id"] for r in ours]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(ours, as_version)) < 1e-3
    assert json.loads((tmp_path / "run3/eval/route.json").read_text())["chain"] == ["expert", "sibling", "recorded"]
