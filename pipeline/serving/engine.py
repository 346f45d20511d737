"""The model worker of `expert serve`: one thread owns the model and answers micro-batches through `answering.answer`."""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any

from pipeline import tasks
from pipeline.inference import answering
from pipeline.serving.metrics import Metrics
from pipeline.serving.options import ServeOptions


class BatchingEngine:
    """One thread owns the model: it takes a queued request, gathers whatever else is queued (up to
    `max_batch`, waiting at most `batch_wait_ms` for more), answers them in one call and resolves
    each request's future. A failing batch fails its requests, never the thread.

    Answers come from `answering.answer`, the path eval measured and the registered model answers with; for
    label scoring it is given the system prompt's KV cache, computed once here (`answering.system_prefix`), and
    the micro-batch as one batch. A batch whose tokens do not start with that prefix runs its own
    (`fallbacks` counts them).
    """

    def __init__(self, expert, options: ServeOptions, metrics: Metrics):
        self.expert, self.options, self.metrics = expert, options, metrics
        self.queue: queue.Queue[tuple[str, Future] | None] = queue.Queue()
        self.prefix = None
        if tasks.for_type(expert.recipe.task.type).inference == "label_scoring":
            self.prefix = self._system_prefix()
        self.thread = threading.Thread(target=self._loop, name="expert-model", daemon=True)
        self.thread.start()

    def _system_prefix(self):
        """The KV cache of the tokens every prompt starts with (system prompt and label list), computed once."""
        return answering.system_prefix(self.expert.model, self.expert.tokenizer, self.expert.system_prompt)

    @property
    def fallbacks(self) -> int:
        """Batches that could not use the cached system-prompt prefix."""
        return self.prefix.misses if self.prefix is not None else 0

    def submit(self, text: str) -> Future:
        future: Future = Future()
        self.queue.put((text, future))
        self.metrics.queue_depth = self.queue.qsize()
        return future

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        wait_s = self.options.batch_wait_ms / 1000
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + wait_s
            while len(batch) < self.options.max_batch:
                try:
                    nxt = (self.queue.get_nowait() if wait_s <= 0
                           else self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self.metrics.queue_depth = self.queue.qsize()
            batch = [(t, f) for t, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                rows = self.infer([t for t, _ in batch])
            except Exception as err:  # noqa: BLE001 - the batch fails, the worker lives on
                traceback.print_exc(file=sys.stderr)
                for _, fut in batch:
                    fut.set_exception(err)
                continue
            self.metrics.batch(len(batch))
            for (_, fut), row in zip(batch, rows):
                fut.set_result(row)

    def infer(self, texts: list[str]) -> list[dict[str, Any]]:
        """Answer and confidence per text, from `answering.answer`; with a `probe` triage router, its decision
        (`triage`) and the seconds it took (`triage_s`)."""
        expert = self.expert
        prompts = [answering.expert_prompt(expert.system_prompt, t) for t in texts]
        rows = answering.answer(expert.model, expert.tokenizer, prompts, expert.recipe, expert.spec, prefix=self.prefix,
                              batch_size=len(prompts) if self.prefix is not None else None)
        out = [{"answer": r["prediction"], "confidence": float(r["confidence"])} for r in rows]
        triage = getattr(expert, "triage", None)
        if triage is not None and not triage.before_expert:  # a `probe` router reads the expert's pass: here, where the model is
            for row, (decision, seconds) in zip(out, triage.probe_decisions(expert.model, expert.tokenizer, prompts)):
                row.update(triage=decision, triage_s=seconds)
        return out
