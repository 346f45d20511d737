"""The stages on a GPU, on the tiny model: `expert run` (prep, train with padding-free `auto`, eval, push) and
`expert serve` answering; QLoRA through the stage's own loading and TRL's SFTTrainer; eval's label scoring and
constrained extraction on CUDA equal to the CPU's.

Marked `gpu` and skipped without CUDA. `EXPERT_GPU_TESTS_ON_CPU=1` runs them on the CPU instead (the device is
then the CPU on both sides): a dry run of this module's own code, so that the few minutes of a lent GPU are not
spent finding a typo. MLflow is a local SQLite store here (a lent GPU machine has no MLflow server).
"""

from __future__ import annotations

import json
import os
import traceback

import httpx
import pytest
import torch
from typer.testing import CliRunner

from pipeline import serving as serve
from pipeline.cli import app
from pipeline.inference import answering as predict
from pipeline.inference import models
from pipeline.recipe.schema import Recipe
from pipeline.run.rundir import open_run
from pipeline.training import setup
from tests.conftest import shipped_recipe, write_recipe
from tests.support.serve_thread import serving

ON_CPU = os.environ.get("EXPERT_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU),
                       reason="needs a CUDA GPU (scripts/gpu_check.sh on a lent one; EXPERT_GPU_TESTS_ON_CPU=1 dry-runs)"),
]
MODEL_NAME = "gpu-router"
# fp32 on both devices (no TF32 in PyTorch's default matmuls): softmax probabilities agree to ~1e-6
CONFIDENCE_TOLERANCE = 1e-4


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + "".join(traceback.format_exception(*result.exc_info))
    return result


@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, tmp_path_factory):
    """`expert run` on the tiny model: a run directory with every stage done and a registered version."""
    tmp = tmp_path_factory.mktemp("gpu-run")
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.endswith("_API_KEY")]:
            mp.delenv(name)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("EXPERT_CACHE", str(tmp / "cache"))
        mp.chdir(tmp)
        recipe = shipped_recipe("ticket-classification", **{
            "name": "gpu-run",
            "model.base": str(tiny_model_dir),
            "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 2e-3, "eval_steps": 3, "padding_free": "auto"},
            "eval.baselines": [{"name": "base-zero-shot", "kind": "base_model"}],
            "eval.gate": {"metric": "accuracy", "max_drop_vs_best_baseline": 1.0},
            "registry.model_name": MODEL_NAME,
        })
        recipe_path = write_recipe(tmp, recipe)
        invoke("run", str(recipe_path))
        run_dir = max((tmp / "runs" / "gpu-run").iterdir())
        yield run_dir, recipe_path, dict(os.environ)


def test_expert_run_trains_on_the_gpu_with_the_settings_it_records(pipeline_run):
    run_dir, _, _ = pipeline_run
    assert json.loads((run_dir / "train/metrics.json").read_text())["steps"] == 6
    record = json.loads((run_dir / "train/record.json").read_text())
    assert record["launch"] == "single"
    if DEVICE.type == "cuda":
        assert record["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        assert record["attention"] in (*models.VARLEN_ATTENTION, "sdpa")
    assert record["padding_free"] == (record["attention"] in models.VARLEN_ATTENTION), record["padding_free_reason"]
    assert json.loads((run_dir / "eval/record.json").read_text())["precision"] == record["precision"]
    verdict = json.loads((run_dir / "eval/verdict.json").read_text())
    assert verdict["decision"] in ("replace", "cascade", "keep_frontier")
    assert (run_dir / "push/registered.json").is_file()


def test_expert_serve_answers_from_the_gpu(pipeline_run, monkeypatch):
    _, _, env = pipeline_run
    for key in ("MLFLOW_TRACKING_URI", "EXPERT_CACHE"):
        monkeypatch.setenv(key, env[key])
    service = serve.load_service(f"models:/{MODEL_NAME}@challenger", serve.ServeOptions(escalate=False))
    try:
        assert service.expert.model.device == DEVICE
        labels = service.expert.spec
        with serving(serve.create_app(service)) as url:
            for text in ("I was charged twice for my order", "where is my parcel", "reset my password please"):
                reply = httpx.post(f"{url}/v1/predict", json={"text": text}, timeout=60)
                assert reply.status_code == 200, reply.text
                assert reply.json()["answer"] in labels and 0 < reply.json()["confidence"] <= 1
    finally:
        service.close()


def test_qlora_through_the_stage_loader_and_sfttrainer(pipeline_run, tmp_path, monkeypatch):
    """The 4-bit base lands on this process's device (bitsandbytes quantizes where it loads), trains its adapter
    through TRL's SFTTrainer, and its quantized weights stay as they were."""
    import bitsandbytes as bnb
    import yaml

    run_dir, recipe_path, env = pipeline_run
    monkeypatch.setenv("EXPERT_CACHE", env["EXPERT_CACHE"])
    raw = yaml.safe_load(recipe_path.read_text())
    raw["model"]["quantization"] = "4bit"
    raw["train"].update(max_steps=3, eval_steps=3)
    recipe = Recipe.model_validate(raw)
    settings = setup.training_settings(recipe)
    config = setup.to_sft_config(recipe.train, tmp_path / "checkpoints", recipe.data.max_tokens, settings)
    _, tokenizer, model = setup.load_for_training(recipe, models.resolve_base(recipe.model.base)[1], settings, "single",
                                                  config.device)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device == DEVICE for m in quantized)
    before = {id(m): m.weight.detach().clone() for m in quantized}
    trainer = setup.build_trainer(recipe, open_run(run_dir), config, tokenizer, model, [])
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n), "the adapter moved"
    assert all(torch.equal(m.weight.detach(), before[id(m)]) for m in quantized), "4-bit base weights unchanged"


def sharpened(model):
    """Logits scaled 30x (the final norm's weight): a random tiny model's next-token scores are nearly uniform,
    and a greedy choice between near-ties could fairly go either way on two devices' kernels."""
    with torch.no_grad():
        model.model.norm.weight.mul_(30)
    return model


def load_pair(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = models.load_tokenizer(tiny_model_dir)
    cpu = sharpened(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)).eval()
    here = sharpened(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                          device_map=models.inference_device_map())).eval()
    assert here.device == DEVICE
    return tokenizer, cpu, here


TEXTS = ["I was charged twice for my order", "where is my parcel", "reset my password please",
         "the app crashes when I upload a photo", "cancel my subscription", "refund for the broken item",
         "how do I change my delivery address", "my invoice shows the wrong VAT number"]
QUEUES = ["billing", "shipping", "technical support", "account", "refunds"]


def prompts(texts):
    return [[{"role": "system", "content": "Route the ticket to one queue."}, {"role": "user", "content": t}]
            for t in texts]


@pytest.mark.parametrize("one_pass_tokens", [predict.ONE_PASS_TOKENS, 0], ids=["one-pass", "pruned"])
def test_label_scoring_on_the_gpu_equals_the_cpu(tiny_model_dir, one_pass_tokens):
    tokenizer, cpu, here = load_pair(tiny_model_dir)
    want = predict.classify(cpu, tokenizer, prompts(TEXTS), QUEUES, 4, one_pass_tokens=one_pass_tokens)
    got = predict.classify(here, tokenizer, prompts(TEXTS), QUEUES, 4, one_pass_tokens=one_pass_tokens)
    assert [g["prediction"] for g in got] == [w["prediction"] for w in want]
    for g, w in zip(got, want):
        assert g["confidence"] == pytest.approx(w["confidence"], abs=CONFIDENCE_TOLERANCE)


def test_constrained_extraction_on_the_gpu_equals_the_cpu(tiny_model_dir):
    schema = {"type": "object", "additionalProperties": False, "required": ["order_id", "urgent"],
              "properties": {"order_id": {"type": "string", "maxLength": 12}, "urgent": {"type": "boolean"}}}
    tokenizer, cpu, here = load_pair(tiny_model_dir)
    want = predict.generate(cpu, tokenizer, prompts(TEXTS), 24, 4, schema=schema)
    got = predict.generate(here, tokenizer, prompts(TEXTS), 24, 4, schema=schema)
    assert [g["raw"] for g in got] == [w["raw"] for w in want]
    for g, w in zip(got, want):
        assert set(json.loads(g["raw"])) == {"order_id", "urgent"}
        assert g["confidence"] == pytest.approx(w["confidence"], abs=CONFIDENCE_TOLERANCE)


@pytest.mark.parametrize(("config", "launch"), [("fsdp.yaml", "fsdp"), ("deepspeed-zero3.yaml", "zero3")])
def test_the_adapter_written_under_a_sharded_launch_reloads_to_the_loss_training_measured(
        pipeline_run, tmp_path, config, launch):
    """`accelerate launch` with the shipped FSDP2 and ZeRO-3 configs (one process on this GPU; the parameters are
    sharded objects all the same): the adapter is gathered whole, loads, and gives the validation loss the trained
    model had. A rank-0 `save_pretrained` there writes sharded or empty LoRA tensors, or waits for the other ranks.
    (On the CPU dry run accelerate runs each as one plain process, which the run records.)"""
    import importlib.util
    import subprocess
    import sys

    if launch == "zero3" and DEVICE.type == "cuda" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (scripts/gpu_wheels.sh builds its wheel for the device check)")

    import yaml
    from datasets import Dataset
    from trl import SFTTrainer

    from pipeline.evaluation import inference
    from pipeline.run import contracts
    from tests.conftest import ROOT

    _, recipe_path, env = pipeline_run
    raw = yaml.safe_load(recipe_path.read_text())
    raw["name"] = f"gpu-{launch}"
    raw["train"].update(precision="fp32", learning_rate=1e-2, max_steps=6, eval_steps=6)
    recipe_file = write_recipe(tmp_path, raw)
    run_dir = tmp_path / "run"
    invoke("prep", str(recipe_file), "--run-dir", str(run_dir))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "pipeline/launch" / config),
                  "--num_processes", "1", *([] if DEVICE.type == "cuda" else ["--cpu"])]
    proc = subprocess.run([*accelerate, "-m", "pipeline.cli", "train", str(recipe_file), "--run-dir", str(run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((run_dir / "train/record.json").read_text())
    assert record["launch"] == (launch if DEVICE.type == "cuda" else "single")

    recipe = Recipe.model_validate(raw)
    trained = contracts.read_record(run_dir / "train/record.json", contracts.TrainRecord)
    model, tokenizer = inference.load_expert(recipe, trained, run_dir / "train/adapter")
    rows = [json.loads(line) for line in (run_dir / "prep/validation.jsonl").read_text().splitlines()]
    config = setup.to_sft_config(recipe.train, tmp_path / "eval", recipe.data.max_tokens,
                                       setup.training_settings(recipe))
    validation = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=validation,
                         eval_dataset=validation)  # only evaluated: the train split is required, never used
    reloaded = trainer.evaluate()["eval_loss"]
    assert reloaded == pytest.approx(json.loads((run_dir / "train/metrics.json").read_text())["eval_loss"], rel=1e-4)
    with model.disable_adapter():
        untrained = trainer.evaluate()["eval_loss"]
    assert abs(untrained - reloaded) > 100 * 1e-4 * reloaded, "the check can tell a trained adapter from none"
