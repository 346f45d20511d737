"""Labelling rows without a target by a teacher endpoint, under a budget that holds.

The teacher is asked as a frontier baseline is (the baseline system prompt with the label list or schema, the
same client: retries, concurrency, the response cache, the key from the environment) and its answer parsed the
same way. Before the first call the rows to label and an estimated cost are printed. The budget
(`data.teacher.max_cost_usd`) counts the cached answers used, then every attempt as it is sent (a
`frontier.Budget`): no request goes out that could take the spend past it. One labelling run holds the response
cache at a time (an OS file lock naming the holder), and every answer is cached as it arrives, so a re-run, with a
higher budget or after a failure, pays for none of them again. Rows left unlabelled (no answer after the retries,
or not sent because of the budget) end the command with exit 2 once the rest are labelled and cached. Where gold
rows exist, a seeded sample of them is labelled too and the teacher's agreement with gold is reported with a
Wilson 95% interval.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.console import console
from pipeline.data import row_checks
from pipeline.data.examples import Example
from pipeline.errors import UserError
from pipeline.evaluation.stats import wilson_interval
from pipeline.files import LockHeld, holder_lock
from pipeline.recipe.schema import OpenAIBaseline, Recipe, TeacherSection
from pipeline.routing import frontier
from pipeline.routing.cascade import baseline_prompt

AGREEMENT_SAMPLE = 50  # gold rows the teacher also labels, to measure how often it agrees


def as_baseline(teacher: TeacherSection) -> OpenAIBaseline:
    """The teacher as the frontier client knows an endpoint."""
    return OpenAIBaseline(name="teacher", kind="openai", model=teacher.model, base_url=teacher.base_url,
                          api_key_env=teacher.api_key_env, price_per_mtok=teacher.price_per_mtok,
                          max_concurrency=teacher.max_concurrency, timeout_s=teacher.timeout_s,
                          max_retries=teacher.max_retries)


def estimate_cost(prompts: list[list[dict[str, str]]], teacher: TeacherSection, answer_tokens: int) -> float | None:
    """Dollars for `prompts`, counting ~4 characters per token (the teacher's tokenizer is not known here)."""
    price = teacher.price_per_mtok
    if price is None:
        return None
    tokens_in = sum(len(m["content"]) for p in prompts for m in p) / 4
    return (tokens_in * price.input + len(prompts) * answer_tokens * price.output) / 1e6


def confidence_summary(confidences: list[float | None]) -> dict[str, Any]:
    """The teacher's confidence over the rows it labelled: how many came with log-probabilities, the mean, and
    the share under 0.5 (labels worth a look)."""
    known = [c for c in confidences if c is not None]
    return {"rows": len(known), "without_logprobs": len(confidences) - len(known),
            "mean": sum(known) / len(known) if known else None,
            "below_0.5": sum(c < 0.5 for c in known) / len(known) if known else None}


def label(examples: list[Example], rejected: list[dict[str, Any]], recipe: Recipe, task, spec,
          baseline_system: str) -> tuple[list[Example], dict[str, Any]]:
    """Label every `unlabeled` example; returns the examples (failed ones moved to `rejected`) and a summary."""
    teacher = recipe.data.teacher
    todo = [e for e in examples if e.provenance == "unlabeled"]
    if teacher is None or not todo:
        return examples, {"rows": 0}
    baseline = as_baseline(teacher)
    key = frontier.api_key(baseline)
    if key is None:
        raise UserError(f"data.teacher.api_key_env: environment variable {teacher.api_key_env} is not set; "
                        "export it (for a teacher behind `expert serve`, any value)")
    gold = [e for e in examples if e.provenance == "gold"]
    sample = random.Random(recipe.data.split.seed).sample(gold, min(AGREEMENT_SAMPLE, len(gold)))
    rows = todo + sample
    prompts = [baseline_prompt(baseline_system, e.text) for e in rows]
    answer_tokens = task.max_answer_tokens(spec) or teacher.max_new_tokens
    estimate = estimate_cost(prompts, teacher, answer_tokens)
    console.print(f"[bold]teacher[/]: {len(todo):,} rows to label (+{len(sample)} gold rows to measure agreement) "
                  f"with {teacher.model}; estimated cost "
                  + ("unknown (no data.teacher.price_per_mtok)" if estimate is None else f"${estimate:,.4f}")
                  + (f"; budget ${teacher.max_cost_usd:,.4f}: no request is sent that could take the spend past it"
                     if teacher.max_cost_usd else ""), highlight=False)
    schema = task.frontier_schema(spec)
    budget = frontier.Budget(teacher.price_per_mtok, teacher.max_cost_usd)
    cache_path = frontier.default_cache_path()
    with holding(cache_path):
        cache = frontier.ResponseCache(cache_path)
        try:
            advance = progress(len(rows), budget)
            answers = frontier.ask_all(baseline, key, prompts[: len(todo)], teacher.max_new_tokens, schema, cache,
                                       advance, logprobs=teacher.logprobs, budget=budget)
            if not any(a.get("budget_refused") for a in answers):  # the agreement sample only once all rows fit
                answers += frontier.ask_all(baseline, key, prompts[len(todo):], teacher.max_new_tokens, schema,
                                            cache, advance, logprobs=teacher.logprobs, budget=budget)
        finally:
            cache.close()
    failed, unparsable = 0, 0
    taught_confidences: list[float | None] = []  # one per labelled row
    not_sent = sum(1 for a in answers[: len(todo)] if a.get("budget_refused"))
    scrubber = row_checks.DetailScrubber(recipe)
    for e, answer in zip(todo, answers[: len(todo)]):
        target = task.parse_answer(answer["raw"], spec) if answer.get("raw") is not None else None
        if answer.get("raw") is None:
            failed += 0 if answer.get("budget_refused") else 1
            rejected.append({"source": e.source, "line": e.line, "id": e.id,
                             "reason": "teacher_over_budget" if answer.get("budget_refused") else "teacher_failed",
                             "detail": frontier.scrub(str(answer.get("error")), key)})
        elif target is None:
            unparsable += 1
            rejected.append({"source": e.source, "line": e.line, "id": e.id, "reason": "teacher_unparsable",
                             "detail": "the teacher's answer is not a target: "
                                       + scrubber.quote(answer["raw"])})
        else:
            e.target, e.provenance = task.normalize_target(target), f"teacher:{teacher.model}"
            taught_confidences.append(answer.get("confidence"))
    kept = [e for e in examples if e.provenance != "unlabeled"]
    agreeing = [task.parse_answer(a["raw"], spec) == e.target
                for e, a in zip(sample, answers[len(todo):]) if a.get("raw") is not None]
    low, high = wilson_interval(sum(agreeing), len(agreeing))
    cached = sum(1 for a in answers if a.get("cached"))
    summary = {
        "model": teacher.model, "rows": len(todo), "labelled": len(taught_confidences), "failed": failed,
        "not_sent_over_budget": not_sent, "unparsable": unparsable, "estimated_cost_usd": estimate,
        "budget_usd": teacher.max_cost_usd, "cost_usd": round(budget.spent_usd, 6),
        "cost_of_cached_answers_usd": round(budget.cached_usd, 6), "cached_answers": cached,
        "requests_sent": budget.sent,
        "failed_requests": {"count": budget.failed_attempts, "cost_usd": round(budget.failed_usd, 6)},
        # answers the endpoint sent without `usage`, priced from an upper-bound estimate instead
        "cost_estimated_answers": budget.estimated_answers,
        "confidence": confidence_summary(taught_confidences) if teacher.logprobs else None,
        "agreement_with_gold": {"rows": len(agreeing), "agreement": sum(agreeing) / len(agreeing) if agreeing else None,
                                "interval_95": [low, high] if agreeing else None},
    }
    console.print(f"[green]teacher[/]: labelled {len(taught_confidences):,} of {len(todo):,} rows for "
                  f"${budget.spent_usd:,.4f}{' (estimated in part)' if budget.estimated_answers else ''}: "
                  f"{budget.sent:,} requests sent ({budget.failed_attempts} without an answer, "
                  f"${budget.failed_usd:,.4f}), {cached} answers from the cache; {failed} failed, {not_sent} not "
                  f"sent (budget), {unparsable} unparsable", highlight=False)
    if failed or not_sent:
        raise UserError(unlabelled_message(answers[: len(todo)], failed, not_sent, summary, budget))
    return kept, summary


def unlabelled_message(answers: list[dict[str, Any]], failed: int, not_sent: int, summary: dict[str, Any],
                       budget: frontier.Budget) -> str:
    """Why rows are left without a label, and how to continue: every answer received is cached."""
    parts = []
    if failed:
        reasons = Counter(str(a.get("error")).split(":")[0] for a in answers
                          if a.get("raw") is None and not a.get("budget_refused"))
        parts.append(f"{failed:,} failed after their retries ("
                     + ", ".join(f"{n:,} {reason}" for reason, n in reasons.most_common(3)) + ")")
    if not_sent:
        smallest = min(a["bound_usd"] for a in answers if a.get("budget_refused"))
        parts.append(f"{not_sent:,} were not sent: each could have taken the spend past data.teacher.max_cost_usd "
                     f"(${budget.cap_usd:,.4f}; ${budget.spent_usd:,.4f} spent, and the cheapest request left could "
                     f"cost up to ${smallest:,.4f})")
    return (f"data.teacher: {failed + not_sent:,} of {summary['rows']:,} "
            f"rows are not labelled ({summary['labelled']:,} are): " + "; ".join(parts) + ". Every answer received "
            "is cached: run again to ask only for the rest" + (", after raising data.teacher.max_cost_usd" if not_sent
                                                               else "") + ".")


def progress(total: int, budget: frontier.Budget):
    """A line every ~10% of the rows: how many, how fast, the spend so far and the time left."""
    lock, started, state = threading.Lock(), time.perf_counter(), {"done": 0, "shown": 0}

    def advance(n: int) -> None:
        with lock:
            state["done"] += n
            done = state["done"]
            if done - state["shown"] < max(1, total // 10) and done < total:
                return
            state["shown"] = done
            rate = done / max(time.perf_counter() - started, 1e-9)
            console.print(f"teacher: {done:,}/{total:,} rows, {rate:.1f}/s, ${budget.spent_usd:,.4f} spent"
                          + (f", ETA {(total - done) / rate / 60:.0f} min" if done < total else ""), highlight=False)

    return advance


@contextmanager
def holding(cache_path: Path) -> Iterator[None]:
    """Hold the response cache for this labelling run: a second run that asks is refused (exit 2) with who holds
    it, so no two runs pay for the same rows. An OS file lock (`files.holder_lock`), so a killed holder leaves
    none behind."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
    holder = (f"`{command}` (pid {os.getpid()} on {socket.gethostname()}, "
              f"since {datetime.now(UTC).isoformat(timespec='seconds')})")
    with ExitStack() as held:
        try:
            held.enter_context(holder_lock(cache_path.with_name(cache_path.name + ".label-lock"), holder))
        except LockHeld as other:
            raise UserError(f"{cache_path} is in use by another labelling run: {other.holder}; wait for it to finish "
                            "(its answers are cached, so this run will not pay for them again)") from None
        yield
