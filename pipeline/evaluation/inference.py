"""How eval runs the local models: the expert loaded from train's record, and a progress bar per pass."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.files import tree_hash
from pipeline.inference import answering, models
from pipeline.recipe.schema import Recipe
from pipeline.run import contracts
from pipeline.run.rundir import RunDir


def read_split(run: RunDir, split: str) -> list[dict[str, Any]]:
    path = run.path / f"prep/{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_expert(recipe: Recipe, trained: contracts.TrainRecord, adapter_dir: Path):
    """The adapter on the base it was trained on, in training's precision, as `train/record.json` says: the same
    weights and dtype on any machine, so the numbers eval reports are the registered model's."""
    from peft import PeftModel

    if tree_hash(adapter_dir) != trained.adapter_hash:
        raise UserError(f"{adapter_dir}: not the adapter train/record.json describes; redo the train stage")
    source = models.recorded_base(trained.base)
    tokenizer = models.load_tokenizer(adapter_dir, recipe.model.trust_remote_code)
    base = models.load_base_model(recipe.model, source, trained.precision, device_map=models.inference_device_map())
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, tokenizer


class _progress:
    """A rich progress bar for one system's pass over a split; yields an `advance(n)` callback.

    Without a terminal (a log file, CI) the bar is invisible, so a plain line
    with the count and the rate goes out every 10% of the examples.
    """

    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        self.bar = Progress(
            TextColumn(f"[bold]eval[/] {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task = self.bar.add_task(name, total=total)
        self.done = 0
        self.next_line = 0
        self.started = 0.0

    def __enter__(self):
        self.started = time.perf_counter()
        self.bar.start()
        return self.advance

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        self.done += n
        if not console.is_terminal and (self.done >= self.next_line or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            console.print(f"eval: {self.name} {self.done:,}/{self.total:,} examples, {rate:.1f}/s", highlight=False)
            self.next_line = self.done + max(1, self.total // 10)

    def __exit__(self, *exc):
        self.bar.stop()


def infer_local(model, tokenizer, rows, recipe: Recipe, spec, name: str) -> list[dict[str, Any]]:
    prompts = [row["prompt"] for row in rows]
    if not prompts:
        return []
    with _progress(name, len(prompts)) as advance:
        return answering.answer(model, tokenizer, prompts, recipe, spec, advance)
