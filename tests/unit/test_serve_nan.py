"""Issue 33 #3: a tiny classification expert whose LoRA weights are corrupted to NaN, served for real (the model,
the batching worker, HTTP on 127.0.0.1, a local OpenAI-compatible frontier). Its NaN confidence used to pass as
a sure answer (`"confidence": NaN` in invalid JSON, then 500s while /health said ok)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import torch
from typer.testing import CliRunner

from pipeline import serving as serve
from pipeline.routing import cascade
from tests.conftest import shipped_recipe, write_recipe
from tests.support.openai_server import FakeOpenAIServer
from tests.support.serve_thread import serving

KEY = "sk-unit-nan-secret"


def strict(text: str):
    """JSON as a strict parser reads it: NaN and Infinity are errors."""
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


def corrupted_expert(tiny_model_dir, tmp_path, frontier_url: str):
    """A tiny ticket router (threshold 0.5, frontier at `frontier_url`) with one LoRA matrix set to NaN."""
    from peft import LoraConfig, get_peft_model

    from pipeline.inference import models
    from pipeline.recipe.schema import load_recipe
    from pipeline.tasks import classification

    recipe = load_recipe(write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "model.base": str(tiny_model_dir),
        "eval.baselines": [{"name": "frontier", "kind": "openai", "model": "fake", "base_url": frontier_url,
                            "api_key_env": "NAN_FRONTIER_KEY"}]})))
    labels = recipe.task.labels
    model = get_peft_model(models.load_base_model(recipe.model, tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear")).eval()
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_A" in name).fill_(float("nan"))
    system_prompt = classification.system_prompt(recipe.task.instruction, labels)
    return SimpleNamespace(recipe=recipe, spec=labels, tokenizer=models.load_tokenizer(tiny_model_dir), model=model,
                           threshold=0.5, frontier="frontier", system_prompt=system_prompt,
                           baseline_system_prompt=system_prompt)


@pytest.fixture
def frontier(monkeypatch):
    monkeypatch.setenv("NAN_FRONTIER_KEY", KEY)
    with FakeOpenAIServer(lambda body: "technical", api_key=KEY) as srv:
        yield srv


def test_nan_weights_escalate_with_an_explicit_error_and_health_says_503(tiny_model_dir, tmp_path, frontier):
    expert = corrupted_expert(tiny_model_dir, tmp_path, frontier.base_url)
    options = serve.ServeOptions(frontier_retries=0, frontier_timeout_s=5)
    serve.prepare(expert, options)
    service = serve.Service(expert, "tickets", "1", "models:/tickets/1", options)
    try:
        with serving(serve.create_app(service)) as url:
            raw = httpx.post(f"{url}/v1/predict", json={"text": "my card was charged twice"}, timeout=60)
            assert raw.status_code == 200, raw.text
            row = strict(raw.text)
            # escalated: the frontier's answer, the expert's NaN named as the error, no confidence to show
            assert (row["answer"], row["tier"], row["escalated"]) == ("technical", "frontier", True)
            assert row["confidence"] is None and row["expert_answer"] is None and row["escalate"] is True
            assert "the expert's confidence is nan, not a probability in [0, 1]" in row["expert_error"]
            assert raw.headers["x-expert-model-error"] == "true" and "x-expert-confidence" not in raw.headers
            chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "tickets", "messages": [{"role": "user", "content": "parcel late"}], "logprobs": True})
            assert chat.status_code == 200 and strict(chat.text)["expert"]["expert_error"]
            assert strict(chat.text)["choices"][0]["logprobs"] is None

            health = httpx.get(f"{url}/health", timeout=60)
            assert health.status_code == 503 and "not a probability" in strict(health.text)["status"]
            assert strict(health.text)["model_errors"] == 2
            assert "expert_model_errors_total 2" in httpx.get(f"{url}/metrics").text

            # the frontier down: the row is flagged with both errors and no answer, never a sure one
            frontier.stop()
            down = strict(httpx.post(f"{url}/v1/predict", json={"text": "refund please"}, timeout=60).text)
            assert down["answer"] is None and down["escalated"] is False and down["escalate"] is True
            assert "APIConnectionError" in down["escalation_error"] and "nan" in down["expert_error"]
    finally:
        service.close()

    off = serve.Service(expert, "tickets", "1", "models:/tickets/1", serve.ServeOptions(escalate=False))
    strict_502 = serve.Service(expert, "tickets", "1", "models:/tickets/1",
                               serve.ServeOptions(frontier_down="502", frontier_retries=0, frontier_timeout_s=5))
    try:
        with serving(serve.create_app(off)) as url:
            row = strict(httpx.post(f"{url}/v1/predict", json={"text": "refund please"}, timeout=60).text)
            assert row["answer"] is None and row["escalation_skipped"] == "--no-escalate" and row["expert_error"]
        with serving(serve.create_app(strict_502)) as url:
            refused = httpx.post(f"{url}/v1/predict", json={"text": "refund please"}, timeout=60)
            assert refused.status_code == 502 and "not a probability" in refused.json()["error"]["message"]
    finally:
        off.close()
        strict_502.close()


def test_serve_refuses_to_start_on_a_model_that_answers_nan(tiny_model_dir, tmp_path, frontier, monkeypatch):
    """The probe at start: `expert serve` exits 2 naming the problem instead of serving errors. The version is
    the corrupted tiny expert, handed over where the registry would load it (the registry refuses edited files,
    so corrupted weights cannot come from it in a test)."""
    from pipeline.cli import app
    from pipeline.registry import versions

    monkeypatch.setattr(versions, "load_version",
                        lambda uri: (None, corrupted_expert(tiny_model_dir, tmp_path, frontier.base_url)))
    result = CliRunner().invoke(app, ["serve", "models:/tickets/1", "--port", "1"])
    assert result.exit_code == 2, result.output
    assert "models:/tickets/1: not serving it" in result.output and "not a probability" in result.output
    assert frontier.requests == []


def test_a_healthy_model_passes_the_probe_and_health_is_ok(tiny_model_dir, tmp_path, frontier):
    """The same expert without the NaN: the probe answers, /health is 200 (so the 503 above is the NaN's)."""
    expert = corrupted_expert(tiny_model_dir, tmp_path, frontier.base_url)
    with torch.no_grad():
        for name, p in expert.model.named_parameters():
            if "lora_A" in name:
                p.zero_()
    options = serve.ServeOptions(frontier_retries=0, frontier_timeout_s=5)
    serve.prepare(expert, options)
    service = serve.Service(expert, "tickets", "1", "models:/tickets/1", options)
    try:
        assert service.probe() is None
        with serving(serve.create_app(service)) as url:
            health = httpx.get(f"{url}/health", timeout=60)
            assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        service.close()


@pytest.mark.parametrize("confidence", [float("nan"), float("inf"), -0.1, 1.5, None])
def test_a_confidence_that_is_no_probability_is_an_error_not_a_sure_answer(confidence):
    """`expert predict` and `expert serve` judge the expert's rows with `cascade.expert_row`."""
    row = cascade.expert_row({"text": "x", "answer": "billing", "confidence": confidence}, 0.5)
    assert row["escalate"] is True and row["answer"] is None and row["confidence"] is None
    assert "not a probability in [0, 1]" in row["expert_error"]
    assert cascade.expert_row({"answer": "billing", "confidence": 0.7}, 0.5)["escalate"] is False
    assert cascade.expert_row({"answer": "billing", "confidence": 0.7}, None)["escalate"] is False


def test_predict_reads_and_writes_strict_json(tmp_path):
    """`expert predict` refuses an input line holding NaN (naming it) and never writes one."""
    import io

    from pipeline.commands import batch_predict
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=r"in.jsonl:2: not JSON \(NaN is not a JSON number\)"):
        list(batch_predict.read_inputs(io.StringIO('{"text": "a"}\n{"text": "b", "score": NaN}\n'), "in.jsonl"))
    with pytest.raises(ValueError, match="not JSON compliant"):
        batch_predict.write_jsonl([{"text": "a", "confidence": float("nan")}], io.StringIO())


def test_the_registered_model_judges_its_rows_with_the_cascade_rule(tiny_model_dir, tmp_path):
    """The pyfunc (`ExpertModel.predict`, what MLflow's loader serves) used to compare a NaN confidence with its
    threshold itself, calling it sure; it now judges rows with `cascade.expert_row`, as serving does."""
    from pipeline.expert_model import ExpertModel

    expert = ExpertModel()
    vars(expert).update(vars(corrupted_expert(tiny_model_dir, tmp_path, "http://127.0.0.1:9/v1")),
                        evaluated_runtime=None, runtime=None)
    rows = expert.predict(None, ["my card was charged twice"])
    assert rows[0]["escalate"] is True and rows[0]["answer"] is None and rows[0]["confidence"] is None
    assert "not a probability in [0, 1]" in rows[0]["expert_error"]


def test_a_route_sets_the_experts_threshold_wherever_it_is_read():
    """One rule for the expert's own threshold: the route's first when the version has a route, else the
    cascade's; `cascade.escalation` (serving, `expert predict`) and the registered model both read it."""
    route = {"chain": ["expert", "frontier"], "thresholds": [0.7]}
    assert cascade.expert_threshold(0.4, route) == 0.7
    assert cascade.expert_threshold(0.4, None) == 0.4 and cascade.expert_threshold(None, None) is None
    assert cascade.unsure(0.6, 0.7) and not cascade.unsure(0.7, 0.7) and not cascade.unsure(0.1, None)
    assert cascade.unsure(float("nan"), None), "no threshold does not make a NaN confidence sure"
