"""Triage at run time, on a real registered version of the tiny model, over real HTTP: two local OpenAI-compatible
servers (a mid tier and a frontier), the session's real `mlflow server`, `expert serve` in-process and
`expert predict` through the CLI.

The version's triage stands for eval's choice (eval's own choice of router and cut-offs is tested in
tests/unit/test_triage.py and tests/smoke/test_eval_routing.py): after a finished run, a `text` router is trained
with `triage.train` on the run's training texts (the "expert is wrong" target being the `shipping` queue, so the
router has something to learn), saved as eval does (`eval/triage/text/`), and the verdict's route is written with
its cut-offs (the 50th and 80th percentiles of its scores on the requests, so that requests start at each tier) and
the expert's threshold at the median of its test confidences (so that some requests the router keeps at the
expert climb, as they do today). `expert push` then registers version 2 with the router in it.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlflow.artifacts
import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline import serving as serve
from pipeline.cli import app
from pipeline.routing import cascade, triage
from tests.conftest import isolate, shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer
from tests.support.serve_thread import serving

pytestmark = pytest.mark.smoke
MODEL = "smoke-triage"
MID_KEY, FRONTIER_KEY = "sk-triage-mid-secret", "sk-triage-frontier-secret"
ROUTER_FILE = "artifacts/bundle/triage/text/router.safetensors"


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def version(tiny_model_dir, mlflow_uri, tmp_path_factory):
    """Version 1 of `smoke-triage` without triage (as `expert run` pushed it), version 2 with a `text` router
    (see the module's docstring); the mid tier and the frontier (both always right) still up."""
    tmp = tmp_path_factory.mktemp("triage")
    gold = {r["text"].strip(): r["queue"] for r in shipped_rows("tickets/tickets.jsonl")}

    def right(body):
        return gold.get(body["messages"][-1]["content"].strip(), "billing")

    with pytest.MonkeyPatch.context() as mp, FakeOpenAIServer(right, api_key=MID_KEY) as mid, \
            FakeOpenAIServer(right, api_key=FRONTIER_KEY) as top:
        isolate(mp, mlflow_uri, tmp, MID_KEY=MID_KEY, FRONTIER_KEY=FRONTIER_KEY)
        recipe = shipped_recipe("ticket-classification", **{
            "name": MODEL, "registry.model_name": MODEL, "model.base": str(tiny_model_dir),
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "seed": 5},
            "eval.baselines": [
                {"name": "mid", "kind": "openai", "model": "mid-model", "base_url": mid.base_url, "api_key_env": "MID_KEY",
                 "price_per_mtok": {"input": 0.1, "output": 0.4}, "logprobs": True},
                {"name": "frontier", "kind": "openai", "model": "big-model", "base_url": top.base_url,
                 "api_key_env": "FRONTIER_KEY", "price_per_mtok": {"input": 2.5, "output": 10.0}}],
            "eval.gate": {"metric": "accuracy", "max_drop_vs_best_baseline": 1.0},
        })
        recipe_path = write_recipe(tmp, recipe)
        run_dir = tmp / "run"
        cli("run", str(recipe_path), "--run-dir", str(run_dir))

        train = read_jsonl(run_dir / "prep/train.jsonl")
        router = triage.train("text", [r["text"] for r in train], np.array([r["target"] == "shipping" for r in train]), 0)
        triage.save(router, run_dir / "eval/triage/text")
        requests = read_jsonl(run_dir / "prep/test.jsonl")[:30]
        scores = router.score([r["text"] for r in requests])
        cutoffs = [float(np.quantile(scores, 0.5)), float(np.quantile(scores, 0.8))]
        evaluated = {r["id"]: r for r in read_jsonl(run_dir / "eval/predictions/expert.jsonl")}
        threshold = float(np.median([evaluated[r["id"]]["confidence"] for r in requests]))
        verdict_path = run_dir / "eval/verdict.json"
        verdict = json.loads(verdict_path.read_text())
        verdict["route"] = {"chain": ["expert", "mid", "frontier"], "thresholds": [threshold, 0.0], "target": 0.0,
                            "target_metric": "accuracy", "holds_on_test": True,
                            "triage": {"router": "text", "cutoffs": cutoffs, "before_expert": True}}
        verdict_path.write_text(json.dumps(verdict))
        cli("push", str(recipe_path), "--run-dir", str(run_dir))

        starts = triage.start_tier(np.asarray(scores), tuple(cutoffs))
        chain = ["expert", "mid", "frontier"]
        assert {chain[k] for k in starts} == set(chain), "the cut-offs start requests at every tier"
        yield SimpleNamespace(uri=f"models:/{MODEL}/2", without=f"models:/{MODEL}/1", tmp=tmp, mid=mid, top=top,
                              gold=gold, router=router, cutoffs=cutoffs, threshold=threshold, requests=requests,
                              scores=scores, starts={r["text"]: chain[k] for r, k in zip(requests, starts)},
                              evaluated=evaluated)


def check_rows(version, rows: list[dict], mid_before: int, top_before: int) -> None:
    """Each answer against the router's own decision: sent to the frontier, only the frontier was asked and the
    expert did not answer; sent to the mid tier, the climb began there; kept at the expert, today's path (the
    expert's evaluated answer, or the mid tier when under the threshold)."""
    mid_asked = [r["messages"][-1]["content"] for r in version.mid.requests[mid_before:]]
    top_asked = [r["messages"][-1]["content"] for r in version.top.requests[top_before:]]
    assert len(rows) == len(version.requests)
    for request, row in zip(version.requests, rows):
        text, start = request["text"], version.starts[request["text"]]
        score = float(version.scores[version.requests.index(request)])
        assert row["triage"]["router"] == "text" and row["triage"]["start"] == start, row
        assert row["triage"]["score"] == pytest.approx(score, abs=1e-9)
        if start != "expert":  # the expert never ran: no confidence, no answer of its own
            assert row["confidence"] is None and "expert_answer" not in row and row["escalated"] is True, row
            assert row["tier"] == start and row["answer"] == version.gold[text.strip()]
            assert [t["tier"] for t in row["tiers_tried"]] == [start]
            assert (text in mid_asked) == (start == "mid") and (text in top_asked) == (start == "frontier")
            continue
        expected = version.evaluated[request["id"]]
        assert row["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)
        if row["confidence"] < version.threshold:
            assert row["tier"] == "mid" and row["expert_answer"] == expected["prediction"], row
            assert row["answer"] == version.gold[text.strip()]
        else:
            assert row["tier"] == "expert" and row["answer"] == expected["prediction"] and "tiers_tried" not in row
            assert text not in mid_asked
        assert text not in top_asked
    frontier_only = [r["text"] for r in version.requests if version.starts[r["text"]] == "frontier"]
    assert frontier_only and not set(frontier_only) & set(mid_asked), "the mid tier saw none sent to the frontier"
    assert sorted(top_asked) == sorted(frontier_only)


def metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_serve_starts_each_request_where_triage_says_and_metrics_count_it(version):
    service = serve.load_service(version.uri, serve.ServeOptions(frontier_retries=0, frontier_timeout_s=5))
    try:
        assert service.info()["triage"].startswith("`text` router (before the expert)")
        with serving(serve.create_app(service)) as url:
            mid_before, top_before = len(version.mid.requests), len(version.top.requests)
            answered_before = metric(httpx.get(f"{url}/metrics").text, "expert_batch_size_sum")
            rows = [httpx.post(f"{url}/v1/predict", json={"text": r["text"]}, timeout=60).json()
                    for r in version.requests]
            metrics = httpx.get(f"{url}/metrics").text
            check_rows(version, rows, mid_before, top_before)
            kept = sum(start == "expert" for start in version.starts.values())
            assert metric(metrics, "expert_batch_size_sum") - answered_before == kept, "the expert ran only for those kept"
            for start in ("expert", "mid", "frontier"):
                n = sum(s == start for s in version.starts.values())
                assert f'expert_triage_decisions_total{{router="text",start="{start}"}} {n}' in metrics
            assert metric(metrics, 'expert_triage_duration_seconds_count{router="text"}') == len(version.requests)
            assert metric(metrics, 'expert_tier_requests_total{tier="expert",outcome="answered"}') + metric(
                metrics, 'expert_tier_requests_total{tier="expert",outcome="passed"}') == kept

            sent = next(r["text"] for r in version.requests if version.starts[r["text"]] == "frontier")
            chat = httpx.post(f"{url}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": sent}]}, timeout=60)
            body = chat.json()
            assert body["expert"]["triage"]["start"] == "frontier" and body["expert"]["tier"] == "frontier"
            assert chat.headers["x-expert-tier"] == "frontier" and "x-expert-confidence" not in chat.headers
    finally:
        service.close()

    # escalation off: the expert answers after all, and the row says triage sent it up
    off = serve.Service(service.expert, MODEL, "2", version.uri, serve.ServeOptions(escalate=False))
    try:
        with serving(serve.create_app(off)) as url:
            row = httpx.post(f"{url}/v1/predict", json={"text": sent}, timeout=60).json()
    finally:
        off.close()
    request = next(r for r in version.requests if r["text"] == sent)
    assert row["tier"] == "expert" and row["answer"] == version.evaluated[request["id"]]["prediction"]
    assert row["confidence"] == pytest.approx(version.evaluated[request["id"]]["confidence"], abs=1e-4)
    assert "triage" in row["escalation_skipped"] and "`frontier`" in row["escalation_skipped"], row


def test_predict_starts_each_row_where_triage_says(version):
    inputs = version.tmp / "requests.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in version.requests))
    mid_before, top_before = len(version.mid.requests), len(version.top.requests)
    out = cli("predict", version.uri, "--input", str(inputs))
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    check_rows(version, rows, mid_before, top_before)
    assert "started" in out.output and "above the expert" in out.output

    asked = len(version.mid.requests), len(version.top.requests)
    out = cli("predict", version.uri, "--input", str(inputs), "--no-escalate")
    assert (len(version.mid.requests), len(version.top.requests)) == asked, "--no-escalate asks no tier"
    for request, row in zip(version.requests, (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))):
        expected = version.evaluated[request["id"]]
        assert row["tier"] == "expert" and row["answer"] == expected["prediction"], row
        assert row["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)
        if version.starts[request["text"]] != "expert":
            assert "triage" in row["escalation_skipped"] and "--no-escalate" in row["escalation_skipped"], row


def test_the_router_survives_push_and_load_and_a_changed_byte_is_refused(version):
    from pipeline.registry import versions

    _, expert = versions.load_version(version.uri)
    assert isinstance(expert.triage, cascade.RouteTriage) and expert.triage.cutoffs == tuple(version.cutoffs)
    texts = [r["text"] for r in version.requests]
    np.testing.assert_allclose(expert.triage.router.score(texts), version.router.score(texts), rtol=0, atol=1e-9)
    _, before = versions.load_version(version.without)
    assert before.triage is None and before.route is None, "a version without triage loads as before"

    client = MlflowClient()
    model_id = client.get_model_version(MODEL, "2").source.removeprefix("models:/")
    original = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(version.tmp / "original")))
    original = original / ROUTER_FILE
    flipped = bytearray(original.read_bytes())
    flipped[-1] ^= 1
    attack = version.tmp / "attack"
    (attack / ROUTER_FILE).parent.mkdir(parents=True)
    (attack / ROUTER_FILE).write_bytes(bytes(flipped))
    client.log_model_artifacts(model_id, str(attack))
    inputs = version.tmp / "one.jsonl"
    inputs.write_text(json.dumps({"text": version.requests[0]["text"]}) + "\n")
    try:
        refused = cli("predict", version.uri, "--input", str(inputs), code=2)
        assert f"changed {ROUTER_FILE}" in refused.output, refused.output
    finally:  # as pushed: the other tests' version
        (attack / ROUTER_FILE).write_bytes(original.read_bytes())
        client.log_model_artifacts(model_id, str(attack))
