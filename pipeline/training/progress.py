"""The training's progress display: a rich progress bar, a plain line per logging step in a log file, and
per-step metrics queued to MLflow; a loss that turns NaN or inf stops the training naming the step."""

from __future__ import annotations

import math
import time

from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.run import tracking
from pipeline.run.tracking import Tracker


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
