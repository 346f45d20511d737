"""Multi-label classification end to end on the tiny model: `expert run` on recipes/ticket-tagging.yaml with a route
to a frontier (a local OpenAI-compatible oracle), then the registered version served over HTTP, climbing that route.

The task type was added by touching only pipeline/tasks/, the recipe's task enum, data and tests: this module is
the proof that the stages, eval, routing and serving run it through the `TaskType` protocol.
"""

from __future__ import annotations

import json
import traceback
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from pipeline import serving as serve
from pipeline.cli import app
from pipeline.tasks import multilabel
from tests.conftest import isolate, shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer
from tests.support.serve_thread import serving

pytestmark = pytest.mark.smoke
MODEL = "smoke-tagging"
KEY_ENV, KEY = "TAGGING_FRONTIER_KEY", "sk-tagging-smoke-secret"


@pytest.fixture(scope="module")
def tagged(tiny_model_dir, mlflow_uri, tmp_path_factory):
    """The tagging recipe run and pushed; its frontier (an oracle that answers the gold tags as a JSON list) up."""
    tmp = tmp_path_factory.mktemp("tagging")
    gold = {r["text"].strip(): r["tags"] for r in shipped_rows("tickets-tagging/tickets-tagging.jsonl")}
    with pytest.MonkeyPatch.context() as mp, \
            FakeOpenAIServer(lambda body: json.dumps(gold[body["messages"][-1]["content"]]), api_key=KEY) as srv:
        isolate(mp, mlflow_uri, tmp, **{KEY_ENV: KEY})
        recipe = shipped_recipe("ticket-tagging", **{
            "name": MODEL,
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "seed": 5},
            "eval.baselines": [{"name": "frontier", "kind": "openai", "model": "fake", "base_url": srv.base_url,
                                "api_key_env": KEY_ENV, "price_per_mtok": {"input": 2.5, "output": 10.0}}],
            "eval.gate": {"metric": "micro_f1", "max_drop_vs_best_baseline": 1.0},
            "eval.routing": {"tiers": ["expert", "frontier"], "target": {"metric": "micro_f1", "below_last": 0.05}},
            "eval.bootstrap_samples": 200,
            "registry.model_name": MODEL,
        })
        result = CliRunner().invoke(app, ["run", str(write_recipe(tmp, recipe))])
        assert result.exit_code == 0, result.output + "".join(traceback.format_exception(*result.exc_info))
        run_dir = max((tmp / "runs" / MODEL).iterdir())
        yield SimpleNamespace(run_dir=run_dir, gold=gold, srv=srv, spec=recipe["task"]["labels"])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_run_measures_label_sets_with_intervals_and_routes_them(tagged):
    out, spec = tagged.run_dir / "eval", sorted(tagged.spec)
    assert json.loads((tagged.run_dir / "prep/spec.json").read_text())["spec"] == tagged.spec
    stats = json.loads((tagged.run_dir / "prep/stats.json").read_text())
    assert set(stats["classes"]["train"]) == set(spec), "class counts are per label"
    assert (tagged.run_dir / "prep/class_distribution.png").stat().st_size > 0
    test = read_jsonl(tagged.run_dir / "prep/test.jsonl")
    assert all(isinstance(r["target"], list) and r["target"] == sorted(r["target"]) for r in test)

    expert = read_jsonl(out / "predictions/expert.jsonl")
    for row in expert:  # constrained decoding: a JSON list of labels of the set (a repeated label is unparsable)
        assert row["prediction"] is None or set(row["prediction"]) <= set(spec)
        assert 0 <= row["confidence"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    golds, preds = [r["target"] for r in test], [r["prediction"] for r in expert]
    recomputed = multilabel.metrics(golds, preds, tagged.spec)
    for name in ("micro_f1", "macro_f1", "exact_match"):
        assert metrics["systems"]["expert"][name] == pytest.approx(recomputed[name])
    assert metrics["systems"]["frontier"]["exact_match"] == 1.0 and metrics["systems"]["frontier"]["micro_f1"] == 1.0
    comparison = metrics["comparisons"]["frontier"]
    assert comparison["metric"] == "micro_f1"
    assert comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"] <= 0
    assert comparison["difference"] == pytest.approx(recomputed["micro_f1"] - 1.0)

    route = json.loads((out / "route.json").read_text())
    assert route["chain"] == ["expert", "frontier"] and route["reason"] is None
    assert route["target"] == pytest.approx(0.95), "the oracle frontier scores 1.0 on validation"
    routed = read_jsonl(out / "predictions/route.jsonl")
    micro = multilabel.gate_metric("micro_f1")
    assert micro.value(micro.encode(golds, [r["prediction"] for r in routed], tagged.spec)) == pytest.approx(
        route["options"][route["choose"]]["test"]["metric"])
    report = (out / "report.md").read_text()
    assert "## Labels" in report and "| expert | " in report.split("## Labels")[1], "per-label scores, per system"
    assert "## Routing across tiers" in report


def test_the_served_version_answers_label_sets_and_climbs_its_route(tagged):
    route = json.loads((tagged.run_dir / "eval/route.json").read_text())
    threshold = route["thresholds"][0]
    evaluated = {r["id"]: r for r in read_jsonl(tagged.run_dir / "eval/predictions/expert.jsonl")}
    rows = read_jsonl(tagged.run_dir / "prep/test.jsonl")[:10]
    service = serve.load_service(f"models:/{MODEL}@challenger", serve.ServeOptions(frontier_retries=0,
                                                                                   frontier_timeout_s=5))
    try:
        assert service.expert.route is not None and service.expert.threshold == pytest.approx(threshold)
        asked = len(tagged.srv.requests)
        with serving(serve.create_app(service)) as url:
            answers = [httpx.post(f"{url}/v1/predict", json={"text": r["text"]}, timeout=120).json() for r in rows]
    finally:
        service.close()
    for row, answer in zip(rows, answers):
        expected = evaluated[row["id"]]
        assert answer["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)
        if expected["confidence"] >= threshold and expected["prediction"] is not None:
            assert answer["tier"] == "expert" and answer["answer"] == expected["prediction"]
        else:  # unsure (or unparsable): the frontier, an oracle, answers the gold set
            assert answer["tier"] == "frontier" and answer["answer"] == row["target"], answer
    assert len(tagged.srv.requests) - asked == sum(a["tier"] != "expert" for a in answers)
