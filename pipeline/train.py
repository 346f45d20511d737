"""Stage 2, train: fit a LoRA adapter on the base model with TRL's SFTTrainer.

The prep stage writes conversational prompt/completion rows, for which TRL
computes the loss on the completion (the answer) only. Outputs under
`train/`: `adapter/` (PEFT adapter in safetensors plus the tokenizer) and
`metrics.json`. Logs params, per-step metrics and the adapter to MLflow.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PrinterCallback, TrainerCallback

from pipeline import models, tracking
from pipeline.errors import UserError
from pipeline.ui import console
from pipeline.recipe import Recipe, TrainSection
from pipeline.rundir import RunDir, atomic_write_json

STAGE = "train"
OUTPUTS = [f"{STAGE}/adapter", f"{STAGE}/metrics.json"]


def inputs_of(recipe: Recipe, run: RunDir) -> dict[str, str]:
    return {
        "recipe:task,model,train": recipe.section_hash("task", "model", "train"),
        "prep/train.jsonl": run.output_hash("prep", "prep/train.jsonl"),
        "prep/validation.jsonl": run.output_hash("prep", "prep/validation.jsonl"),
    }


def run(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    inputs = inputs_of(recipe, run)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]train[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs):
        from datasets import Dataset
        from trl import SFTTrainer

        out = run.stage_dir(STAGE)
        source, base_info = models.resolve_base(recipe.model.base)
        tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
        model = models.load_base_model(recipe.model, source)
        train_rows = _load_pairs(run.path / "prep/train.jsonl")
        val_rows = _load_pairs(run.path / "prep/validation.jsonl")
        config = to_sft_config(recipe.train, out / "checkpoints", recipe.data.max_tokens)
        tags = {"expert.recipe": recipe.name, "expert.base_model": recipe.model.base}
        with tracking.stage_run(recipe.name, STAGE, run.path.name, tags) as (mlflow_client, mlflow_run_id):
            params = tracking.flatten(recipe.model_dump(mode="json", by_alias=True))
            params["base_model.lineage"] = json.dumps(base_info, sort_keys=True)
            tracking.log_params(mlflow_client, mlflow_run_id, params)
            trainer = SFTTrainer(
                model=model,
                args=config,
                train_dataset=Dataset.from_list(train_rows),
                eval_dataset=Dataset.from_list(val_rows),
                processing_class=tokenizer,
                peft_config=models.to_lora_config(recipe.model.adapter),
                callbacks=[ProgressAndTracking(mlflow_client, mlflow_run_id)],
            )
            trainer.remove_callback(PrinterCallback)  # the progress bar and MLflow carry the logs
            started = time.perf_counter()
            result = trainer.train()
            seconds = time.perf_counter() - started
            final_eval = trainer.evaluate()
            check_finite(result.training_loss, "training loss")
            trainer.model.save_pretrained(out / "adapter", safe_serialization=True)
            tokenizer.save_pretrained(out / "adapter")
            metrics = {
                "train_loss": result.training_loss,
                "eval_loss": final_eval["eval_loss"],
                "train_seconds": seconds,
                "steps": result.global_step,
                "train_examples": len(train_rows),
            }
            atomic_write_json(out / "metrics.json", {**metrics, "base_model": base_info})
            tracking.log_metrics(mlflow_client, mlflow_run_id, {f"final_{k}": v for k, v in metrics.items()})
            mlflow_client.log_artifacts(mlflow_run_id, str(out / "adapter"), "adapter")
        _remove_tree(out / "checkpoints")
        console.print(
            f"[green]train[/]: {result.global_step} steps in {seconds:.0f}s, "
            f"train loss {result.training_loss:.4f}, validation loss {final_eval['eval_loss']:.4f}"
        )
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=mlflow_run_id, base_model=base_info)
    return run.stage_record(STAGE)


def _load_pairs(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise UserError(
            f"train: {what} is {value}; lower train.learning_rate or check the data for empty answers"
        )


def to_sft_config(section: TrainSection, output_dir: Path, max_tokens: int):
    """The recipe's train section as TRL's SFTConfig (CPU-safe defaults)."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps or -1,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation,
        learning_rate=section.learning_rate,
        warmup_steps=section.warmup_ratio,
        lr_scheduler_type="cosine",
        seed=section.seed,
        data_seed=section.seed,
        logging_steps=section.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        max_length=max_tokens,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length",
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        activation_checkpointing=False,  # TRL turns it on by default; on CPU it only costs time
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


class ProgressAndTracking(TrainerCallback):
    """A rich progress bar plus per-step metrics sent to MLflow in one batch per log event."""

    def __init__(self, mlflow_client, mlflow_run_id: str):
        self.mlflow_client = mlflow_client
        self.mlflow_run_id = mlflow_run_id
        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        )
        self.task_id = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=state.max_steps, loss="")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task_id, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        numeric = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if "loss" in numeric:
            self.progress.update(self.task_id, loss=f"loss {numeric['loss']:.4f}")
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise UserError(
                f"train: loss became {loss} at step {state.global_step}; lower train.learning_rate"
            )
        if numeric:
            tracking.log_metrics(self.mlflow_client, self.mlflow_run_id, numeric, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.stop()
