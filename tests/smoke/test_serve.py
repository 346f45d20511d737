"""`expert serve` and `expert export` on a real registered version of the tiny model.

One module set-up runs the whole pipeline (prep, train, eval with a cascade
against a local OpenAI-compatible frontier, push) against the session's real
`mlflow server`; the tests then serve that version over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from typer.testing import CliRunner

from pipeline import serving as serve
from pipeline.cli import app
from tests.conftest import ROOT, isolate, shipped_recipe, shipped_rows, write_recipe
from tests.support.openai_server import FakeOpenAIServer
from tests.support.serve_thread import serving

pytestmark = pytest.mark.smoke
MODEL = "smoke-serve"
KEY_ENV, KEY = "SERVE_FRONTIER_KEY", "sk-serve-smoke-secret"


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result


@pytest.fixture(scope="module")
def version(tiny_model_dir, mlflow_uri, tmp_path_factory):
    """A registered tiny expert with a cascade threshold, its frontier (a perfect fake) still up."""
    tmp = tmp_path_factory.mktemp("serve")
    gold = {r["text"].strip(): r["queue"] for r in shipped_rows("tickets/tickets.jsonl")}
    with pytest.MonkeyPatch.context() as mp, \
            FakeOpenAIServer(lambda body: gold.get(body["messages"][-1]["content"], "billing"), api_key=KEY) as srv:
        isolate(mp, mlflow_uri, tmp, **{KEY_ENV: KEY})
        recipe = shipped_recipe("ticket-classification", **{
            "name": "smoke-serve",
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "seed": 5},
            "eval.baselines": [{"name": "frontier", "kind": "openai", "model": "fake", "base_url": srv.base_url,
                                "api_key_env": KEY_ENV, "price_per_mtok": {"input": 2.5, "output": 10.0}}],
            "eval.gate": {"metric": "accuracy", "max_drop_vs_best_baseline": 1.0},
            "eval.cascade": {"target_metric": "accuracy", "target": 0.95},
            "registry.model_name": MODEL,
        })
        invoke("run", str(write_recipe(tmp, recipe)))
        run_dir = max((tmp / "runs" / "smoke-serve").iterdir())
        threshold = json.loads((run_dir / "eval/cascade.json").read_text())["threshold"]
        assert threshold is not None, "a perfect frontier lets the cascade reach the target"
        test_rows = [json.loads(line) for line in (run_dir / "prep/test.jsonl").read_text().splitlines()]
        eval_rows = {r["id"]: r for r in map(json.loads, (run_dir / "eval/predictions/expert.jsonl").read_text().splitlines())}
        yield SimpleNamespace(uri=f"models:/{MODEL}@challenger", tmp=tmp, srv=srv, gold=gold, threshold=threshold,
                              tests=test_rows, eval=eval_rows, env=dict(os.environ))


@pytest.fixture(scope="module")
def service(version):
    loaded = serve.load_service(version.uri, serve.ServeOptions(frontier_retries=0, frontier_timeout_s=5))
    yield loaded
    loaded.close()


def test_openai_client_gets_eval_answers_and_unsure_ones_escalate(version, service):
    assert service.version == "1" and service.expert.threshold == version.threshold
    rows = version.tests[:12]
    with serving(serve.create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        calls_before = len(version.srv.requests)
        answers = []
        for row in rows:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": row["text"]}])
            answers.append((row, raw.parse(), raw.headers))
        unsure = [a for a in answers if a[1].expert["escalate"]]
        assert unsure, "the tiny expert is unsure of some rows"
        for row, resp, headers in answers:
            expected = version.eval[row["id"]]
            # the served (merged, micro-batched, prefix-cached) expert answers as the eval stage measured it
            assert resp.expert["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)
            if resp.expert["confidence"] < version.threshold:
                assert resp.expert["escalated"] is True and headers["x-expert-escalated"] == "true"
                assert resp.choices[0].message.content == version.gold[row["text"]]
                assert resp.expert["expert_answer"] == expected["prediction"]
            else:
                assert resp.expert["escalated"] is False and headers["x-expert-escalated"] == "false"
                assert resp.choices[0].message.content == expected["prediction"]
        assert len(version.srv.requests) - calls_before == len(unsure)
        assert service.engine.prefix is not None and service.engine.fallbacks == 0, "the system prompt's cache was used"

        # the frontier goes down: unsure answers come back from the expert, flagged
        version.srv.stop()
        text = unsure[0][0]["text"]
        down = httpx.post(f"{url}/v1/predict", json={"text": text}, timeout=30)
        assert down.status_code == 200 and down.headers["x-expert-escalation-failed"] == "true"
        assert down.json()["answer"] == unsure[0][1].expert["expert_answer"] and "escalation_error" in down.json()

    # or 502, when configured so
    strict = serve.Service(service.expert, MODEL, "1", version.uri,
                           serve.ServeOptions(frontier_down="502", frontier_retries=0, frontier_timeout_s=5))
    try:
        with serving(serve.create_app(strict)) as url:
            assert httpx.post(f"{url}/v1/predict", json={"text": text}, timeout=30).status_code == 502
            assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        strict.close()


def test_the_version_records_its_evaluated_runtime_and_serving_refuses_another(version, service):
    """Eval ran the expert merged (the tiny base is full precision); the version says so, serve runs it so, and
    `--no-merge` is refused unless allowed, with the reason."""
    from mlflow import MlflowClient

    run_dir = max((version.tmp / "runs" / "smoke-serve").iterdir())
    record = json.loads((run_dir / "eval/record.json").read_text())
    assert record["runtime"]["adapter"] == "merged"
    assert service.expert.evaluated_runtime.adapter == "merged" and service.expert.runtime.adapter == "merged"
    tags = MlflowClient().get_model_version(MODEL, "1").tags
    assert tags["runtime"] == "adapter merged"
    refused = CliRunner().invoke(app, ["serve", version.uri, "--no-merge", "--port", "1"])
    assert refused.exit_code == 2, refused.output
    assert "evaluated with its adapter merged" in refused.output and "--allow-unevaluated-runtime" in refused.output
    allowed = serve.load_service(version.uri, serve.ServeOptions(merge=False, allow_unevaluated_runtime=True,
                                                                 escalate=False))
    try:
        assert allowed.expert.runtime.adapter == "separate"
        row = version.tests[0]
        answer = allowed.engine.submit(row["text"]).result(timeout=60)
        assert answer["confidence"] == pytest.approx(version.eval[row["id"]]["confidence"], abs=1e-3)
    finally:
        allowed.close()


def test_bounded_load_concurrent_clients_no_errors(version, service):
    """8 clients for 3 s: every request answered, latencies reported, and requests were batched."""
    local = serve.Service(service.expert, MODEL, "1", version.uri, serve.ServeOptions(escalate=False, max_batch=8))
    texts = [r["text"] for r in version.tests]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    try:
        with serving(serve.create_app(local)) as url:
            stop_at = time.monotonic() + 3.0

            def client(i: int) -> None:
                with httpx.Client(base_url=url, timeout=30) as http:
                    n = i
                    while time.monotonic() < stop_at:
                        started = time.perf_counter()
                        r = http.post("/v1/chat/completions", json={
                            "model": MODEL, "messages": [{"role": "user", "content": texts[n % len(texts)]}]})
                        with lock:
                            latencies.append(time.perf_counter() - started)
                            if r.status_code != 200:
                                failures.append(f"{r.status_code} {r.text[:200]}")
                        n += 8

            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            metrics = httpx.get(f"{url}/metrics").text
    finally:
        local.close()
    assert not failures, failures[:3]
    assert len(latencies) >= 16
    q = statistics.quantiles(latencies, n=20)
    print(f"\nload: {len(latencies)} requests from 8 clients in 3 s; p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p95 {q[18] * 1000:.1f} ms")
    single = int(next(line for line in metrics.splitlines() if line.startswith('expert_batch_size_bucket{le="1"}')).split()[-1])
    batches = int(next(line for line in metrics.splitlines() if line.startswith("expert_batch_size_count")).split()[-1])
    assert single < batches, "concurrent requests should share model calls"
    assert f'expert_requests_total{{endpoint="/v1/chat/completions",code="200"}} {len(latencies)}' in metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_and_stops_cleanly(version):
    port = free_port()
    env = {**version.env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", version.uri, "--port", str(port)],
        cwd=version.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "expert serve did not come up"
                time.sleep(0.5)
        assert health["model"] == MODEL and health["version"] == "1" and health["escalation"].startswith("on:")
        row = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"text": version.tests[0]["text"]}, timeout=30).json()
        assert row["model"] == MODEL and isinstance(row["answer"], str)
        assert row["confidence"] == pytest.approx(version.eval[version.tests[0]["id"]]["confidence"], abs=1e-4)
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=b"{", timeout=30)
        assert bad.status_code == 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"serving {MODEL} v1" in out and f"stopped serving {MODEL}" in out and KEY not in out


def test_export_merged_matches_adapter_logits_and_peft_dir_loads(version, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.registry import versions

    merged_dir, peft_dir = version.tmp / "merged", version.tmp / "peft"
    out = invoke("export", version.uri, "--format", "merged", "--out", str(merged_dir)).output
    assert "vllm serve" in out
    out = invoke("export", version.uri, "--format", "peft", "--out", str(peft_dir)).output
    assert "--enable-lora --lora-modules smoke-serve=" in out
    refused = CliRunner().invoke(app, ["export", version.uri, "--format", "peft", "--out", str(peft_dir)])
    assert refused.exit_code == 2 and "--force" in refused.output
    _, expert = versions.load_version(version.uri)  # base + adapter, unmerged

    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert {"adapter_config.json", "adapter_model.safetensors", "expert.json"} <= {p.name for p in peft_dir.iterdir()}
    card = json.loads((merged_dir / "expert.json").read_text())
    assert card["spec"] == expert.spec and card["cascade_threshold"] == version.threshold

    tok = expert.tokenizer
    prompts = [tok.apply_chat_template([{"role": "system", "content": expert.system_prompt},
                                        {"role": "user", "content": r["text"]}], tokenize=False, add_generation_prompt=True)
               for r in version.tests[:4]]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.inference_mode():
        adapter_logits = expert.model(**enc).logits
        merged_logits = merged(**enc).logits
        with expert.model.disable_adapter():
            base_logits = expert.model(**enc).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_dir).eval()
        peft_logits = reloaded(**enc).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3, "the adapter must change the logits for this to mean anything"
    # the merge runs in fp32: it equals the fp32 adapter model; the served model may run in bf16 on this CPU
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)
    bf16_served = expert.model.dtype == torch.bfloat16
    tolerance = 3e-2 if bf16_served else 1e-5
    torch.testing.assert_close(peft_logits, adapter_logits.float(), atol=tolerance, rtol=tolerance)


def test_extraction_answers_are_schema_objects_over_http(tiny_model_dir, tmp_path):
    """The served extraction path (constrained decoding through predict.answer) on the tiny model, no registry."""
    import jsonschema

    from pipeline.inference import models
    from pipeline.recipe.schema import load_recipe
    from pipeline.tasks import extraction

    recipe = load_recipe(write_recipe(tmp_path, shipped_recipe(
        "schema-extraction", **{"model.base": str(tiny_model_dir), "eval.max_new_tokens": 48})))
    schema = recipe.task.json_schema
    tokenizer = models.load_tokenizer(tiny_model_dir)
    expert = SimpleNamespace(recipe=recipe, spec=schema, tokenizer=tokenizer, threshold=None, frontier=None,
                             system_prompt=extraction.system_prompt(recipe.task.instruction, schema),
                             model=models.load_base_model(recipe.model, tiny_model_dir).eval())
    service = serve.Service(expert, "orders", None, "local", serve.ServeOptions())
    try:
        with serving(serve.create_app(service)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            resp = client.chat.completions.create(
                model="orders", messages=[{"role": "user", "content": "Order A12345: 2 mugs arrived broken"}])
            jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
            row = httpx.post(f"{url}/v1/predict", json={"texts": ["3 lamps never came", "wrong colour"]}, timeout=120).json()
            for p in row["predictions"]:
                jsonschema.validate(p["answer"], schema)
                assert 0 < p["confidence"] <= 1 and p["escalate"] is False
    finally:
        service.close()


def test_a_served_expert_is_a_teacher_that_labels_as_it_was_evaluated(version, service, tmp_path, monkeypatch):
    """`data.teacher` pointed at `expert serve`: the test split's texts, their labels removed, come back labelled
    with the expert's evaluated answers, over real HTTP through the frontier client."""
    local = serve.Service(service.expert, MODEL, "1", version.uri, serve.ServeOptions(escalate=False, max_batch=8))
    evaluated = {r["text"]: version.eval[r["id"]]["prediction"] for r in version.tests}
    rows = [{"id": r["id"], "text": r["text"], "queue": None if r["text"].strip() in evaluated else r["queue"]}
            for r in shipped_rows("tickets/tickets.jsonl")]
    source = tmp_path / "tickets.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVED_TEACHER_KEY", "unused")
    try:
        with serving(serve.create_app(local)) as url:
            recipe = shipped_recipe("ticket-classification", **{
                "name": "taught-by-expert", "model.base": str(service.expert.base_source),
                "registry.model_name": "taught-by-expert"})
            recipe["data"]["source"] = str(source)
            recipe["data"]["teacher"] = {"model": MODEL, "base_url": f"{url}/v1", "api_key_env": "SERVED_TEACHER_KEY"}
            run_dir = tmp_path / "run"
            result = invoke("prep", str(write_recipe(tmp_path, recipe)), "--run-dir", str(run_dir))
            assert result.exit_code == 0, result.output
    finally:
        local.close()
    taught = [r for s in ("train", "validation", "router")
              for r in map(json.loads, (run_dir / f"prep/{s}.jsonl").read_text().splitlines())
              if r.get("provenance") == f"teacher:{MODEL}"]
    assert len(taught) == len(evaluated)
    assert all(r["target"] == evaluated[r["text"]] for r in taught), "the teacher's labels are the evaluated answers"


def test_a_version_stored_with_the_entry_file_of_earlier_releases_still_loads_in_mlflow(version, tmp_path):
    """Every registered version carries the MLflow entry file of the release that pushed it, and MLflow's own
    loader runs it: it imports `pipeline.expert_model.ExpertModel`, which must stay where it is. The version's
    files with its entry file replaced by the one versions were pushed with before `pipeline/` had subpackages
    (`tests/fixtures/`, a copy of that file as it was) load through `mlflow.pyfunc.load_model` and answer as eval did."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(version.uri, dst_path=str(tmp_path / "version")))
    [entry] = list(local.rglob("expert_model_entry.py"))
    entry.write_text((ROOT / "tests/fixtures/expert_model_entry_before_subpackages.py").read_text())
    model = mlflow.pyfunc.load_model(str(local))
    rows = version.tests[:4]
    answers = model.predict([r["text"] for r in rows])
    assert [a["answer"] for a in answers] == [version.eval[r["id"]]["prediction"] for r in rows]


def test_predict_flags_a_version_whose_weights_are_nan(version, monkeypatch, tmp_path):
    """Issue 33 #3 in `expert predict`: the registered version, its LoRA weights corrupted to NaN after loading
    (the registry refuses edited files, so the corruption is applied where it loads), answers no row as sure:
    each is written as strict JSON with `answer: null`, `expert_error`, and the frontier's failure (it is down)."""
    from pipeline.registry import versions

    real_load = versions.load_version

    def load_corrupted(uri):
        loaded, expert = real_load(uri)
        with torch.no_grad():
            next(p for name, p in expert.model.named_parameters() if "lora_A" in name).fill_(float("nan"))
        return loaded, expert

    monkeypatch.setattr(versions, "load_version", load_corrupted)
    monkeypatch.setenv(KEY_ENV, KEY)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in version.tests[:3]))
    result = CliRunner().invoke(app, ["predict", version.uri, "--input", str(inputs)])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} in the output")

    rows = [json.loads(line, parse_constant=refuse) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3
    for row in rows:
        assert row["answer"] is None and row["confidence"] is None and row["escalate"] is True, row
        assert "nan, not a probability" in row["expert_error"] and row["escalation_error"]
