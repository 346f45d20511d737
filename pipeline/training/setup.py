"""How a training is set up from a recipe, shared by the train stage and its dry-run plan.

`training_settings` makes the hardware-dependent choices (precision, attention kernel, padding-free) before
anything loads, `to_sft_config` turns the recipe's train section into TRL's SFTConfig, `load_for_training`
loads the base and its tokenizer, and `build_trainer` puts TRL's SFTTrainer on the prepared splits, refusing
rows that lost their answer or do not fit. `check_finite` and `out_of_memory_advice` say what went wrong in
the recipe's terms.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from pipeline.errors import UserError
from pipeline.inference import models
from pipeline.recipe.schema import Recipe, TrainSection
from pipeline.run import contracts
from pipeline.run.contracts import BaseRecord
from pipeline.run.rundir import RunDir
from pipeline.training import distributed, speedups


def training_settings(recipe: Recipe) -> dict[str, Any]:
    """The hardware-dependent choices (precision, attention kernel and why, padding-free and why, which positions
    the LM head scores), before anything loads. Precision comes first: flash-attention takes fp16/bf16 only."""
    import torch

    if recipe.train.liger_kernels:
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
            raise UserError("train.liger_kernels: needs a GPU and `pip install liger-kernel`; set it to false here")
    precision = models.resolve_precision(recipe.train.precision)
    attention, attention_reason = models.resolve_attention(recipe.train.attention, recipe.data.max_tokens, precision)
    padding_free, why = models.choose_padding_free(recipe.train.padding_free, recipe.train.packing, attention)
    lm_head = speedups.lm_head_positions(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        "precision": precision,
        "attention": attention,
        "attention_reason": attention_reason,
        "padding_free": padding_free,
        "padding_free_reason": why,
        "lm_head": lm_head,
    }


def to_sft_config(section: TrainSection, output_dir: Path, max_tokens: int, settings: dict[str, Any] | None = None):
    """The recipe's train section as TRL's SFTConfig. Every default TRL changes is set explicitly.
    `settings`: the hardware-dependent choices (`load_for_training`); default fp32 with padding."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    settings = settings or {"precision": "fp32", "padding_free": False}
    precision = settings["precision"]
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps or -1,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation,
        learning_rate=section.learning_rate,
        warmup_steps=section.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type="cosine",
        seed=section.seed,
        data_seed=section.seed,
        logging_steps=section.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must surface, not be averaged away
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps",
        eval_steps=section.eval_steps,
        save_strategy="steps",
        save_steps=section.save_steps or section.eval_steps,
        save_total_limit=section.keep_checkpoints,
        save_only_model=False,  # optimizer, scheduler and RNG state make resume exact
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        # padding-free without packing: TRL refuses a max_length it would not enforce; prep already cut every row to
        # data.max_tokens and build_trainer checks the tokenized rows against it
        max_length=None if settings["padding_free"] and not section.packing else max_tokens,
        completion_only_loss=True,
        # dynamic padding to the longest in each batch, batches of similar lengths: little padding
        train_sampling_strategy="group_by_length",
        packing=section.packing,
        padding_free=settings["padding_free"],
        use_liger_kernel=section.liger_kernels,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_gpu,
        gradient_checkpointing=section.gradient_checkpointing,
        activation_checkpointing=section.gradient_checkpointing,
        # transformers 5 checkpoints with `activation_checkpointing_kwargs` and makes `gradient_checkpointing_kwargs`
        # the same dict; TRL forces `use_reentrant=True` for PEFT under ZeRO-3 by writing the old name, and replaces
        # a missing or empty dict with a new one that transformers never reads. A non-empty dict here (transformers'
        # own default) is the one both names hold, so TRL's change reaches the checkpointing.
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA parameter is used; the search costs a graph walk per step
        disable_tqdm=True,
    )


def prepared_base(run: RunDir) -> BaseRecord:
    """The base prep resolved and measured the data with (`prep/record.json`)."""
    return contracts.read_record(run.stage_dir("prep") / contracts.RECORD, contracts.PrepRecord).base


def load_for_training(recipe: Recipe, base: BaseRecord, settings: dict[str, Any], launch: str = "single",
                      device=None):
    """The base's record, tokenizer and base model, as training uses them: the weights `base` (prep's record)
    names, or a refusal when they changed since. A quantized base is placed on this rank's own `device`
    (bitsandbytes quantizes where it loads); a full-precision one is left where it loads for the Trainer (or
    FSDP/ZeRO-3) to place."""
    source = models.recorded_base(base, "prep measured the data with", "redo prep (`expert run --force prep`)")
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    model = models.load_base_model(
        recipe.model, source, settings["precision"], settings["attention"],
        device_map=distributed.device_map_for(recipe.model, launch, device),
        shard_quantized=distributed.shard_quantized(launch),
    )
    return base, tokenizer, model


def build_trainer(recipe: Recipe, run: RunDir, config, tokenizer, model, callbacks: list[TrainerCallback]):
    """TRL's SFTTrainer on the prepared splits, after checking that every row kept an answer token."""
    from datasets import Dataset
    from trl import SFTTrainer

    train_rows = _load_pairs(run.path / "prep/train.jsonl")
    val_rows = _load_pairs(run.path / "prep/validation.jsonl")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows),
        processing_class=tokenizer,
        peft_config=models.to_lora_config(recipe.model.adapter),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar and MLflow carry the logs
    if (config.bf16 or config.fp16) and recipe.model.quantization == "none" and recipe.model.adapter.method == "lora":
        speedups.skip_lora_input_casts(trainer.model)  # autocast casts them back: same numbers, no copies
    check_every_row_has_answer(trainer.train_dataset, len(train_rows), "prep/train.jsonl")
    check_every_row_has_answer(trainer.eval_dataset, len(val_rows), "prep/validation.jsonl")
    if config.max_length is None:  # TRL did not truncate (padding-free without packing)
        check_every_row_fits(trainer.train_dataset, recipe.data.max_tokens, "prep/train.jsonl")
        check_every_row_fits(trainer.eval_dataset, recipe.data.max_tokens, "prep/validation.jsonl")
    trainer.train_dataset = trainer.train_dataset.remove_columns("row")
    trainer.eval_dataset = trainer.eval_dataset.remove_columns("row")
    return trainer


def _load_pairs(path: Path) -> list[dict[str, Any]]:
    """Prompt/completion rows plus their 1-based line number, so a bad row can be named."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{"prompt": r["prompt"], "completion": r["completion"], "row": i} for i, r in enumerate(rows, 1)]


def check_every_row_has_answer(dataset, expected_rows: int, name: str) -> None:
    """TRL drops examples whose labels are all -100 (answer empty or cut off by max_length); we refuse instead."""
    kept = set(dataset["row"])
    missing = [row for row in range(1, expected_rows + 1) if row not in kept]
    masked = [r for r, labels in zip(dataset["row"], dataset["labels"]) if all(label == -100 for label in labels)]
    bad = sorted(missing + masked)
    if bad:
        shown = ", ".join(str(r) for r in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UserError(
            f"{name}: row(s) {shown} have no answer token left for the loss (the answer is empty, or the "
            "prompt fills data.max_tokens); raise data.max_tokens or shorten those prompts, then rerun prep"
        )


def check_every_row_fits(dataset, max_tokens: int, name: str) -> None:
    """Without packing TRL only truncates when it is given a max_length (padding-free is not); rows are never cut
    silently: one longer than data.max_tokens (a prep stage of other settings, or a different tokenizer) is an error."""
    long = [(r, len(ids)) for r, ids in zip(dataset["row"], dataset["input_ids"]) if len(ids) > max_tokens]
    if long:
        shown = ", ".join(f"{r} ({n} tokens)" for r, n in long[:10]) + (f" and {len(long) - 10} more" if len(long) > 10 else "")
        raise UserError(
            f"{name}: row(s) {shown} are longer than data.max_tokens={max_tokens}; rerun prep with this recipe "
            "(it measures and cuts or rejects rows with the base model's tokenizer)"
        )


def check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise UserError(
            f"train: {what} is {value} at step {step}; lower train.learning_rate (or set train.precision: fp32, "
            "with train.attention auto or sdpa: flash-attention takes fp16/bf16 only) and check the data for "
            "empty answers"
        )


def out_of_memory_advice(recipe: Recipe) -> str:
    t = recipe.train
    knobs = [
        f"train.batch_size (now {t.batch_size}; halve it and double train.gradient_accumulation)",
        f"data.max_tokens (now {recipe.data.max_tokens})",
    ]
    if recipe.model.quantization == "none":
        knobs.append("model.quantization: 4bit (QLoRA)")
    if not t.gradient_checkpointing:
        knobs.append("train.gradient_checkpointing: true")
    return "train: out of memory; turn one of these knobs: " + "; ".join(knobs)
