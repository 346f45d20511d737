"""A loaded version being served: its worker, its cascade and its metrics; the HTTP layer calls `Service.answer`."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import tasks
from pipeline.data.readers import (
    SURROGATE,  # prep's rule for what is text, applied to requests
)
from pipeline.routing import cascade
from pipeline.serving.engine import BatchingEngine
from pipeline.serving.errors import HTTPError
from pipeline.serving.metrics import Metrics
from pipeline.serving.options import ServeOptions
from pipeline.serving.tiers import Lane, TierBusy

PROBE_TEXT = "Hello, I have a question about my account."  # what the model is asked at start and by /health
PROBE_TIMEOUT_S = 30.0  # a model that cannot answer the probe by then is not healthy


@dataclass
class Service:
    """A loaded version with its worker, frontier set-up and metrics; the HTTP layer calls `answer`.

    The cascade is `pipeline/routing/cascade.py`'s, as for `expert predict`: the frontier is the version's recorded one,
    asked with serve's bounded `--frontier-retries`/`--frontier-timeout`, no response cache (every escalation is a
    live answer). Each tier has its own lane (`tiers.Lane`: its `max_concurrency` slots, `--tier-queue` waiting)
    and each request gives up on a tier at `--tier-deadline` and on all of them at `--escalation-deadline`; a
    failed, timed-out or shed escalation comes back flagged, or as 502 with `--frontier-down 502`.

    The model's health is a probe question: asked once at start (`probe`; `load_service` refuses a model that
    cannot answer it) and again by `/health` when the last probe is older than `--health-probe-interval` or a
    request's answer since had a confidence that is no probability.
    """

    expert: Any
    model_name: str
    version: str | None
    model_uri: str
    options: ServeOptions
    metrics: Metrics = field(default_factory=Metrics)
    engine: BatchingEngine | None = None
    escalation: cascade.Escalation | None = None
    tokenizer: Any = None  # a copy for the HTTP side: fast tokenizers must not be shared across threads

    def __post_init__(self) -> None:
        self.tokenizer = copy.deepcopy(self.expert.tokenizer)
        self.max_input_tokens = self.options.max_input_tokens or self.expert.recipe.data.max_tokens
        self.task = tasks.for_type(self.expert.recipe.task.type)
        self.escalation = cascade.escalation(
            self.expert.recipe, self.expert.threshold, self.expert.frontier, self.options.escalate,
            retries=self.options.frontier_retries,
            timeout_s=min(self.options.frontier_timeout_s, self.options.tier_deadline_s),
            route=getattr(self.expert, "route", None))
        self.lanes = {t.name: Lane(t.name, t.baseline.max_concurrency, self.options.tier_queue)
                      for t in self.escalation.tiers}
        if self.engine is None:
            self.engine = BatchingEngine(self.expert, self.options, self.metrics)
        self.model_problem: str | None = None  # the last probe's verdict: None when the model answered it
        self.probed_at: float | None = None  # monotonic time of the last probe; None: probe at the next /health
        self.model_errors = 0  # answers whose confidence was no probability
        self._probing: asyncio.Lock | None = None

    @property
    def escalation_note(self) -> str:
        return self.escalation.note

    def close(self) -> None:
        if self.engine:
            self.engine.close()
        for lane in self.lanes.values():
            lane.close()

    def probe(self) -> str | None:
        """Ask the model the probe question now: None when it answers, else why it cannot (its confidence is no
        probability, or it failed)."""
        try:
            row = self.engine.submit(PROBE_TEXT).result(timeout=PROBE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the verdict, not a crash
            return self._judge_probe(None, err)
        return self._judge_probe(row, None)

    async def _probe_async(self) -> str | None:
        try:
            row = await asyncio.wait_for(asyncio.wrap_future(self.engine.submit(PROBE_TEXT)), PROBE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the verdict, not a crash
            return self._judge_probe(None, err)
        return self._judge_probe(row, None)

    def _judge_probe(self, row: dict[str, Any] | None, err: BaseException | None) -> str | None:
        self.probed_at = time.monotonic()
        if isinstance(err, TimeoutError):
            self.model_problem = f"the model did not answer a probe question within {PROBE_TIMEOUT_S:g} s"
        elif err is not None:
            self.model_problem = f"the model failed on a probe question ({type(err).__name__}: {err})"
        else:
            self.model_problem = cascade.expert_row(row, None).get("expert_error")
        return self.model_problem

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "version": self.version,
            "task": self.expert.recipe.task.type,
            "threshold": self.expert.threshold,
            "route": getattr(self.expert, "route", None),
            "escalation": self.escalation.note,
            "triage": None if getattr(self.expert, "triage", None) is None else self.expert.triage.note,
            "frontier_down": self.options.frontier_down,
        }

    async def health(self) -> dict[str, Any]:
        """`ok`, or why not: the worker stopped, or the model cannot answer (the probe, re-asked when stale)."""
        if not self.engine.alive():
            return {"status": "worker stopped", **self.info()}
        self._probing = self._probing or asyncio.Lock()
        async with self._probing:  # one probe at a time: concurrent /health calls share its verdict
            if self.probed_at is None or time.monotonic() - self.probed_at > self.options.health_probe_s:
                await self._probe_async()
        status = "ok" if self.model_problem is None else f"the model cannot answer: {self.model_problem}"
        return {"status": status, **self.info(), "model_errors": self.model_errors}

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
        """The expert's answer; under its threshold (or with a confidence that is no probability), the first tier
        above it that answers in time (or the flagged fallback). With triage the router runs first: a request it
        starts above the expert climbs from there (a `text` router's skips the expert, which answers it only when
        no tier does). Each tier's outcome and time, and each triage decision, go to /metrics."""
        triage = getattr(self.expert, "triage", None)
        decision = None
        if triage is not None and triage.before_expert:
            started = time.perf_counter()
            decision = triage.decisions([text])[0]
            self.metrics.triage(decision["router"], decision["start"], time.perf_counter() - started)
            if decision["start"] != "expert":  # the expert does not run
                return await self.escalate(cascade.past_the_expert(decision), text)
        out = await self.expert_answer(text, decision)
        return await self.escalate(out, text)

    async def expert_answer(self, text: str, decision: dict[str, Any] | None = None) -> dict[str, Any]:
        """The expert's answer judged (`cascade.expert_row`), with the triage decision: `decision` (a `text`
        router's), or a `probe` router's from the expert's pass."""
        started = time.perf_counter()
        row = await asyncio.wrap_future(self.engine.submit(text))
        seconds = row.pop("triage_s", None)
        out = cascade.expert_row(row, self.expert.threshold)
        if "expert_error" in out:
            self.model_errors += 1
            self.probed_at = None  # /health asks the model again
            self.metrics.model_error()
        decision = out.pop("triage", decision)
        if decision is not None:
            out = cascade.with_triage(out, decision)
            if seconds is not None:
                self.metrics.triage(decision["router"], decision["start"], seconds)
        self.metrics.tier("expert", "passed" if out["escalate"] else "answered", time.perf_counter() - started)
        return out

    async def escalate(self, out: dict[str, Any], text: str) -> dict[str, Any]:
        """`out` up the tiers when it escalates (`climb`); flagged, or 502, when none answers. A request triage
        sent past the expert that no tier answers gets the expert's answer after all."""
        threshold = self.expert.threshold
        if not out["escalate"]:
            return {**out, "escalated": False, "tier": "expert"}
        if not self.escalation.on:
            self.metrics.escalation("not_sent")
            out = cascade.escalate([out], [text], self.escalation, self.expert)[0]
            return await self.expert_after_all(out, text)
        out = await self.climb(out, text)
        if "escalation_error" not in out:
            self.metrics.escalation(out["tier"] if self.escalation.tiers[-1].name != out["tier"] else "frontier")
            return out
        self.metrics.escalation("failed")
        if self.options.frontier_down == "502":
            what = "the frontier failed" if len(self.escalation.tiers) == 1 else "no tier above the expert answered"
            decided = out.get("triage") or {}
            why = out.get("expert_error") or (
                f"triage sent it to `{decided['start']}` (`{decided['router']}` router, score {decided['score']:.4f})"
                if cascade.sent_up(out) else f"confidence {out['confidence']:.4f} < threshold {threshold:.4f}")
            raise HTTPError(502, f"the answer needed the tiers above the expert ({why}) and {what}: "
                                 f"{out['escalation_error']}", code="frontier_unavailable")
        return await self.expert_after_all(out, text)

    async def expert_after_all(self, out: dict[str, Any], text: str) -> dict[str, Any]:
        """A request triage sent past the expert that no tier answered: the expert's answer (`awaits_expert`)."""
        if not cascade.awaits_expert(out):
            return out
        started = time.perf_counter()
        row = await asyncio.wrap_future(self.engine.submit(text))
        out = cascade.with_expert_answer(out, row, self.expert.threshold)
        if "expert_error" in out:
            self.model_errors += 1
            self.probed_at = None
            self.metrics.model_error()
        self.metrics.tier("expert", "answered", time.perf_counter() - started)
        return out

    async def climb(self, row: dict[str, Any], text: str) -> dict[str, Any]:
        """`row` up the tiers until one answers (`cascade.judge`/`record`, as `expert predict` climbs), from the
        tier triage started it at (else the first above the expert), each tier given until `--tier-deadline` and
        all of them until `--escalation-deadline`; `tiers_tried` has the wall time the request spent on each tier:
        its wait for a slot, every attempt and backoff."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.options.escalation_deadline_s
        out = {**row, "escalated": False, "tier": "expert"}
        for tier in self.escalation.tiers[cascade.start_index(row, self.escalation):]:
            started = time.perf_counter()
            step = await self._ask_tier(tier, text, min(self.options.tier_deadline_s, give_up_at - loop.time()))
            seconds = time.perf_counter() - started
            self.metrics.tier(tier.name, step.outcome, seconds)
            out = cascade.record(out, tier, step, seconds)
            if step.outcome == "answered":
                break
        return out

    async def _ask_tier(self, tier: cascade.Tier, text: str, seconds: float) -> cascade.Step:
        if seconds <= 0:
            return cascade.Step("timed_out", error=f"the escalation's {self.options.escalation_deadline_s:g} s were "
                                                   f"spent before `{tier.name}` (serve --escalation-deadline)")
        give_up_at = time.monotonic() + seconds

        def ask() -> dict[str, Any]:  # on the lane's thread, after any wait for it: the call gets what is left
            return cascade.ask(tier, [text], self.expert, deadline_s=max(0.0, give_up_at - time.monotonic()))[0]

        try:
            reply = await self.lanes[tier.name].call(ask, seconds)
        except TierBusy as err:
            return cascade.Step("shed", error=str(err))
        except TimeoutError:
            reply = {"raw": None, "deadline_exceeded": True}
        step = cascade.judge(tier, reply, self.expert)
        if step.outcome == "timed_out":  # cut here or by the call's own deadline: one message either way
            return cascade.Step("timed_out", error=f"`{tier.name}` gave no answer within {seconds:.1f} s "
                                                   "(serve --tier-deadline, --escalation-deadline)")
        return step

    def content(self, answer: Any) -> str:
        if answer is None:
            return ""
        return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False, allow_nan=False)
