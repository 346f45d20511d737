"""Tests of the test-support helpers: fake OpenAI server, real MLflow server, tiny model.

Imports are relative so this file collects both under ``python -m pytest`` and
the bare ``pytest`` entry point (which does not put the repo root on sys.path).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import pytest

from .openai_server import FakeOpenAIServer

# --------------------------------------------------------------------------
# FakeOpenAIServer
# --------------------------------------------------------------------------

openai = pytest.importorskip("openai")


def _echo_label(body: dict) -> str:
    return "billing" if "charged" in body["messages"][-1]["content"] else "other"


MESSAGES = [
    {"role": "system", "content": "Route the ticket."},
    {"role": "user", "content": "my card was charged twice"},
]


def test_openai_normal_answer_with_usage():
    with FakeOpenAIServer(_echo_label, api_key="sk-test") as srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.base_url.endswith("/v1")
        client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        resp = client.chat.completions.create(model="gpt-test", messages=MESSAGES, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-test"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "billing"
    assert choice.finish_reason == "stop"
    # 3 words in the system message + 5 in the user message; 1 in the answer.
    assert resp.usage.prompt_tokens == 8
    assert resp.usage.completion_tokens == 1
    assert resp.usage.total_tokens == 9
    assert len(srv.requests) == 1
    assert srv.requests[0]["model"] == "gpt-test"
    assert srv.requests[0]["messages"] == MESSAGES
    assert srv.requests[0]["temperature"] == 0


def test_openai_wrong_key_is_401():
    with FakeOpenAIServer(_echo_label, api_key="sk-right") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.body["type"] == "invalid_request_error"
    assert srv.requests == []  # rejected before being recorded


def test_openai_no_key_configured_accepts_any():
    with FakeOpenAIServer(lambda body: "ok") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="anything", max_retries=0)
        assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "ok"


def test_openai_429_then_success_is_retried():
    with FakeOpenAIServer(_echo_label, api_key="k") as srv:
        srv.faults.append(("status", 429, {"Retry-After": "0"}))
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=2)
        resp = client.chat.completions.create(model="m", messages=MESSAGES)
        assert resp.choices[0].message.content == "billing"
        assert len(srv.requests) == 2  # the rate-limited attempt and the retry
        assert srv.faults == []


def test_openai_faults_surface_without_retries():
    with FakeOpenAIServer(_echo_label) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
        srv.faults.extend([("status", 500, {}), ("status", 429, {"Retry-After": "0"})])
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=MESSAGES)

        srv.faults.append(("malformed",))
        with pytest.raises(ValueError):  # the SDK surfaces json.JSONDecodeError
            client.chat.completions.create(model="m", messages=MESSAGES)

        srv.faults.append(("delay", 1.0))
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.2).chat.completions.create(model="m", messages=MESSAGES)

        srv.faults.append(("delay", 0.05))
        t0 = time.monotonic()
        assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "billing"
        assert time.monotonic() - t0 >= 0.05
        assert len(srv.requests) == 5


def test_openai_unknown_path_404_and_concurrency():
    with FakeOpenAIServer(lambda body: "x y z") as srv:
        root = srv.base_url.rsplit("/v1", 1)[0]
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(root + "/v1/nope", data=b"{}", method="POST"))
        assert info.value.code == 404
        assert "error" in json.loads(info.value.read())

        from concurrent.futures import ThreadPoolExecutor

        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(
                lambda i: client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"q {i}"}]),
                range(16)))
        assert all(r.usage.completion_tokens == 3 for r in results)
        assert sorted(r["messages"][0]["content"] for r in srv.requests) == sorted(f"q {i}" for i in range(16))


# --------------------------------------------------------------------------
# Real MLflow server
# --------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_mlflow_server_tracking_and_registry(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from .mlflow_server import mlflow_server

    with mlflow_server(tmp_path / "mlflow") as uri:
        assert uri.startswith("http://127.0.0.1:")
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp_id = client.create_experiment("support-test")
        run = client.create_run(exp_id)
        run_id = run.info.run_id
        client.log_metric(run_id, "accuracy", 0.75, step=1)
        client.log_param(run_id, "lr", "0.001")
        artifact = tmp_path / "note.txt"
        artifact.write_text("hello")
        client.log_artifact(run_id, str(artifact), artifact_path="model")
        client.set_terminated(run_id)

        got = client.get_run(run_id)
        assert got.data.metrics["accuracy"] == pytest.approx(0.75)
        assert got.data.params["lr"] == "0.001"
        assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/note.txt"]
        # proxied artifact store lands under workdir/artifacts
        assert list((tmp_path / "mlflow" / "artifacts").rglob("note.txt"))

        name = "support-test-model"
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"{got.info.artifact_uri}/model", run_id=run_id)
        client.set_registered_model_alias(name, "challenger", mv.version)
        by_alias = client.get_model_version_by_alias(name, "challenger")
        assert by_alias.version == mv.version
        assert by_alias.run_id == run_id
    log = (tmp_path / "mlflow" / "mlflow-server.log").read_text()
    assert "/health" in log


def test_mlflow_server_failure_raises_with_log_tail(tmp_path, monkeypatch):
    from . import mlflow_server as mod

    def bad_command(workdir, port):
        import sys
        return [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]

    monkeypatch.setattr(mod, "server_command", bad_command)
    with pytest.raises(RuntimeError, match="boom: bad flag"):
        with mod.mlflow_server(tmp_path, timeout=30):
            pass


# --------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------

ROWS = [
    ("my card was charged twice", "billing"),
    ("my package never arrived", "shipping"),
    ("the app crashes on start", "technical"),
    ("please reset my password", "account"),
    ("I want a refund for my order", "billing"),
    ("where is my parcel?", "shipping"),
    ("error 500 on the login page", "technical"),
    ("change the email on my profile", "account"),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from .tiny_model import build_tiny_model

    texts = [u for u, _ in ROWS] + [a for _, a in ROWS] + ["Route it."]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, seed=0)


def test_tiny_model_loads_via_auto_classes(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert 1000 <= len(tok) <= 2000
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.unk_token is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied

    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "hi there"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert prompt == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert full == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"

    for text in ["The zebra's xylophone costs €12.50 — naïve café! 🙂\n\ttabs", "my card was charged twice"]:
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids  # nothing added automatically
        assert tok.decode(ids) == text
    assert tok("<|im_end|>")["input_ids"] == [tok.eos_token_id]

    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 4


def test_tiny_model_is_deterministic(tmp_path, tiny_model_dir):
    from .tiny_model import build_tiny_model

    texts = [u for u, _ in ROWS] + [a for _, a in ROWS] + ["Route it."]
    again = build_tiny_model(tmp_path / "again", texts, seed=0)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_tiny_model_trains_with_trl_sft_lora(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = Dataset.from_list([
        {
            "prompt": [{"role": "system", "content": "Route it."}, {"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": label}],
        }
        for user, label in ROWS
    ])
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,                        # SFTConfig defaults bf16=True (CPU autocast: slow, lossy)
        activation_checkpointing=False,    # SFTConfig defaults gradient_checkpointing=True
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert trainer.completion_only_loss is True  # inferred from the prompt/completion columns

    # Only the answer (and the end-of-turn that follows it) counts toward the loss.
    ex = trainer.train_dataset[0]
    assert tok.decode(ex["input_ids"]) == (
        "<|im_start|>system\nRoute it.<|im_end|>\n<|im_start|>user\nmy card was charged twice<|im_end|>\n"
        "<|im_start|>assistant\nbilling<|im_end|>\n"
    )
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(trained) == "billing<|im_end|>\n"
    first = ex["labels"].index(next(lab for lab in ex["labels"] if lab != -100))
    assert all(lab == -100 for lab in ex["labels"][:first])
    assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 3

    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.training_loss)
    assert trainer.state.global_step == 2
