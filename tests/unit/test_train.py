"""Unit tests of the train stage's pure parts: configs, precision, answer-only labels, checkpoint seals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.inference import models
from pipeline.recipe.schema import AdapterSection, ModelSection, Recipe, TrainSection
from pipeline.run.rundir import RunDir
from pipeline.training import checkpoints, setup
from tests.conftest import shipped_recipe


def test_lora_config_methods():
    plain = models.to_lora_config(AdapterSection(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (plain.r, plain.lora_alpha, plain.lora_dropout) == (8, 16, 0.1)
    assert set(plain.target_modules) == {"q_proj", "v_proj"}
    assert not plain.use_dora and not plain.use_rslora
    dora = models.to_lora_config(AdapterSection(method="dora", rslora=True))
    assert dora.use_dora and dora.use_rslora


def test_qlora_is_nf4_with_double_quantisation():
    config = models.to_bnb_config("4bit")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
    assert models.to_bnb_config("8bit").load_in_8bit


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, "fp32"),  # a CPU without AVX512-BF16/AMX
        ("auto", False, True, "bf16"),  # a CPU with them
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp16"),
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),
    ],
)
def test_choose_precision(requested, cuda, bf16, expected):
    assert models.choose_precision(requested, cuda, bf16) == expected


def test_precision_the_hardware_cannot_run_is_an_error():
    with pytest.raises(UserError, match="train.precision: fp16 needs a GPU"):
        models.choose_precision("fp16", False, False)
    with pytest.raises(UserError, match="no bf16 support"):
        models.choose_precision("bf16", True, False)


def test_sft_config_sets_every_default_trl_changes(tmp_path):
    section = TrainSection(eval_steps=10, save_steps=20, keep_checkpoints=3, learning_rate=3e-4)
    config = setup.to_sft_config(section, tmp_path, max_tokens=128)
    assert not config.bf16 and not config.fp16
    assert not config.gradient_checkpointing and not config.activation_checkpointing
    assert config.learning_rate == 3e-4
    assert (config.eval_strategy, config.eval_steps, config.save_steps, config.save_total_limit) == ("steps", 10, 20, 3)
    assert config.load_best_model_at_end and config.metric_for_best_model == "eval_loss" and not config.greater_is_better
    assert config.train_sampling_strategy == "group_by_length" and not config.packing
    assert config.completion_only_loss and config.max_length == 128
    assert config.logging_nan_inf_filter is False
    assert config.include_num_input_tokens_seen == "non_padding"
    checkpointed = setup.to_sft_config(
        TrainSection(gradient_checkpointing=True), tmp_path, 128, {"precision": "bf16", "padding_free": True}
    )
    assert checkpointed.gradient_checkpointing and checkpointed.bf16 and checkpointed.padding_free
    assert checkpointed.max_length is None, "TRL refuses a max_length it would not enforce (padding-free, no packing)"



def test_zero3_reentrant_checkpointing_reaches_the_layers_transformers_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """TRL forces `use_reentrant=True` for PEFT under ZeRO-3 (DeepSpeed < 0.19.8 fails without it) by writing
    `gradient_checkpointing_kwargs`; transformers 5 checkpoints each layer with `activation_checkpointing_kwargs`.
    Through the real SFTTrainer, the function the layers call must get TRL's choice. DeepSpeed itself is not
    installed on a CPU: TRL sees a real ZeRO-3 plugin, the accelerator gets none (a CPU cannot run it)."""
    import functools

    from accelerate.utils import DeepSpeedPlugin
    from datasets import Dataset
    from transformers import Trainer
    from trl import SFTTrainer

    config = setup.to_sft_config(TrainSection(gradient_checkpointing=True, max_steps=1), tmp_path, 64)
    config.deepspeed_plugin = DeepSpeedPlugin(zero_stage=3)
    build_accelerator_args = Trainer._build_accelerator_args
    monkeypatch.setattr(Trainer, "_build_accelerator_args",
                        lambda self, **kw: {**build_accelerator_args(self, **kw), "deepspeed_plugin": None})
    rows = Dataset.from_list([pair("ticket about a refund", "billing", i) for i in range(4)])
    trainer = SFTTrainer(model=str(tiny_model_dir), args=config, train_dataset=rows, eval_dataset=rows,
                         peft_config=models.to_lora_config(AdapterSection()))
    trainer.train()  # transformers enables checkpointing here, then one step runs through it
    checkpointed = [m._gradient_checkpointing_func for m in trainer.model.modules()
                    if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    assert checkpointed and all(isinstance(f, functools.partial) for f in checkpointed)
    assert all(f.keywords.get("use_reentrant") is True for f in checkpointed), [f.keywords for f in checkpointed]
    plain = setup.to_sft_config(TrainSection(gradient_checkpointing=True), tmp_path, 64)
    assert plain.activation_checkpointing_kwargs == {"use_reentrant": False}, "elsewhere transformers' default"

FA2, FA3 = ("flash_attention_2",), ("flash_attention_3", "flash_attention_2")


@pytest.mark.parametrize(
    ("requested", "cuda", "flash", "max_tokens", "precision", "expected"),
    [("auto", True, FA2, 128, "bf16", "flash_attention_2"), ("auto", True, FA3, 128, "fp16", "flash_attention_3"),
     ("auto", True, (), 128, "bf16", "sdpa"), ("auto", True, FA3, 128, "fp32", "sdpa"),
     ("auto", False, FA2, 128, "fp32", "eager"), ("auto", False, (), 512, "bf16", "eager"),
     ("auto", False, (), 513, "fp32", "sdpa"),
     ("sdpa", False, (), 128, "fp32", "sdpa"), ("eager", False, (), 4096, "fp32", "eager"),
     ("sdpa", True, FA3, 128, "fp32", "sdpa"),
     ("flash_attention_2", True, FA3, 128, "bf16", "flash_attention_2"),
     ("flash_attention_3", True, FA3, 128, "fp16", "flash_attention_3")],
)
def test_choose_attention(requested, cuda, flash, max_tokens, precision, expected):
    assert models.choose_attention(requested, cuda, flash, max_tokens, precision)[0] == expected


def test_auto_attention_says_fp32_kept_it_off_flash_attention():
    """Flash-attention's kernels take fp16/bf16 only: fp32 with flash-attn installed crashed in the first forward."""
    kernel, why = models.choose_attention("auto", True, FA3, 128, "fp32")
    assert kernel == "sdpa"
    assert "not flash_attention_3" in why and "fp16/bf16 only" in why and "train.precision is fp32" in why


def test_flash_attention_without_its_kernels_is_an_error():
    with pytest.raises(UserError, match="train.attention: flash_attention_2 needs a GPU and the flash-attn package"):
        models.choose_attention("flash_attention_2", False, FA2, 128, "bf16")
    with pytest.raises(UserError, match="flash_attention_3 needs a GPU and the flash-attn-3"):
        models.choose_attention("flash_attention_3", True, FA2, 128, "bf16")


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_asked_for_with_fp32_is_an_error_naming_both_keys(kernel):
    with pytest.raises(UserError, match=rf"train.attention: {kernel} takes fp16/bf16 only and train.precision is fp32"):
        models.choose_attention(kernel, True, FA3, 128, "fp32")


def pretend_a_gpu(monkeypatch, flash_installed: bool) -> None:
    """CUDA and flash-attn as transformers' package-metadata checks see them on a GPU machine (this one has none)."""
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash_installed)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: False)


def test_following_the_nan_advice_to_use_fp32_trains_with_sdpa_not_flash_attention(monkeypatch, tmp_path):
    """The NaN message says to try fp32; on a GPU with a working flash-attn that recipe must get SDPA and
    padding, not FA2 (fp32 tensors) and padding-free, and say why."""
    with pytest.raises(UserError, match="train.precision: fp32") as advice:
        setup.check_finite(float("nan"), "training loss", 7)
    assert "flash-attention takes fp16/bf16 only" in str(advice.value)
    flash_attn = tmp_path / "flash_attn"
    flash_attn.mkdir()
    (flash_attn / "__init__.py").write_text("")  # a flash-attn that imports
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    pretend_a_gpu(monkeypatch, flash_installed=True)
    recipe = Recipe.model_validate(shipped_recipe("ticket-classification", **{"train.precision": "fp32"}))
    settings = setup.training_settings(recipe)
    assert (settings["precision"], settings["attention"], settings["padding_free"]) == ("fp32", "sdpa", False)
    assert "train.precision is fp32" in settings["attention_reason"]
    bf16 = setup.training_settings(recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": "bf16"})}))
    assert (bf16["attention"], bf16["padding_free"]) == ("flash_attention_2", True), "the import check itself passes"
    explicit = recipe.train.model_copy(update={"attention": "flash_attention_2"})
    with pytest.raises(UserError, match="train.attention: flash_attention_2 takes fp16/bf16 only"):
        setup.training_settings(recipe.model_copy(update={"train": explicit}))


def test_a_flash_attn_wheel_that_does_not_import_is_not_chosen(monkeypatch, tmp_path):
    """A flash-attn wheel built for another torch has the package metadata transformers checks, and fails at import
    (an undefined symbol): auto must pick SDPA and record why, and an explicit choice must say it does not import."""
    broken = tmp_path / "flash_attn"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    pretend_a_gpu(monkeypatch, flash_installed=True)
    kernel, why = models.resolve_attention("auto", 128, "bf16")
    assert kernel == "sdpa"
    assert "flash_attn is installed but does not import: ImportError" in why and "undefined symbol" in why
    assert models.choose_padding_free("auto", False, kernel)[0] is False
    with pytest.raises(UserError, match="flash_attention_2 needs a GPU and the flash-attn package .*does not import"):
        models.resolve_attention("flash_attention_2", 128, "bf16")


@pytest.mark.parametrize(
    ("requested", "packing", "attention", "expected"),
    [("auto", False, "flash_attention_2", True), ("auto", False, "flash_attention_3", True),
     ("auto", False, "sdpa", False), ("auto", False, "eager", False), (True, False, "sdpa", True),
     (False, True, "sdpa", True), (False, False, "flash_attention_2", False)],
)
def test_choose_padding_free(requested, packing, attention, expected):
    chosen, why = models.choose_padding_free(requested, packing, attention)
    assert chosen is expected
    assert why.startswith("on" if expected else "off")
    if requested == "auto" and not expected:
        assert "block-diagonal mask" in why, "auto says why it stays off under SDPA/eager"


def prepared_run(tmp_path: Path, rows: int) -> RunDir:
    """A run directory with prep's conversational prompt/completion splits, written by hand."""
    (tmp_path / "prep").mkdir()
    queues = ["billing", "shipping", "account"]
    for split in ("train", "validation"):
        lines = []
        for i in range(rows):
            prompt = [{"role": "system", "content": "Route the ticket."},
                      {"role": "user", "content": f"ticket {i} " + "word " * (i % 7)}]
            lines.append(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": queues[i % 3]}]}))
        (tmp_path / f"prep/{split}.jsonl").write_text("\n".join(lines) + "\n")
    return RunDir(tmp_path)


def test_padding_free_trains_through_the_real_sft_trainer(tiny_model_dir, tmp_path):
    """TRL 1.x refuses padding_free without packing when max_length is set; the config the stage builds must be
    one SFTTrainer accepts, whose batches are flattened (one row, position ids restarting), and which trains."""
    recipe = Recipe.model_validate(shipped_recipe(
        "ticket-classification", **{"model.base": str(tiny_model_dir), "data.max_tokens": 64,
                                    "train": {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "padding_free": True}}))
    settings = setup.training_settings(recipe)
    assert settings["padding_free"] and settings["padding_free_reason"] == "on: train.padding_free is true"
    config = setup.to_sft_config(recipe.train, tmp_path / "checkpoints", recipe.data.max_tokens, settings)
    _, tokenizer, model = setup.load_for_training(recipe, models.resolve_base(recipe.model.base)[1], settings, "single",
                                                  config.device)
    trainer = setup.build_trainer(recipe, prepared_run(tmp_path, 12), config, tokenizer, model, [])
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1, "one flattened row per batch"
    assert (batch["position_ids"][0] == 0).sum() == 4, "position ids restart at each of the 4 examples"
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_a_row_longer_than_max_tokens_is_named_when_nothing_truncates(tiny_model_dir, tmp_path):
    """Padding-free without packing gives TRL no max_length, so a row that prep did not cut to this recipe's
    data.max_tokens is an error naming it, never trained on whole or cut silently."""
    recipe = Recipe.model_validate(shipped_recipe(
        "ticket-classification", **{"model.base": str(tiny_model_dir), "data.max_tokens": 40,
                                    "train": {"max_steps": 1, "batch_size": 2, "padding_free": True}}))
    settings = setup.training_settings(recipe)
    config = setup.to_sft_config(recipe.train, tmp_path / "checkpoints", recipe.data.max_tokens, settings)
    assert config.max_length is None
    _, tokenizer, model = setup.load_for_training(recipe, models.resolve_base(recipe.model.base)[1], settings, "single",
                                                  config.device)
    with pytest.raises(UserError, match=r"prep/train.jsonl: row\(s\) .*tokens\) are longer than data.max_tokens=40"):
        setup.build_trainer(recipe, prepared_run(tmp_path, 12), config, tokenizer, model, [])


def test_padding_free_batches_keep_examples_apart(tiny_model_dir):
    """The flattened batch (no padding, position ids restarting per example) gives the padded batch's loss:
    no example attends to another. transformers 5 builds the block-diagonal mask from the position ids
    for SDPA/eager (only without a KV cache, as in training); flash-attention uses the sequence boundaries."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = models.load_base_model(ModelSection(base=str(tiny_model_dir)), tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (7, 12, 4):
        ids = torch.randint(5, 250, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})

    def summed_loss(batch):
        labels = batch.pop("labels")
        keep = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**keep, use_cache=False).logits[:, :-1].float()  # as in training: TRL turns the cache off
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )

    with torch.no_grad():
        padded = summed_loss(DataCollatorForLanguageModeling(pad_token_id=0)(examples))
        flat = summed_loss(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples))
        # the control: the same flat sequence with one position count (examples attend to each other) differs
        mixed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
        mixed["position_ids"] = torch.arange(mixed["input_ids"].size(1)).unsqueeze(0)
        leaked = summed_loss(mixed)
    assert flat == pytest.approx(float(padded), rel=1e-4)
    assert abs(float(leaked) - float(padded)) > 1e-3


def mapped_files() -> set[str]:
    """The files mapped into this process's memory (Linux)."""
    fields = (line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines())
    return {f[5].strip() for f in fields if len(f) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_quantized_base_leaves_the_full_precision_file_and_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    """A 4-bit base must not keep the full-precision weight file mapped: its pages would stay in the RSS for
    the whole run (3.1 GB at a SmolLM2-1.7B shape), and QLoRA's peak RSS would equal LoRA's. The second load
    reads the cached 4-bit copy, the same weights, and never maps the full-precision file."""
    import gc
    import shutil

    import bitsandbytes as bnb

    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    private = shutil.copytree(tiny_model_dir, tmp_path / "model")  # no other test's model maps this copy
    weights = str((private / "model.safetensors").resolve())
    full = models.load_base_model(ModelSection(base=str(private)), private)
    assert weights in mapped_files(), "control: a full-precision base reads its weights through the mapping"
    del full
    gc.collect()
    assert weights not in mapped_files()

    section = ModelSection(base=str(private), quantization="4bit")
    first = models.load_base_model(section, private)
    assert weights not in mapped_files()
    (cached,) = (tmp_path / "cache" / "quantized").iterdir()
    assert (cached / models.QUANTIZED_MARKER).is_file()
    second = models.load_base_model(section, private)
    assert weights not in mapped_files()
    assert str((cached / "model.safetensors").resolve()) in mapped_files(), "the second load reads the cache"

    def packed(model):
        return {name: m.weight.data for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    assert len(packed(second)) == 14 and all(w.dtype == torch.uint8 for w in packed(second).values())
    assert all(torch.equal(packed(first)[name], w) for name, w in packed(second).items())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)

    # new base weights are a new cache entry, never the stale copy
    (private / "model.safetensors").touch()
    models.load_base_model(section, private)
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 2


def test_save_steps_must_be_a_multiple_of_eval_steps():
    raw = shipped_recipe("ticket-classification", train={"eval_steps": 10, "save_steps": 15})
    with pytest.raises(Exception, match="save_steps \\(15\\) must be a multiple of eval_steps \\(10\\)"):
        Recipe.model_validate(raw)


def test_out_of_memory_names_the_knobs():
    recipe = Recipe.model_validate(shipped_recipe("ticket-classification"))
    advice = setup.out_of_memory_advice(recipe)
    for knob in ("train.batch_size", "data.max_tokens", "model.quantization: 4bit", "train.gradient_checkpointing"):
        assert knob in advice


def sft_trainer(tiny_model_dir: Path, tmp_path: Path, rows: list[dict], max_tokens: int = 256):
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = models.load_tokenizer(tiny_model_dir)
    model = models.load_base_model(Recipe.model_validate(shipped_recipe("ticket-classification")).model.model_copy(
        update={"base": str(tiny_model_dir)}), tiny_model_dir)
    config = setup.to_sft_config(TrainSection(batch_size=2), tmp_path, max_tokens)
    return SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ), tokenizer


def pair(prompt: str, answer: str, row: int) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}], "row": row}


def test_prompt_tokens_are_masked_and_answer_tokens_are_not(tiny_model_dir, tmp_path):
    rows = [pair("My card was charged twice", "billing", 1), pair("The app crashes on start", "technical", 2)]
    trainer, tokenizer = sft_trainer(tiny_model_dir, tmp_path, rows)
    setup.check_every_row_has_answer(trainer.train_dataset, 2, "prep/train.jsonl")
    batch = trainer.data_collator([{k: v for k, v in ex.items() if k != "row"} for ex in trainer.train_dataset])
    for i, answer in enumerate(["billing", "technical"]):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        learned = labels != -100
        assert tokenizer.decode(ids[learned]).startswith(answer + "<|im_end|>"), "the loss covers the answer and its end"
        prompt_text = tokenizer.decode(ids[~learned & (batch["attention_mask"][i] == 1)])
        assert rows[i]["prompt"][0]["content"] in prompt_text and answer not in prompt_text
        first_answer = int(learned.nonzero()[0])
        assert (labels[:first_answer] == -100).all() and (labels[learned] == ids[learned]).all()


def test_an_example_with_no_answer_token_left_is_an_error_naming_it(tiny_model_dir, tmp_path):
    long_prompt = " ".join(["the package was delivered to the wrong address"] * 20)
    rows = [pair("short one", "billing", 1), pair(long_prompt, "shipping", 2)]
    trainer, _ = sft_trainer(tiny_model_dir, tmp_path, rows, max_tokens=32)
    with pytest.raises(UserError, match=r"prep/train.jsonl: row\(s\) 2 have no answer token"):
        setup.check_every_row_has_answer(trainer.train_dataset, 2, "prep/train.jsonl")


def make_checkpoint(directory: Path, step: int, seal: bool = True) -> Path:
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        checkpoints.seal_checkpoint(checkpoint)
    return checkpoint


def test_seal_detects_incomplete_missing_and_truncated_files(tmp_path):
    good = make_checkpoint(tmp_path, 2)
    assert checkpoints.checkpoint_problem(good) is None
    assert "incomplete" in checkpoints.checkpoint_problem(make_checkpoint(tmp_path, 4, seal=False))
    truncated = make_checkpoint(tmp_path, 6)
    (truncated / "adapter_model.safetensors").write_bytes(b"weights")
    assert "adapter_model.safetensors does not match" in checkpoints.checkpoint_problem(truncated)
    missing = make_checkpoint(tmp_path, 8)
    (missing / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in checkpoints.checkpoint_problem(missing)


def test_latest_complete_checkpoint_skips_damaged_ones_newest_first(tmp_path, capsys):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    damaged = make_checkpoint(tmp_path, 12)
    (damaged / "adapter_model.safetensors").write_bytes(b"")
    make_checkpoint(tmp_path, 14, seal=False)
    assert checkpoints.latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    warnings = capsys.readouterr().err
    assert "checkpoint-14 is incomplete" in warnings and "checkpoint-12 is damaged" in warnings
    assert not damaged.exists(), "a damaged checkpoint is removed so nothing resumes from it later"


def test_plain_train_refuses_to_guess_between_resume_and_restart(tmp_path):
    inputs = {"a": "1"}
    make_checkpoint(tmp_path, 2)
    (tmp_path / checkpoints.RESUME_STATE).write_text(json.dumps({"inputs": inputs, "mlflow_run_id": "r1"}))
    with pytest.raises(UserError, match="--resume .* or --restart"):
        checkpoints.plan_resume(tmp_path, inputs, None)
    assert checkpoints.plan_resume(tmp_path, inputs, True) == (tmp_path / "checkpoint-2", "r1")
    assert checkpoints.plan_resume(tmp_path, {"a": "changed"}, True) == (None, None), "other inputs: start over"
    assert not tmp_path.exists()


def test_a_llama3_tokenizer_pads_with_its_own_pad_token_not_eos(tiny_model_dir, tmp_path):
    """Llama-3.1's tokenizer names no pad token and its eos is `<|eot_id|>`; its vocabulary holds
    `<|finetune_right_pad_id|>`, which must be chosen (falling back to eos hides every answer's end from the loss)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|finetune_right_pad_id|>"]})
    tokenizer.eos_token, tokenizer.pad_token = "<|eot_id|>", None
    tokenizer.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|finetune_right_pad_id|>" and loaded.pad_token != loaded.eos_token


def test_merged_export_is_written_in_the_bases_dtype(tiny_model_dir, tmp_path):
    """An 8B base ships bf16: merging in fp32 and writing fp32 doubles the export (32 GB) and says float32."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from pipeline.commands import export

    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((tiny_model_dir / name).read_bytes())
    recipe = Recipe.model_validate(shipped_recipe("ticket-classification", **{"model.base": str(tmp_path / "bf16")}))
    assert export.base_dtype(SimpleNamespace(base_source=tmp_path / "bf16", recipe=recipe)) == torch.bfloat16
    assert export.base_dtype(SimpleNamespace(base_source=tiny_model_dir, recipe=recipe)) == torch.float32


def test_the_merged_export_merges_on_the_cpu_even_beside_a_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """The merge loads a second, fp32 copy of the base: on the GPU beside the served bf16 one it took 48 GB for an
    8B. With CUDA reported available (this machine has none, so any tensor sent there raises), the merge runs on
    the CPU, lets the served model go, and answers as base + adapter did."""
    from types import SimpleNamespace

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.commands import export

    lora = models.to_lora_config(AdapterSection())
    lora.init_lora_weights = False  # a non-zero adapter, so the merge changes the weights
    torch.manual_seed(0)
    served = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = served(ids).logits
    recipe = Recipe.model_validate(shipped_recipe("ticket-classification", **{"model.base": str(tiny_model_dir)}))
    expert = SimpleNamespace(model=served, recipe=recipe, base_source=tiny_model_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.inference_device_map() == {"": torch.device("cuda", 0)}, "where a served model would go"
    merged = export.merged_model(expert, tmp_path)
    assert expert.model is None, "the served copy is let go before the base loads again"
    assert {p.device.type for p in merged.parameters()} == {"cpu"}
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
