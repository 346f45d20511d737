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
- `RouteTriage` (`load_triage`): the triage router a version's route keeps (eval's `eval/triage/<router>/`, bundled
  by push) and its cut-offs. It runs first: its score (the probability the expert is wrong) picks the tier a
  request starts at (`start_tier`, eval's rule), and every row says so in `triage`
  ({router, score, start}). A `text` router runs before the expert: a request it sends up skips the expert
  (`past_the_expert`) and climbs from its start tier; when no tier answers it (escalation off, or every tier
  failed) the expert answers after all (`awaits_expert`, `with_expert_answer`), and the row says why. A `probe`
  router runs on the expert's pass: a request it sends up climbs from its start tier even when the expert is sure.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import tasks
from pipeline.errors import UserError
from pipeline.evaluation.baselines import baseline_prompt
from pipeline.recipe.schema import BaselineSection
from pipeline.routing import frontier, triage

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


@dataclass(frozen=True)
class RouteTriage:
    """A version's triage: its router and the cut-offs (one per tier above the expert) that turn the router's score
    into the tier of `chain` a request starts at."""

    router: Any  # triage.Router
    cutoffs: tuple[float, ...]
    chain: tuple[str, ...]

    @property
    def kind(self) -> str:
        return self.router.kind

    @property
    def before_expert(self) -> bool:
        return self.router.before_expert

    def decisions(self, inputs) -> list[dict[str, Any]]:
        """Per request (texts for `text`, the expert's states for `probe`): the router, its score and the tier it
        starts at (`start_tier`)."""
        scores = np.asarray(self.router.score(inputs), dtype=float)
        starts = triage.start_tier(scores, self.cutoffs)
        return [{"router": self.kind, "score": float(s), "start": self.chain[k]} for s, k in zip(scores, starts)]

    def probe_decisions(self, model, tokenizer, prompts: list[list[dict[str, str]]]) -> list[tuple[dict[str, Any], float]]:
        """`probe`: each prompt's decision from the expert's state at its answer position, one prompt at a time (as
        eval timed it), with the seconds it took."""
        out = []
        for prompt in prompts:
            started = time.perf_counter()
            decision = self.decisions(triage.expert_states(model, tokenizer, [prompt], 1))[0]
            out.append((decision, time.perf_counter() - started))
        return out

    @property
    def note(self) -> str:
        return (f"`{self.kind}` router ({'before the expert' if self.before_expert else 'on the expert pass'}): start at "
                + ", ".join(f"`{name}` from {c:.4g}" for name, c in zip(self.chain[1:], self.cutoffs)))


def load_triage(route: dict[str, Any] | None, bundle: Path) -> RouteTriage | None:
    """The triage a version's route keeps (`verdict.json` route.triage), its router read from the bundle's
    `triage/<router>/` (`triage.load`: arrays checked against its settings); None when the route keeps none."""
    kept = (route or {}).get("triage")
    if kept is None:
        return None
    router = triage.load(bundle / triage.FOLDER / kept["router"])
    if router.kind != kept["router"]:
        raise UserError(f"{bundle / triage.FOLDER / kept['router']}: a `{router.kind}` router where the route keeps "
                        f"`{kept['router']}`; push the run again")
    if len(kept["cutoffs"]) != len(route["chain"]) - 1:
        raise UserError(f"{bundle / 'verdict.json'}: route.triage has {len(kept['cutoffs'])} cut-off(s) for "
                        f"{len(route['chain']) - 1} tier(s) above the expert; redo eval (`expert eval`)")
    return RouteTriage(router, tuple(float(c) for c in kept["cutoffs"]), tuple(route["chain"]))


def sent_up(row: dict[str, Any]) -> bool:
    """Whether triage started the request above the expert."""
    return (row.get("triage") or {}).get("start", "expert") != "expert"


def past_the_expert(decision: dict[str, Any]) -> dict[str, Any]:
    """The row of a request a router before the expert sent up: the expert does not run, so no answer yet."""
    return {"answer": None, "confidence": None, "escalate": True, "triage": decision}


def with_triage(row: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    """The expert's row with the router's decision: sent up, it escalates even when the expert is sure."""
    return {**row, "escalate": row["escalate"] or decision["start"] != "expert", "triage": decision}


def expert_skipped(row: dict[str, Any]) -> bool:
    """Triage sent the request past the expert and the expert has not answered it (every answer the expert gives
    has a probability or `expert_error`: `expert_row`)."""
    return sent_up(row) and row.get("confidence") is None and "expert_error" not in row


def awaits_expert(row: dict[str, Any]) -> bool:
    """A request triage sent past the expert that no tier answered (escalation off, or every tier failed): the
    expert answers it after all (`with_expert_answer`)."""
    return expert_skipped(row) and not row.get("escalated")


def with_expert_answer(row: dict[str, Any], answer: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    """`row` (`awaits_expert`) with the expert's answer ({answer, confidence}), judged as every answer of the
    expert (`expert_row`); the row keeps why no tier answered."""
    judged = expert_row(answer, threshold)
    out = {**row, "answer": judged["answer"], "confidence": judged["confidence"]}
    if "expert_error" in judged:
        out["expert_error"] = judged["expert_error"]
    return out


def start_index(row: dict[str, Any], esc: Escalation) -> int:
    """Where in `esc.tiers` the row's climb begins: the tier triage started it at, else the first above the expert."""
    names = [t.name for t in esc.tiers]
    start = (row.get("triage") or {}).get("start")
    return names.index(start) if start in names else 0


def why_not_sent(row: dict[str, Any], esc: Escalation) -> str:
    """`escalation_skipped`: why escalation is off, and when triage sent the request up, that it did."""
    if not sent_up(row):
        return esc.why_off
    decided = row["triage"]
    return (f"triage (`{decided['router']}` router, score {decided['score']:.4f}) sent it to `{decided['start']}`, "
            f"but escalation is off ({esc.why_off}): the expert answered")


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
        out.update(answer=step.answer, escalated=True, tier=tier.name)
        if not expert_skipped(row):  # a request triage sent past the expert has no answer of the expert's
            out["expert_answer"] = row["answer"]
    elif step.error:
        out["escalation_error"] = step.error
    return out


def escalate(rows: list[dict[str, Any]], texts: list[str], esc: Escalation, expert) -> list[dict[str, Any]]:
    """Rows (the expert's `answer`, `escalate` when under its threshold: `expert_row`) for `texts`: the unsure ones
    climb the tiers together (each at its `max_concurrency`), each tier's reply `judge`d. A row no tier answered
    keeps the expert's answer with `escalation_error` (the last tier's error, scrubbed of secrets). With escalation
    off the unsure rows say why (`escalation_skipped`). Every row gets `escalated` and `tier` (which system
    answered); escalated ones `tiers_tried` ({tier, outcome, latency_s, error}) and the expert's answer as
    `expert_answer`. A row triage started above the expert (`triage`) climbs from its start tier; one it sent past
    the expert that no tier answers is left for the expert (`awaits_expert`)."""
    out = [{**row, "escalated": False, "tier": "expert"} for row in rows]
    unsure = [i for i, row in enumerate(out) if row["escalate"]]
    if not unsure:
        return out
    if not esc.on:
        for i in unsure:
            out[i]["escalation_skipped"] = why_not_sent(out[i], esc)
        return out
    first = {i: start_index(out[i], esc) for i in unsure}
    for k, tier in enumerate(esc.tiers):
        pending = [i for i in unsure if first[i] <= k and not out[i]["escalated"]]
        if not pending:
            continue
        for i, (reply, seconds) in zip(pending, ask_each(tier, [texts[i] for i in pending], expert), strict=True):
            out[i] = record(out[i], tier, judge(tier, reply, expert), seconds)
    return out
