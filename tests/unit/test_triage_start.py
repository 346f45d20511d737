"""Triage at run time: the start-tier rule is eval's, and a `probe` router on a real tiny model's pass sends sure
answers up from where it says, in `expert serve` (the real batching worker, HTTP on 127.0.0.1, two local
OpenAI-compatible tiers) and in the registered model's `predict` with `expert predict`'s climb.

The `text` router on a registered version (push, load, digest, predict, serve) is tests/smoke/test_triage_runtime.py.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from pipeline import serving as serve
from pipeline.routing import cascade, triage
from tests.conftest import shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer
from tests.support.serve_thread import serving

KEY = "sk-unit-triage-secret"


def test_a_request_starts_at_the_highest_tier_whose_cut_off_its_score_reaches():
    """The one start rule eval's search, predict and serve share: a score equal to a cut-off reaches it; `NEVER`
    is reached by no probability; equal cut-offs skip the tier between; no cut-offs start every request at 0."""
    scores = np.array([0.0, 0.25, 0.5, 0.74, 0.75, 1.0])
    assert triage.start_tier(scores, ()).tolist() == [0] * 6
    assert triage.start_tier(scores, (0.25, 0.75)).tolist() == [0, 1, 1, 1, 2, 2]
    assert triage.start_tier(scores, (0.5, 0.5)).tolist() == [0, 0, 2, 2, 2, 2]
    assert triage.start_tier(scores, (0.5, triage.NEVER)).tolist() == [0, 0, 1, 1, 1, 1]


def test_triage_metrics_count_decisions_and_time_the_router():
    m = serve.Metrics()
    m.triage("text", "frontier", 0.0008)
    m.triage("text", "expert", 0.003)
    text = m.render()
    assert 'expert_triage_decisions_total{router="text",start="frontier"} 1' in text
    assert 'expert_triage_duration_seconds_bucket{router="text",le="0.001"} 1' in text
    assert 'expert_triage_duration_seconds_bucket{router="text",le="0.005"} 2' in text
    assert 'expert_triage_duration_seconds_count{router="text"} 2' in text
    assert "# TYPE expert_triage_duration_seconds histogram" in text


def probed_expert(tiny_model_dir, tmp_path, mid_url: str, top_url: str):
    """A tiny ticket expert (LoRA, untrained) whose route is expert (>= 0: always sure) -> mid -> frontier, with a
    `probe` router trained on its own states (target: a fixed half of the texts) and both cut-offs at the median
    score: a request the router sends up goes straight to the frontier."""
    from peft import LoraConfig, get_peft_model

    from pipeline.inference import answering, models
    from pipeline.recipe.schema import load_recipe
    from pipeline.tasks import classification

    baselines = [{"name": "mid", "kind": "openai", "model": "m", "base_url": mid_url, "api_key_env": "TRIAGE_KEY",
                  "logprobs": True},
                 {"name": "frontier", "kind": "openai", "model": "f", "base_url": top_url, "api_key_env": "TRIAGE_KEY"}]
    recipe = load_recipe(write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "model.base": str(tiny_model_dir), "eval.baselines": baselines})))
    model = get_peft_model(models.load_base_model(recipe.model, tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    system_prompt = classification.system_prompt(recipe.task.instruction, recipe.task.labels)
    expert = SimpleNamespace(recipe=recipe, spec=recipe.task.labels, tokenizer=models.load_tokenizer(tiny_model_dir),
                             model=model.eval(), threshold=0.0, frontier=None, system_prompt=system_prompt,
                             baseline_system_prompt=system_prompt,
                             route={"chain": ["expert", "mid", "frontier"], "thresholds": [0.0, 0.0]})
    serve.prepare(expert, serve.ServeOptions())
    texts = [r["text"] for r in shipped_rows("tickets/tickets.jsonl")[:60]]
    states = triage.expert_states(expert.model, expert.tokenizer,
                                  [answering.expert_prompt(system_prompt, t) for t in texts], 8)
    router = triage.train("probe", states, np.array([zlib.crc32(t.encode()) % 2 == 0 for t in texts]), 0)
    requests = [r["text"] for r in shipped_rows("tickets/tickets.jsonl")[60:76]]
    one_by_one = np.concatenate([router.score(triage.expert_states(
        expert.model, expert.tokenizer, [answering.expert_prompt(system_prompt, t)], 1)) for t in requests])
    cut = float(np.median(one_by_one))
    expert.triage = cascade.RouteTriage(router, (cut, cut), ("expert", "mid", "frontier"))
    return expert, requests, one_by_one, cut


def test_a_probe_router_sends_sure_answers_up_from_its_start_tier(tiny_model_dir, tmp_path, monkeypatch):
    from pipeline.expert_model import ExpertModel

    monkeypatch.setenv("TRIAGE_KEY", KEY)
    with FakeOpenAIServer(lambda body: "account", api_key=KEY) as mid, \
            FakeOpenAIServer(lambda body: "technical", api_key=KEY) as top:
        expert, requests, scores, cut = probed_expert(tiny_model_dir, tmp_path, mid.base_url, top.base_url)
        sent = {t for t, s in zip(requests, scores) if s >= cut}
        assert 0 < len(sent) < len(requests)
        service = serve.Service(expert, "tickets", "1", "models:/tickets/1",
                                serve.ServeOptions(frontier_retries=0, frontier_timeout_s=5))
        try:
            with serving(serve.create_app(service)) as url:
                served = [httpx.post(f"{url}/v1/predict", json={"text": t}, timeout=60).json() for t in requests]
                metrics = httpx.get(f"{url}/metrics").text
        finally:
            service.close()
        pyfunc = ExpertModel()
        vars(pyfunc).update(vars(expert))
        predicted = cascade.escalate(pyfunc.predict(None, requests), requests,
                                     cascade.escalation(expert.recipe, 0.0, None, retries=0, timeout_s=5,
                                                        route=expert.route), pyfunc)
    assert mid.requests == [], "a request the probe sends up starts at the frontier; the expert is sure of the rest"
    assert len(top.requests) == 2 * len(sent)
    for rows in (served, predicted):
        for text, score, row in zip(requests, scores, rows):
            assert row["triage"]["router"] == "probe" and row["triage"]["score"] == pytest.approx(score, abs=1e-6)
            assert cascade.is_probability(row["confidence"]), "the probe runs on the expert's pass: it answered"
            if text in sent:
                assert row["triage"]["start"] == "frontier" and row["escalate"] is True
                assert (row["tier"], row["answer"]) == ("frontier", "technical") and row["expert_answer"] in expert.spec
                assert [t["tier"] for t in row["tiers_tried"]] == ["frontier"]
            else:
                assert row["triage"]["start"] == "expert" and row["tier"] == "expert" and row["escalate"] is False
    assert f'expert_triage_decisions_total{{router="probe",start="frontier"}} {len(sent)}' in metrics
    assert f'expert_triage_decisions_total{{router="probe",start="expert"}} {len(requests) - len(sent)}' in metrics
    assert f'expert_triage_duration_seconds_count{{router="probe"}} {len(requests)}' in metrics
