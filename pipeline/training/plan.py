"""`expert train --dry-run`: the plan, from the prepared data and a short throughput probe."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline.console import console
from pipeline.recipe.schema import Recipe
from pipeline.run.rundir import RunDir
from pipeline.stages.train import inputs_of
from pipeline.training.setup import (
    build_trainer,
    load_for_training,
    prepared_base,
    to_sft_config,
    training_settings,
)


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
        _, tokenizer, model = load_for_training(recipe, prepared_base(run), settings, "single", config.device)
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
        ("attention", details["attention_reason"]),
        ("padding-free", details["padding_free_reason"]),
        ("trainable parameters", f"{details['trainable_parameters']:,}"),
        ("throughput probe", f"{details['probe_tokens_per_second']:,.0f} real tokens/s over {details['probe_steps']} steps"),
        ("peak memory (longest batch)", f"{details['peak_memory_mb']:,} MB {details['peak_memory_kind']}"),
        ("estimated time", f"{details['estimated_minutes']} min"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
