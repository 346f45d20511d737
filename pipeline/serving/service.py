"""A loaded version being served: its worker, its cascade and its metrics; the HTTP layer calls `Service.answer`."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import cascade, tasks
from pipeline.readers import SURROGATE  # prep's rule for what is text, applied to requests
from pipeline.serving.app import HTTPError
from pipeline.serving.engine import BatchingEngine
from pipeline.serving.metrics import Metrics
from pipeline.serving.options import ServeOptions


@dataclass
class Service:
    """A loaded version with its worker, frontier set-up and metrics; the HTTP layer calls `answer`.

    The cascade is `pipeline/cascade.py`'s, as for `expert predict`: the frontier is the version's recorded one
    (asked with serve's bounded `--frontier-retries`/`--frontier-timeout` on a pool of its `max_concurrency`, no
    response cache: every escalation is a live answer); a failed escalation comes back flagged, or as 502 with
    `--frontier-down 502`.
    """

    expert: Any
    model_name: str
    version: str | None
    model_uri: str
    options: ServeOptions
    metrics: Metrics = field(default_factory=Metrics)
    engine: BatchingEngine | None = None
    escalation: cascade.Escalation | None = None
    pool: ThreadPoolExecutor | None = None
    tokenizer: Any = None  # a copy for the HTTP side: fast tokenizers must not be shared across threads

    def __post_init__(self) -> None:
        self.tokenizer = copy.deepcopy(self.expert.tokenizer)
        self.max_input_tokens = self.options.max_input_tokens or self.expert.recipe.data.max_tokens
        self.task = tasks.for_type(self.expert.recipe.task.type)
        self.escalation = cascade.escalation(
            self.expert.recipe, self.expert.threshold, self.expert.frontier, self.options.escalate,
            retries=self.options.frontier_retries, timeout_s=self.options.frontier_timeout_s,
            route=getattr(self.expert, "route", None))
        if self.escalation.on:
            self.pool = ThreadPoolExecutor(max_workers=self.escalation.max_concurrency, thread_name_prefix="frontier")
        if self.engine is None:
            self.engine = BatchingEngine(self.expert, self.options, self.metrics)

    @property
    def escalation_note(self) -> str:
        return self.escalation.note

    def close(self) -> None:
        if self.engine:
            self.engine.close()
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.engine.alive() else "worker stopped",
            "model": self.model_name,
            "version": self.version,
            "task": self.expert.recipe.task.type,
            "threshold": self.expert.threshold,
            "route": getattr(self.expert, "route", None),
            "escalation": self.escalation.note,
            "frontier_down": self.options.frontier_down,
        }

    def check_text(self, text: Any, param: str) -> tuple[str, int]:
        if not isinstance(text, str) or not text.strip():
            raise HTTPError(400, f"`{param}` must be a non-empty string", param, "invalid_value")
        if SURROGATE.search(text):
            raise HTTPError(400, f"`{param}` holds a lone UTF-16 surrogate (such as \\ud800): not valid Unicode text",
                            param, "invalid_value")
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > self.max_input_tokens:
            raise HTTPError(413, f"`{param}` is {n} tokens; this expert accepts at most {self.max_input_tokens} "
                                 "(the recipe's data.max_tokens, or serve --max-input-tokens)", param, "input_too_long")
        return text, n

    async def answer(self, text: str) -> dict[str, Any]:
        """The expert's answer; under its threshold, the first tier above it that answers (or the flagged
        fallback). Each tier's outcome and latency go to /metrics."""
        started = time.perf_counter()
        row = await asyncio.wrap_future(self.engine.submit(text))
        threshold = self.expert.threshold
        out = {**row, "escalate": threshold is not None and row["confidence"] < threshold}
        self.metrics.tier("expert", "passed" if out["escalate"] else "answered", time.perf_counter() - started)
        if not out["escalate"]:
            return {**out, "escalated": False, "tier": "expert"}
        if not self.escalation.on:
            self.metrics.escalation("not_sent")
            return cascade.escalate([out], [text], self.escalation, self.expert)[0]
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.pool, lambda: cascade.escalate([out], [text], self.escalation, self.expert)[0])
        for step in out["tiers_tried"]:
            self.metrics.tier(step["tier"], step["outcome"], step["latency_s"])
        if "escalation_error" not in out:
            self.metrics.escalation(out["tier"] if self.escalation.tiers[-1].name != out["tier"] else "frontier")
            return out
        self.metrics.escalation("failed")
        if self.options.frontier_down == "502":
            what = "the frontier failed" if len(self.escalation.tiers) == 1 else "no tier above the expert answered"
            raise HTTPError(502, f"the answer needed the tiers above the expert (confidence {row['confidence']:.4f} < "
                                 f"threshold {threshold:.4f}) and {what}: {out['escalation_error']}",
                            code="frontier_unavailable")
        return out

    def content(self, answer: Any) -> str:
        if answer is None:
            return ""
        return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
