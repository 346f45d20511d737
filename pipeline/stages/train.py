"""Stage 2, train: fit a LoRA/QLoRA adapter on the base model with TRL's SFTTrainer.

The prep stage writes conversational prompt/completion rows, for which TRL
computes the loss on the completion (the answer) only; an example left with
no answer token is an error, never a silent zero loss. Validation loss runs
every `train.eval_steps`, a checkpoint is written every `train.save_steps`
and sealed with a checksum file once complete, and the final adapter is the
best checkpoint by validation loss.

A run that stops (crash, kill, power) resumes from the newest sealed
checkpoint with optimizer, scheduler, RNG and data position restored;
unsealed or damaged checkpoints are skipped with a warning. transformers
5.x reads checkpoint state with `torch.load(weights_only=True)` and the
adapter from safetensors, so resuming never unpickles code.

MLflow logging runs on a background thread: a slow or vanished tracking
server never stalls or kills training; the run is then tagged (and
`metrics.json` says) that its logging is incomplete.

Outputs under `train/`: `adapter/` (PEFT adapter in safetensors plus the
tokenizer), `metrics.json` (losses, steps, time), `record.json` (what it
decided: the base's revision and content hash, precision, attention,
padding-free, the adapter's hash; eval and the registered model load from
it) and `checkpoints/` while the stage runs.

The helpers have modules of their own: `train_setup` (settings, SFTConfig,
the base loaded for training, the trainer), `checkpoints` (seals and the
resume plan), `tracking.Tracker` and `train_progress` (the progress display);
`train_plan` is `expert train --dry-run`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.files import atomic_write_json, tree_hash
from pipeline.recipe.schema import Recipe
from pipeline.run import contracts, tracking
from pipeline.run.contracts import StageOptions
from pipeline.run.rundir import RunDir
from pipeline.run.tracking import Tracker
from pipeline.training import distributed
from pipeline.training.checkpoints import (
    RESUME_STATE,
    SealCheckpoints,
    _step_of,
    best_step,
    plan_resume,
)
from pipeline.training.progress import ProgressAndTracking
from pipeline.training.setup import (
    build_trainer,
    check_finite,
    load_for_training,
    out_of_memory_advice,
    prepared_base,
    to_sft_config,
    training_settings,
)

STAGE = "train"
OUTPUTS = [f"{STAGE}/adapter", f"{STAGE}/metrics.json", f"{STAGE}/record.json"]


# what train reads of the recipe: its input hash covers these keys, and later stages refuse when they change
RECIPE_KEYS = ("data.max_tokens", "model", "train")


def inputs_of(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, str]:
    return {
        **contracts.recipe_inputs(run, STAGE, recipe, RECIPE_KEYS),
        "prep/train.jsonl": run.output_hash("prep", "prep/train.jsonl"),
        "prep/validation.jsonl": run.output_hash("prep", "prep/validation.jsonl"),
        "prep/record.json": run.output_hash("prep", "prep/record.json"),  # the base training loads
    }


def run(recipe: Recipe, run: RunDir, options: StageOptions = StageOptions()) -> dict[str, Any]:
    """Train, or resume an interrupted training. `options.resume`: True continues from the newest complete
    checkpoint, False starts over, None (plain `expert train`) refuses to guess when checkpoints exist."""
    inputs = inputs_of(recipe, run)
    if contracts.why_stale(run, STAGE, recipe, lambda: inputs, options) is None:
        console.print(f"[green]train[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    resume = False if STAGE in options.redo else options.resume
    out = run.stage_dir(STAGE)
    checkpoints = out / "checkpoints"
    settings = training_settings(recipe)
    # the arguments first: they set up the distributed state (process group, DeepSpeed/FSDP plugins) that loading
    # the base needs under `accelerate launch` (a QLoRA base on each rank's own GPU, ZeRO-3 init, FSDP's rank-0 load)
    config = to_sft_config(recipe.train, checkpoints, recipe.data.max_tokens, settings)
    requested = distributed.launch_of(os.environ)
    distributed.check_launch(recipe.model, requested)
    launch = distributed.effective_launch(requested, config.device)
    if launch != requested and config.process_index == 0:
        console.print(f"[yellow]train[/]: {requested} shards only on GPUs; on the CPU this launch trains data-parallel (ddp)")
    main_process = config.process_index == 0  # under torchrun/accelerate only rank 0 writes
    resume_from, mlflow_run_id = distributed.on_every_rank(
        lambda: plan_resume(checkpoints, inputs, resume), main_process
    )
    with run.attempt(STAGE, inputs, recipe, RECIPE_KEYS) if main_process else contextlib.nullcontext():
        import torch

        base, tokenizer, model = load_for_training(recipe, prepared_base(run), settings, launch, config.device)
        tracker = Tracker.open(recipe, run, mlflow_run_id) if main_process else Tracker.disabled()
        try:
            if main_process:
                atomic_write_json(checkpoints / RESUME_STATE, {"inputs": inputs, "mlflow_run_id": tracker.run_id})
            if resume_from is None:
                params = tracking.flatten(recipe.model_dump(mode="json", by_alias=True))
                params["base_model.lineage"] = base.model_dump_json()
                params.update({f"train.{k}.resolved": v for k, v in settings.items()})
                tracker.submit(tracking.log_params, params)
                tracker.submit(tracking.log_split_inputs, recipe, run, ["train", "validation"])
            callbacks: list[TrainerCallback] = [ProgressAndTracking(tracker), SealCheckpoints()]
            if recipe.train.early_stopping_patience:
                callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))
            trainer = build_trainer(recipe, run, config, tokenizer, model, callbacks)
            if resume_from is not None:
                console.print(f"[bold]train[/]: resuming from {resume_from.name}")
            started = time.perf_counter()
            try:
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except torch.OutOfMemoryError:
                raise UserError(out_of_memory_advice(recipe)) from None
            seconds = time.perf_counter() - started
            check_finite(result.training_loss, "training loss", trainer.state.global_step)
            # the last step is always validated, so best_metric is the loss of the adapter loaded now
            best_loss = trainer.state.best_metric
            eval_loss = best_loss if best_loss is not None else trainer.evaluate()["eval_loss"]
            distributed.save_adapter(trainer, out / "adapter")  # every rank: sharded launches gather the weights
            if not main_process:
                return {}
            metrics = {
                "train_loss": result.training_loss,
                "eval_loss": eval_loss,
                "train_seconds": seconds,
                "steps": result.global_step,
                "train_examples": len(trainer.train_dataset),
                "resumed_from_step": _step_of(resume_from) if resume_from else 0,
            }
            tracker.submit(tracking.log_metrics, {f"final_{k}": v for k, v in metrics.items() if v is not None})
            logged: dict[str, str] = {}  # the adapter's MLflow logged model, once the tracker has created it
            tracker.submit(tracking.log_adapter_model, out / "adapter", recipe.registry.model_name,
                           adapter_params(recipe, base, settings, result.global_step), logged)
            logging_problem = tracker.close("FINISHED")
            atomic_write_json(
                out / "metrics.json",
                {
                    **metrics,
                    "best_checkpoint_step": best_step(trainer),
                    "mlflow_logging": "complete" if logging_problem is None else f"incomplete: {logging_problem}",
                },
            )
            contracts.write_record(out / contracts.RECORD, contracts.TrainRecord(
                base=base, launch=launch, processes=config.world_size, adapter_hash=tree_hash(out / "adapter"),
                **settings))
        except BaseException:
            tracker.close("FAILED")
            raise
        shutil.rmtree(checkpoints, ignore_errors=True)
        console.print(
            f"[green]train[/]: {result.global_step} steps in {seconds:.0f}s, train loss {result.training_loss:.4f}, "
            f"validation loss {eval_loss:.4f} (best checkpoint: step {best_step(trainer)})"
        )
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=tracker.run_id, mlflow_model_id=logged.get("model_id"))
    return run.stage_record(STAGE)


def adapter_params(recipe: Recipe, base, settings: dict[str, Any], steps: int) -> dict[str, str]:
    """What the logged model's page lists: the base it adapts and how it was trained."""
    adapter = recipe.model.adapter
    return {"base_model": recipe.model.base, "base_revision": str(base.revision), "method": adapter.method,
            "r": str(adapter.r), "alpha": str(adapter.alpha), "precision": str(settings["precision"]),
            "steps": str(steps)}
