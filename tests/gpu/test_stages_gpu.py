"""The stages on a GPU, on the tiny model: `expert run` (prep, train with padding-free `auto`, eval, push) and
`expert serve` answering; QLoRA through the stage's own loading and TRL's SFTTrainer, and a QLoRA run evaluated and
served; eval's label scoring and constrained extraction on CUDA equal to the CPU's in fp32, and the runtime eval
actually runs (merged, bf16 on a GPU) within bf16's tolerance of the CPU's fp32; `expert predict` and the merged
export on the device; a Llama-3-shaped tokenizer (its own pad token, two eos ids) trained, evaluated and answering.

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
from tests.conftest import isolate, shipped_recipe, write_recipe
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
        isolate(mp, f"sqlite:///{tmp / 'mlflow.db'}", tmp)  # a lent GPU machine has no MLflow server
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
    sharded objects all the same), in bf16 with gradient checkpointing as users run them: the adapter is gathered
    whole, loads, and gives the validation loss the trained model had. A rank-0 `save_pretrained` there writes
    sharded or empty LoRA tensors, or waits for the other ranks; checkpointing under ZeRO-3 without TRL's
    `use_reentrant=True` fails in backward. (On the CPU dry run accelerate runs each as one plain process in fp32,
    which the run records.)"""
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
    precision = "bf16" if DEVICE.type == "cuda" else "fp32"  # the CPU has no fast bf16: its dry run checks the code
    raw["train"].update(precision=precision, gradient_checkpointing=True, learning_rate=1e-2, max_steps=6, eval_steps=6)
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
    assert record["precision"] == precision

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
    # the same weights and rows: fp32 agrees to rounding; bf16 to its 8-bit mantissa summed over a loss
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    assert reloaded == pytest.approx(json.loads((run_dir / "train/metrics.json").read_text())["eval_loss"], rel=tolerance)
    with model.disable_adapter():
        untrained = trainer.evaluate()["eval_loss"]
    assert abs(untrained - reloaded) > 5 * tolerance * reloaded, "the check can tell a trained adapter from none"


# bf16 keeps 8 bits of mantissa: a probability near 0.5 moves by up to ~2e-3 per rounding, and the two devices
# round a forward pass's many products differently; fp32 on the CPU (no bf16 there) is the exact reference
BF16_CONFIDENCE_TOLERANCE = 2e-2


def eval_runtime_on_this_device(run_dir):
    """The expert as eval ran it: the recorded base in training's precision on DEVICE, its adapter merged where
    it can be, eval's speed-ups installed (`runtime.prepare`)."""
    from pipeline.evaluation import inference
    from pipeline.inference import runtime
    from pipeline.run import contracts

    recipe = Recipe.model_validate(__import__("yaml").safe_load((run_dir / "recipe.yaml").read_text()))
    trained = contracts.read_record(run_dir / "train/record.json", contracts.TrainRecord)
    model, tokenizer = inference.load_expert(recipe, trained, run_dir / "train/adapter")
    model, ran = runtime.prepare(model, recipe)
    return recipe, trained, model, tokenizer, ran


def spec_of(run_dir):
    from pipeline.run.stage_documents import read_spec

    return read_spec(run_dir / "prep/spec.json")


def test_label_scores_of_the_runtime_eval_runs_on_the_gpu_match_the_cpus_fp32(pipeline_run):
    """Eval and serving run the merged adapter in training's precision (bf16 on a GPU): its label probabilities on
    DEVICE agree with the CPU's fp32 merged model within bf16's tolerance, and its answer is the CPU's wherever the
    CPU's margin between the two likeliest labels is wider than that tolerance."""
    from peft import PeftModel

    run_dir, _, _ = pipeline_run
    recipe, trained, here, tokenizer, ran = eval_runtime_on_this_device(run_dir)
    assert ran.adapter == "merged" and here.device == DEVICE
    assert json.loads((run_dir / "eval/record.json").read_text())["precision"] == trained.precision
    if DEVICE.type == "cuda":
        assert trained.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    base = models.load_base_model(recipe.model, models.recorded_base(trained.base), "fp32")
    cpu = PeftModel.from_pretrained(base, run_dir / "train/adapter").merge_and_unload().eval()
    spec = spec_of(run_dir)
    texts = predict.prompt_texts(tokenizer, [predict.expert_prompt(spec.system_prompt, t) for t in TEXTS])
    want = torch.tensor(predict.score_labels(cpu, tokenizer, texts, spec.spec)).softmax(-1)
    got = torch.tensor(predict.score_labels(here, tokenizer, texts, spec.spec)).softmax(-1)
    assert torch.allclose(got, want, atol=BF16_CONFIDENCE_TOLERANCE), (got - want).abs().max()
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_CONFIDENCE_TOLERANCE
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_expert_predict_and_the_merged_export_answer_on_the_gpu_as_served(pipeline_run, tmp_path, monkeypatch):
    """`expert predict` answers with the version on DEVICE as `expert serve` would; `expert export --format merged`
    writes a plain model that, loaded on DEVICE in eval's precision, gives the same answers within bf16's tolerance."""
    from transformers import AutoModelForCausalLM

    run_dir, _, env = pipeline_run
    for key in ("MLFLOW_TRACKING_URI", "EXPERT_CACHE"):
        monkeypatch.setenv(key, env[key])
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    rows = [json.loads(line) for line in invoke("predict", f"models:/{MODEL_NAME}@challenger", "--input", str(inputs),
                                                  "--no-escalate").stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == TEXTS
    _, trained, served, tokenizer, _ = eval_runtime_on_this_device(run_dir)
    spec = spec_of(run_dir)
    prompts_ = [predict.expert_prompt(spec.system_prompt, t) for t in TEXTS]
    want = predict.classify(served, tokenizer, prompts_, spec.spec, 4)
    assert [r["answer"] for r in rows] == [w["prediction"] for w in want]
    assert [r["confidence"] for r in rows] == pytest.approx([w["confidence"] for w in want], abs=CONFIDENCE_TOLERANCE)

    out = tmp_path / "merged"
    invoke("export", f"models:/{MODEL_NAME}@challenger", "--format", "merged", "--out", str(out))
    dtype = getattr(torch, models.TORCH_DTYPE_NAMES[trained.precision])
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=models.inference_device_map()).eval()
    assert exported.device == DEVICE and not any("lora" in n for n, _ in exported.named_parameters())
    got = predict.classify(exported, models.load_tokenizer(out), prompts_, spec.spec, 4)
    for g, w in zip(got, want):
        assert g["confidence"] == pytest.approx(w["confidence"], abs=BF16_CONFIDENCE_TOLERANCE)
        if w["confidence"] > 0.5 + BF16_CONFIDENCE_TOLERANCE:
            assert g["prediction"] == w["prediction"]


def small_run(tmp_path, monkeypatch, name: str, **overrides):
    """`expert run` on a tiny base: 2 training steps, no baselines, a gate any expert passes, registered as
    `name`; the run directory."""
    isolate(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    recipe = shipped_recipe("ticket-classification", **{
        "name": name, "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 2e-3, "eval_steps": 2},
        "eval.baselines": [], "eval.gate": {"metric": "accuracy", "max_drop_vs_best_baseline": 1.0},
        "registry.model_name": name, **overrides})
    invoke("run", str(write_recipe(tmp_path, recipe)))
    return max((tmp_path / "runs" / name).iterdir())


def test_qlora_trains_evaluates_and_is_served_on_the_gpu(tiny_model_dir, tmp_path, monkeypatch):
    run_dir = small_run(tmp_path, monkeypatch, "gpu-qlora", **{"model.base": str(tiny_model_dir),
                                                                 "model.quantization": "4bit"})
    assert json.loads((run_dir / "eval/record.json").read_text())["runtime"]["adapter"] == "separate"
    service = serve.load_service("models:/gpu-qlora@challenger", serve.ServeOptions(escalate=False))
    try:
        import bitsandbytes as bnb

        quantized = [m for m in service.expert.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and all(m.weight.device == DEVICE for m in quantized), "served on its 4-bit base"
        with serving(serve.create_app(service)) as url:
            reply = httpx.post(f"{url}/v1/predict", json={"text": "I was charged twice for my order"}, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["answer"] in service.expert.spec and 0 < reply.json()["confidence"] <= 1
    finally:
        service.close()


@pytest.fixture(scope="module")
def llama3_model_dir(tmp_path_factory):
    from tests.conftest import shipped_rows
    from tests.support.tiny_model import build_tiny_llama3_model

    texts = [r["text"] for r in shipped_rows("tickets/tickets.jsonl")]
    return build_tiny_llama3_model(tmp_path_factory.mktemp("llama3") / "model", texts)


def test_a_llama3_shaped_tokenizer_trains_evaluates_and_answers_stopping_at_either_eos(
        llama3_model_dir, tmp_path, monkeypatch):
    """A pad token of its own, `<|eot_id|>` ending the turn and `<|end_of_text|>` ending generation too: the run
    trains, evaluates and registers; labels are scored up to `<|eot_id|>`; generation stops at `<|end_of_text|>`."""
    run_dir = small_run(tmp_path, monkeypatch, "gpu-llama3", **{"model.base": str(llama3_model_dir)})
    assert json.loads((run_dir / "train/metrics.json").read_text())["steps"] == 2
    assert (run_dir / "push/registered.json").is_file()
    _, _, model, tokenizer, _ = eval_runtime_on_this_device(run_dir)
    eot, end_of_text = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert tokenizer.eos_token_id == eot and tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert predict.stop_ids(model, tokenizer) == [eot, end_of_text]
    spec = spec_of(run_dir)
    prompts_ = [predict.expert_prompt(spec.system_prompt, t) for t in TEXTS[:4]]
    answers = predict.classify(model, tokenizer, prompts_, spec.spec, 4)
    assert all(a["prediction"] in spec.spec and 0 < a["confidence"] <= 1 for a in answers)

    free = predict.generate(model, tokenizer, prompts_, 8, 4)
    assert all(r["raw"] for r in free), "without a stop the tiny model writes text"
    first = {"pass": True}

    def end_of_text_first(module, args, logits):  # the prefill's last position picks the first answer token
        if first.pop("pass", False):
            logits[:, -1, end_of_text] = logits.max() + 100
        return logits

    hook = model.get_output_embeddings().register_forward_hook(end_of_text_first)
    try:
        stopped = predict.generate(model, tokenizer, prompts_, 8, 4)
    finally:
        hook.remove()
    assert [r["raw"] for r in stopped] == [""] * 4, "generation stops at <|end_of_text|>, not only at <|eot_id|>"
