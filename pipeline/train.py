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
tokenizer), `metrics.json`, and `checkpoints/` while the stage runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback

from pipeline import distributed, models, tracking
from pipeline.errors import UserError
from pipeline.recipe import Recipe, TrainSection
from pipeline.rundir import RunDir, atomic_write_json, file_hash
from pipeline.ui import console

STAGE = "train"
OUTPUTS = [f"{STAGE}/adapter", f"{STAGE}/metrics.json"]
SEAL = "expert-complete.json"  # written last, atomically: a checkpoint without it is incomplete
RESUME_STATE = "resume.json"  # in train/checkpoints: which inputs and MLflow run the checkpoints belong to
MLFLOW_CLOSE_TIMEOUT_S = 60


def inputs_of(recipe: Recipe, run: RunDir) -> dict[str, str]:
    return {
        "recipe:task,model,train": recipe.section_hash("task", "model", "train"),
        "prep/train.jsonl": run.output_hash("prep", "prep/train.jsonl"),
        "prep/validation.jsonl": run.output_hash("prep", "prep/validation.jsonl"),
    }


def run(recipe: Recipe, run: RunDir, resume: bool | None = True) -> dict[str, Any]:
    """Train, or resume an interrupted training. `resume`: True continues from the newest complete
    checkpoint, False starts over, None (plain `expert train`) refuses to guess when checkpoints exist."""
    inputs = inputs_of(recipe, run)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]train[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    if run.stage_record(STAGE).get("status") == "forced":
        resume = False
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
    with run.attempt(STAGE, inputs) if main_process else contextlib.nullcontext():
        import torch

        base_info, tokenizer, model = load_for_training(recipe, settings, launch, config.device)
        tracker = Tracker.open(recipe, run, mlflow_run_id) if main_process else Tracker.disabled()
        try:
            if main_process:
                atomic_write_json(checkpoints / RESUME_STATE, {"inputs": inputs, "mlflow_run_id": tracker.run_id})
            if resume_from is None:
                params = tracking.flatten(recipe.model_dump(mode="json", by_alias=True))
                params["base_model.lineage"] = json.dumps(base_info, sort_keys=True)
                params.update({f"train.{k}.resolved": v for k, v in settings.items()})
                tracker.submit(tracking.log_params, params)
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
            tracker.submit_artifacts(out / "adapter", "adapter")
            logging_problem = tracker.close("FINISHED")
            atomic_write_json(
                out / "metrics.json",
                {
                    **metrics,
                    **settings,
                    "launch": launch,
                    "processes": config.world_size,
                    "best_checkpoint_step": best_step(trainer),
                    "base_model": base_info,
                    "mlflow_logging": "complete" if logging_problem is None else f"incomplete: {logging_problem}",
                },
            )
        except BaseException:
            tracker.close("FAILED")
            raise
        shutil.rmtree(checkpoints, ignore_errors=True)
        console.print(
            f"[green]train[/]: {result.global_step} steps in {seconds:.0f}s, train loss {result.training_loss:.4f}, "
            f"validation loss {eval_loss:.4f} (best checkpoint: step {best_step(trainer)})"
        )
        run.finish_stage(STAGE, OUTPUTS, mlflow_run_id=tracker.run_id, base_model=base_info)
    return run.stage_record(STAGE)


def training_settings(recipe: Recipe) -> dict[str, Any]:
    """The hardware-dependent choices (precision, attention kernel, padding-free and why), before anything loads."""
    import torch

    if recipe.train.liger_kernels:
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
            raise UserError("train.liger_kernels: needs a GPU and `pip install liger-kernel`; set it to false here")
    attention = models.resolve_attention(recipe.train.attention, recipe.data.max_tokens)
    padding_free, why = models.choose_padding_free(recipe.train.padding_free, recipe.train.packing, attention)
    return {
        "precision": models.resolve_precision(recipe.train.precision),
        "attention": attention,
        "padding_free": padding_free,
        "padding_free_reason": why,
    }


def load_for_training(recipe: Recipe, settings: dict[str, Any], launch: str = "single", device=None):
    """Base-model lineage, tokenizer and base model, as training uses them. A quantized base is placed on this
    rank's own `device` (bitsandbytes quantizes where it loads); a full-precision one is left where it loads for
    the Trainer (or FSDP/ZeRO-3) to place."""
    source, base_info = models.resolve_base(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    model = models.load_base_model(
        recipe.model, source, settings["precision"], settings["attention"],
        device_map=distributed.device_map_for(recipe.model, launch, device),
        shard_quantized=distributed.shard_quantized(launch),
    )
    return base_info, tokenizer, model


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
            f"train: {what} is {value} at step {step}; lower train.learning_rate (or use precision fp32) "
            "and check the data for empty answers"
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
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA parameter is used; the search costs a graph walk per step
        disable_tqdm=True,
    )


# ---- checkpoints and resume -------------------------------------------------------------------


def seal_checkpoint(checkpoint: Path) -> None:
    """Record every file's checksum in the seal, written last and atomically: the commit point."""
    files = {p.relative_to(checkpoint).as_posix(): file_hash(p) for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    files.pop(SEAL, None)
    atomic_write_json(checkpoint / SEAL, {"files": files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and intact."""
    seal = checkpoint / SEAL
    if not seal.is_file():
        return "is incomplete (the run stopped while writing it)"
    try:
        files = json.loads(seal.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError) as err:
        return f"has an unreadable {SEAL} ({err})"
    for rel, digest in files.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"is damaged: {rel} is missing"
        if file_hash(path) != digest:
            return f"is damaged: {rel} does not match its recorded checksum"
    return None


def best_step(trainer) -> int | None:
    best = trainer.state.best_model_checkpoint
    return _step_of(Path(best)) if best else None


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def checkpoint_dirs(directory: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
    return sorted((p for p in found if p.name.rsplit("-", 1)[1].isdigit()), key=_step_of, reverse=True)


def latest_complete_checkpoint(directory: Path) -> Path | None:
    """The newest intact checkpoint; newer incomplete or damaged ones are removed with a warning."""
    for checkpoint in checkpoint_dirs(directory):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        console.print(
            f"[yellow]warning[/]: {checkpoint} {problem}; removing it and falling back to the previous checkpoint"
        )
        shutil.rmtree(checkpoint)
    return None


def plan_resume(directory: Path, inputs: dict[str, str], resume: bool | None) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, MLflow run to continue), clearing checkpoints that cannot be used."""
    state_file = directory / RESUME_STATE
    state: dict[str, Any] = {}
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except ValueError:
            state = {}
    if not checkpoint_dirs(directory):
        shutil.rmtree(directory, ignore_errors=True)
        return None, None
    if state.get("inputs") != inputs:
        console.print(f"[yellow]train[/]: {directory} holds checkpoints of other data or settings; starting over")
        shutil.rmtree(directory)
        return None, None
    if resume is None:
        newest = checkpoint_dirs(directory)[0].name
        raise UserError(
            f"{directory} holds checkpoints of an interrupted training (newest: {newest}); "
            "pass --resume to continue from the latest complete one, or --restart to start over"
        )
    if not resume:
        console.print(f"[yellow]train[/]: starting over; removing the checkpoints in {directory}")
        shutil.rmtree(directory)
        return None, None
    checkpoint = latest_complete_checkpoint(directory)
    if checkpoint is None:
        console.print(f"[yellow]train[/]: no complete checkpoint in {directory}; starting over")
        shutil.rmtree(directory)
        return None, None
    return checkpoint, state.get("mlflow_run_id")


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint right after the Trainer finished writing it (rank 0 only)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                seal_checkpoint(checkpoint)


# ---- MLflow, progress, failures ----------------------------------------------------------------


class Tracker:
    """MLflow calls queued to one background thread, so the tracking server never stalls training.

    The first failure (server gone, timeouts) is reported once; later calls are dropped and the
    run keeps its `expert.logging: incomplete` tag, which only a fully logged run replaces.
    """

    def __init__(self, mlflow_client, run_id: str | None):
        self.client = mlflow_client
        self.run_id = run_id
        self.problem: str | None = None
        self.dropped = 0
        self.queue: queue.Queue = queue.Queue()
        self.monitor = None
        self.thread = threading.Thread(target=self._work, name="expert-mlflow", daemon=True)
        if run_id is not None:
            self.thread.start()

    @classmethod
    def disabled(cls) -> Tracker:
        return cls(None, None)

    @classmethod
    def open(cls, recipe: Recipe, run: RunDir, previous_run_id: str | None) -> Tracker:
        """Continue the interrupted training's MLflow run, or create one: one MLflow run per training."""
        mlflow_client = tracking.client()
        run_id = None
        if previous_run_id:
            try:
                mlflow_client.update_run(previous_run_id, status="RUNNING")
                run_id = previous_run_id
            except Exception as err:  # deleted or from another server: start a fresh MLflow run
                console.print(f"[yellow]warning[/]: cannot continue MLflow run {previous_run_id} ({err}); new run")
        if run_id is None:
            exp_id = tracking.experiment_id(mlflow_client, recipe.name)
            tags = {
                "expert.stage": STAGE,
                "expert.run_dir_id": run.path.name,
                "expert.recipe": recipe.name,
                "expert.base_model": recipe.model.base,
                "expert.logging": "incomplete",
            }
            created = mlflow_client.create_run(exp_id, run_name=f"{STAGE} · {recipe.name} · {run.path.name}", tags=tags)
            run_id = created.info.run_id
        tracker = cls(mlflow_client, run_id)
        tracker.monitor = _start_system_metrics(run_id, resumed=previous_run_id == run_id)
        return tracker

    def submit(self, fn, *args, **kwargs) -> None:
        if self.run_id is None:
            return
        self.queue.put((fn, args, kwargs))

    def submit_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        if self.run_id is not None:
            self.queue.put((lambda c, r: c.log_artifacts(r, str(local_dir), artifact_path), (), {}))

    def _work(self) -> None:
        while True:
            fn, args, kwargs = self.queue.get()
            if fn is None:
                return
            if self.problem is not None:
                self.dropped += 1
                continue
            try:
                fn(self.client, self.run_id, *args, **kwargs)
            except Exception as err:
                self.problem = f"{type(err).__name__}: {err}"[:300]
                self.dropped += 1
                console.print(
                    f"[yellow]warning[/]: MLflow logging failed ({self.problem}); training goes on, "
                    "the MLflow run is marked incompletely logged and the run directory keeps everything"
                )

    def close(self, status: str) -> str | None:
        """Flush, tag and end the MLflow run within a bounded wait; returns what went wrong, if anything."""
        if self.run_id is None:
            return None
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # system metrics are best effort
                pass
        if status == "FINISHED":
            self.submit(lambda c, r: c.set_tag(r, "expert.logging", "complete") if self.problem is None else None)
        self.submit(lambda c, r: c.set_terminated(r, status))
        self.queue.put((None, (), {}))
        self.thread.join(MLFLOW_CLOSE_TIMEOUT_S)
        if self.thread.is_alive() and self.problem is None:
            self.problem = f"the tracking server did not answer within {MLFLOW_CLOSE_TIMEOUT_S}s"
        if self.problem is not None:
            console.print(
                f"[yellow]warning[/]: MLflow run {self.run_id} is incompletely logged "
                f"({self.dropped} call(s) dropped): {self.problem}"
            )
        return self.problem


def _start_system_metrics(run_id: str, resumed: bool):
    """MLflow's CPU/memory/GPU monitor on its own thread; training never depends on it."""
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=tracking.configure())
        monitor.start()
        return monitor
    except Exception as err:
        console.print(f"[yellow]warning[/]: no system metrics ({err})")
        return None


class ProgressAndTracking(TrainerCallback):
    """A rich progress bar (step, loss, tokens/s, ETA) plus per-step metrics queued to MLflow.

    tokens/s counts real (non-padding) tokens over the last logging interval.
    """

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        )
        self.task_id = None
        self.last_tokens = 0
        self.last_time = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_tokens, self.last_time = state.num_input_tokens_seen, time.perf_counter()
        if state.is_world_process_zero:
            self.progress.start()
        self.task_id = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, loss="", speed="")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task_id, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        for key in ("loss", "eval_loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                since = state.global_step - args.logging_steps + 1 if key != "eval_loss" else state.global_step
                raise UserError(
                    f"train: {key} became {value} by step {state.global_step} (first seen in steps "
                    f"{max(since, 1)}-{state.global_step}); lower train.learning_rate, use train.precision fp32, "
                    "or check the data for broken rows"
                )
        now = time.perf_counter()
        if "loss" in logs and now > self.last_time:
            logs["tokens_per_second"] = (state.num_input_tokens_seen - self.last_tokens) / (now - self.last_time)
            self.last_tokens, self.last_time = state.num_input_tokens_seen, now
            self.progress.update(
                self.task_id, loss=f"loss {logs['loss']:.4f}", speed=f"{logs['tokens_per_second']:.0f} tok/s"
            )
            if not console.is_terminal and state.is_world_process_zero:  # a log file gets a line per logging step
                console.print(
                    f"train: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"{logs['tokens_per_second']:.0f} tok/s, {_eta(self.progress, self.task_id)}", highlight=False
                )
        if "eval_loss" in logs and not console.is_terminal and state.is_world_process_zero:
            console.print(f"train: step {state.global_step} validation loss {logs['eval_loss']:.4f}", highlight=False)
        numeric = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if numeric:
            self.tracker.submit(tracking.log_metrics, numeric, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.stop()


def _eta(progress, task_id) -> str:
    remaining = next(t for t in progress.tasks if t.id == task_id).time_remaining
    return "ETA unknown" if remaining is None else f"ETA {remaining / 60:.0f} min"


# ---- dry run: the plan, from the prepared data and a short throughput probe -------------------------------------


class _StepClock(TrainerCallback):
    """(wall time, real tokens seen) at the end of each probe step; rates come from the differences, so the
    first step's one-off warm-up costs are left out."""

    def __init__(self):
        self.ends: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append((time.perf_counter(), state.num_input_tokens_seen))


def peak_memory() -> tuple[float, str]:
    """Peak GPU memory allocated when on CUDA, else this process's peak resident set size, in MB."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"  # kB on Linux


def plan(recipe: Recipe, run: RunDir, probe_steps: int = 5) -> dict[str, Any]:
    """What `expert train` would do: sizes from the prepared splits, then `probe_steps` real optimizer steps
    (the length-grouped sampler puts the longest batch first, so the peak memory is the worst case) to measure
    tokens/s and estimate the time. Nothing is written to the run directory or MLflow."""
    import tempfile

    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    inputs_of(recipe, run)  # the same clear error as training when prep has not run
    settings = training_settings(recipe)
    with tempfile.TemporaryDirectory(prefix="expert-plan-") as tmp:
        config = to_sft_config(recipe.train, Path(tmp), recipe.data.max_tokens, settings)
        _, tokenizer, model = load_for_training(recipe, settings, "single", config.device)
        trainer = build_trainer(recipe, run, config, tokenizer, model, [])
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        val_tokens = sum(len(ids) for ids in trainer.eval_dataset["input_ids"])
        steps_per_epoch = math.ceil(len(trainer.get_train_dataloader()) / recipe.train.gradient_accumulation)
        steps = recipe.train.max_steps or math.ceil(steps_per_epoch * recipe.train.epochs)
        clock = _StepClock()
        # set in place: rebuilding the arguments would reset accelerate's state under the trainer
        config.max_steps, config.load_best_model_at_end = probe_steps, False
        config.eval_strategy, config.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
        trainer.add_callback(clock)
        trainer.train()
    (first_time, first_tokens), (last_time, last_tokens) = clock.ends[0], clock.ends[-1]
    tokens_per_s = (last_tokens - first_tokens) / (last_time - first_time)
    memory_mb, memory_kind = peak_memory()
    epochs = steps / steps_per_epoch
    validations = steps // recipe.train.eval_steps + (steps % recipe.train.eval_steps > 0)
    # a validation pass is forward-only: about a third of a training step's work per token
    seconds = (sum(lengths) * epochs + validations * val_tokens / 3) / tokens_per_s
    return {
        **settings,
        "train_examples": len(lengths),
        "validation_examples": len(trainer.eval_dataset),
        "tokens_per_epoch": sum(lengths),
        "longest_example_tokens": max(lengths),
        "steps_per_epoch": steps_per_epoch,
        "steps": steps,
        "epochs": round(epochs, 2),
        "validations": validations,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "probe_steps": len(clock.ends) - 1,
        "probe_tokens_per_second": round(tokens_per_s, 1),
        "peak_memory_mb": round(memory_mb),
        "peak_memory_kind": memory_kind,
        "estimated_minutes": round(seconds / 60, 1),
    }


def print_plan(recipe: Recipe, details: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"train plan · {recipe.name}", show_header=False)
    rows = [
        ("examples (train / validation)", f"{details['train_examples']:,} / {details['validation_examples']:,}"),
        ("tokens per epoch (longest example)", f"{details['tokens_per_epoch']:,} ({details['longest_example_tokens']})"),
        ("steps (per epoch × epochs)", f"{details['steps']:,} ({details['steps_per_epoch']:,} × {details['epochs']})"),
        ("validations", f"{details['validations']}"),
        ("precision · attention", f"{details['precision']} · {details['attention']}"),
        ("padding-free", details["padding_free_reason"]),
        ("trainable parameters", f"{details['trainable_parameters']:,}"),
        ("throughput probe", f"{details['probe_tokens_per_second']:,.0f} real tokens/s over {details['probe_steps']} steps"),
        ("peak memory (longest batch)", f"{details['peak_memory_mb']:,} MB {details['peak_memory_kind']}"),
        ("estimated time", f"{details['estimated_minutes']} min"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
