"""The cascade: which baseline answers what the expert is unsure of, how it is asked, and what its failure means.

Eval, `expert predict` and `expert serve` share this module:

- `frontier_baseline` and `escalation`: the tiers above the expert. A version with a route (eval's
  `verdict.json` `route`: the chain and its thresholds) climbs it; else its cascade's frontier is the baseline
  `recipe.eval.cascade_frontier()` names (recorded in the version's `cascade.json`). A tier can be asked live
  when it is an `openai` baseline whose key is in the environment variable the recipe names. `escalation` says
  which (with the keys, never shown) or why escalation is off.
- `baseline_prompt` (from `baselines`): the messages a baseline is asked: its own system prompt (the instruction with the label
  list or schema) in place of the expert's, then few-shot turns, then the question. Eval's baselines
  (`baselines.baseline_rows`) and every escalated request are built by it.
- `expert_row`: the expert's answer and whether it escalates; a confidence that is no probability (NaN from
  corrupted weights) is an error that escalates, never a sure answer.
- `escalate`, the one failure policy (`judge` and `record` per tier, shared with serving's deadline-bound climb):
  a tier that fails (an error after its retries, an answer that does not parse as the task's answer, a
  confidence that is no probability) passes the request on; when no tier answers, the expert's answer stays, flagged
  (`escalation_error`, scrubbed of secrets); when escalation is off the row says why (`escalation_skipped`).
  `expert predict` writes such rows as they are; `expert serve` answers them, or 502 with `--frontier-down 502`.
  Eval keeps its own record of a failed frontier row (the error, no prediction; `baselines.ask_frontier`), which
  counts as wrong and against `eval.gate.max_baseline_failure_rate`.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import tasks
from pipeline.evaluation.baselines import baseline_prompt
from pipeline.recipe.schema import BaselineSection
from pipeline.routing import frontier

UNPARSED = "the frontier's answer could not be parsed"


def frontier_baseline(recipe, name: str | None = None) -> BaselineSection | None:
    """The `openai` baseline escalated requests go to: `name` (the frontier eval recorded for a version), else the
    one `recipe.eval.cascade_frontier()` names; None when there is none or it cannot be asked live."""
    name = name or recipe.eval.cascade_frontier()
    return next((b for b in recipe.eval.baselines if b.name == name and b.asked_live), None)


@dataclass(frozen=True)
class Tier:
    """A tier above the expert, asked live: its `openai` baseline and key, and the confidence it must reach to
    answer (None for the last tier, which answers whatever reaches it)."""

    baseline: BaselineSection
    key: str = field(repr=False)
    threshold: float | None = None

    @property
    def name(self) -> str:
        return self.baseline.name


@dataclass(frozen=True)
class Escalation:
    """Where the expert's unsure answers go: the tiers above it, in order, or nowhere and why (`note`)."""

    note: str  # "on: below 0.6123 to `frontier` (gpt-4o-mini)" or "off: <why>"
    tiers: tuple[Tier, ...] = ()

    @property
    def on(self) -> bool:
        return bool(self.tiers)

    @property
    def why_off(self) -> str:
        return self.note.removeprefix("off: ")


def escalation(recipe, threshold: float | None, frontier_name: str | None, escalate: bool = True,
               retries: int | None = None, timeout_s: float | None = None,
               route: dict[str, Any] | None = None) -> Escalation:
    """The escalation of a version: its route (eval's chain and thresholds, `verdict.json`'s `route`) when it has
    one, else its cascade (threshold and recorded frontier). Every tier above the expert must be an `openai`
    baseline whose key is set, or escalation is off and says why: a route with a tier left out is not the route
    eval measured. `retries`/`timeout_s` replace the baselines' own (eval's patient settings) where an answer
    cannot wait, as in serving."""
    threshold = expert_threshold(threshold, route)
    if route is not None:
        chain, thresholds = route["chain"], route["thresholds"]
        above = list(zip(chain[1:], [*thresholds[1:], None]))
    else:
        above = [(frontier_name or recipe.eval.cascade_frontier(), None)]
    if threshold is None:
        return Escalation("off: the version has no cascade threshold")
    if not escalate:
        return Escalation("off: --no-escalate")
    update = {name: value for name, value in (("max_retries", retries), ("timeout_s", timeout_s)) if value is not None}
    tiers = []
    for name, tier_threshold in above:
        baseline = frontier_baseline(recipe, name)
        if baseline is None:
            what = "route tier" if route is not None else "cascade frontier"
            return Escalation(f"off: the {what} `{name}` is not an openai baseline: it cannot be asked live")
        key = os.environ.get(baseline.api_key_env or "")
        if not key:
            return Escalation(f"off: {baseline.api_key_env} is not set" + (f" (route tier `{name}`)" if route else ""))
        tiers.append(Tier(baseline.model_copy(update=update) if update else baseline, key, tier_threshold))
    if route is None:
        return Escalation(f"on: below {threshold:.4f} to `{tiers[0].name}` ({tiers[0].baseline.model})", tuple(tiers))
    steps = " -> ".join(f"`{t.name}` ({t.baseline.model})" + ("" if t.threshold is None else f" >= {t.threshold:.4f}")
                        for t in tiers)
    return Escalation(f"on: route `expert` >= {threshold:.4f} -> {steps}", tuple(tiers))


def expert_threshold(cascade_threshold: float | None, route: dict[str, Any] | None) -> float | None:
    """The confidence under which the expert's answer goes up: its route's first threshold when the version has a
    route (`verdict.json`'s `route` replaces the cascade), else its cascade's (`cascade.json`; None: no cascade)."""
    return route["thresholds"][0] if route is not None else cascade_threshold


def unsure(confidence: Any, threshold: float | None) -> bool:
    """Whether the expert's answer goes up: its confidence is no probability, or is under the threshold."""
    return not is_probability(confidence) or (threshold is not None and confidence < threshold)


def is_probability(value: Any) -> bool:
    """A confidence that can be compared with a threshold: a finite number in [0, 1] (not NaN, not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 1.0)


def expert_row(row: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    """The expert's answer with `escalate` (under its threshold). A confidence that is no probability (NaN or
    infinite from corrupted weights, or outside [0, 1]) is an error, never a sure answer: the row keeps no answer
    and no confidence, says why in `expert_error` and escalates (flagged where it cannot)."""
    confidence = row.get("confidence")
    if not is_probability(confidence):
        return {**row, "answer": None, "confidence": None, "escalate": True,
                "expert_error": f"the expert's confidence is {confidence!r}, not a probability in [0, 1] (its weights "
                                "may be corrupted): its answer is not used"}
    return {**row, "escalate": unsure(confidence, threshold)}


def ask(tier: Tier, texts: list[str], expert, deadline_s: float | None = None) -> list[dict[str, Any]]:
    """A tier's reply to each text (`frontier.ask_all`: raw text and usage, or the final error), asked with the
    version's baseline prompt; extraction sends the schema along; a tier with a threshold is asked for its
    log-probabilities or its k samples, as its baseline says. With `deadline_s` no attempt starts after that many
    seconds and each is cut at the time left, so a hung tier frees its thread at the deadline."""
    recipe = expert.recipe
    schema = tasks.for_type(recipe.task.type).frontier_schema(expert.spec)
    prompts = [baseline_prompt(expert.baseline_system_prompt, text) for text in texts]
    return frontier.ask_all(tier.baseline, tier.key, prompts, recipe.eval.max_new_tokens, schema,
                            logprobs=tier.threshold is not None and tier.baseline.logprobs, deadline_s=deadline_s)


def ask_each(tier: Tier, texts: list[str], expert) -> list[tuple[dict[str, Any], float]]:
    """`ask` for each text on the tier's `max_concurrency` threads, with the wall time from the tier's start to
    that text's reply: its wait for a thread, every attempt and every backoff."""
    started = time.perf_counter()

    def one(text: str) -> tuple[dict[str, Any], float]:
        reply = ask(tier, [text], expert)[0]
        return reply, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=tier.baseline.max_concurrency) as pool:
        return list(pool.map(one, texts))


@dataclass(frozen=True)
class Step:
    """A tier's verdict on one request: `answered`; `passed` (unsure: on to the next tier); `failed` (an error
    after its retries, an answer that does not parse, or a confidence that is no probability); and, in serving,
    `timed_out` (no answer by its deadline) or `shed` (its slots and its queue were full)."""

    outcome: str
    answer: Any = None
    confidence: float | None = None
    error: str | None = None


def judge(tier: Tier, reply: dict[str, Any], expert) -> Step:
    """What a tier's reply means for the request: it answers when its answer parses and, unless the tier is the
    last, its confidence reaches the tier's threshold."""
    task = tasks.for_type(expert.recipe.task.type)
    parsed, confidence = frontier.parsed_answer(reply, lambda raw: task.parse_answer(raw, expert.spec))
    if parsed is None:
        outcome = "timed_out" if reply.get("deadline_exceeded") else "failed"
        return Step(outcome, error=frontier.scrub(reply.get("error") or UNPARSED, tier.key))
    if confidence is not None and not is_probability(confidence):
        return Step("failed", error=f"`{tier.name}` sent a confidence of {confidence!r}, not a probability in [0, 1]")
    try:  # Python's parser takes NaN and Infinity, which JSON has not: answers are sent and written as strict JSON
        json.dumps(parsed, allow_nan=False)
    except ValueError:
        return Step("failed", error=f"`{tier.name}` answered with NaN or Infinity, which is not JSON")
    if tier.threshold is not None and (confidence is None or confidence < tier.threshold):
        return Step("passed", parsed, confidence)
    return Step("answered", parsed, confidence)


def record(row: dict[str, Any], tier: Tier, step: Step, seconds: float) -> dict[str, Any]:
    """`row` after `tier`'s step: the step in `tiers_tried` with the wall time the request spent on the tier; the
    tier's answer when it answered; else its error as the row's `escalation_error` (the last tier's stays)."""
    tried = {"tier": tier.name, "outcome": step.outcome, "latency_s": seconds}
    if tier.threshold is not None:
        tried["confidence"] = step.confidence
    if step.error:
        tried["error"] = step.error
    out = {**row, "tiers_tried": [*row.get("tiers_tried", []), tried]}
    if step.outcome == "answered":
        out.pop("escalation_error", None)
        out.update(expert_answer=row["answer"], answer=step.answer, escalated=True, tier=tier.name)
    elif step.error:
        out["escalation_error"] = step.error
    return out


def escalate(rows: list[dict[str, Any]], texts: list[str], esc: Escalation, expert) -> list[dict[str, Any]]:
    """Rows (the expert's `answer`, `escalate` when under its threshold: `expert_row`) for `texts`: the unsure ones
    climb the tiers together (each at its `max_concurrency`), each tier's reply `judge`d. A row no tier answered
    keeps the expert's answer with `escalation_error` (the last tier's error, scrubbed of secrets). With escalation
    off the unsure rows say why (`escalation_skipped`). Every row gets `escalated` and `tier` (which system
    answered); escalated ones `tiers_tried` ({tier, outcome, latency_s, error}) and the expert's answer as
    `expert_answer`."""
    out = [{**row, "escalated": False, "tier": "expert"} for row in rows]
    unsure = [i for i, row in enumerate(out) if row["escalate"]]
    if not unsure:
        return out
    if not esc.on:
        for i in unsure:
            out[i]["escalation_skipped"] = esc.why_off
        return out
    pending = unsure
    for tier in esc.tiers:
        if not pending:
            break
        for i, (reply, seconds) in zip(pending, ask_each(tier, [texts[i] for i in pending], expert), strict=True):
            out[i] = record(out[i], tier, judge(tier, reply, expert), seconds)
        pending = [i for i in pending if not out[i]["escalated"]]
    return out
