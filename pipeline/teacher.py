"""Labelling rows without a target by a teacher endpoint, under a budget.

The teacher is asked as a frontier baseline is (the baseline system prompt with the label list or schema, the
same client: retries, concurrency, the response cache, the key from the environment) and its answer parsed the
same way. Before the first call the rows to label and an estimated cost are printed. Labelling goes in chunks;
once the teacher's answers cost `data.teacher.max_cost_usd` (cached answers included) it stops with exit 2.
Every answer already received is in the response cache, so a re-run with a higher budget continues and pays
for none of them again. Where gold rows exist, a seeded sample of them is labelled too and the teacher's
agreement with gold is reported with a Wilson 95% interval.
"""

from __future__ import annotations

import random
import time
from typing import Any

from pipeline import frontier
from pipeline.stats import wilson_interval
from pipeline.cascade import baseline_prompt
from pipeline.errors import UserError
from pipeline.examples import Example
from pipeline.recipe import OpenAIBaseline, Recipe, TeacherSection
from pipeline.ui import console

AGREEMENT_SAMPLE = 50  # gold rows the teacher also labels, to measure how often it agrees


def as_baseline(teacher: TeacherSection) -> OpenAIBaseline:
    """The teacher as the frontier client knows an endpoint."""
    return OpenAIBaseline(name="teacher", kind="openai", model=teacher.model, base_url=teacher.base_url,
                          api_key_env=teacher.api_key_env, price_per_mtok=teacher.price_per_mtok,
                          max_concurrency=teacher.max_concurrency, timeout_s=teacher.timeout_s,
                          max_retries=teacher.max_retries)


def answer_cost(answer: dict[str, Any], teacher: TeacherSection) -> float:
    price = teacher.price_per_mtok
    if price is None or answer.get("input_tokens") is None:
        return 0.0
    return (answer["input_tokens"] * price.input + (answer.get("output_tokens") or 0) * price.output) / 1e6


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
    answer_tokens = (max(len(label) for label in spec) // 4 + 2) if isinstance(spec, list) else teacher.max_new_tokens
    estimate = estimate_cost(prompts, teacher, answer_tokens)
    console.print(f"[bold]teacher[/]: {len(todo):,} rows to label (+{len(sample)} gold rows to measure agreement) "
                  f"with {teacher.model}; estimated cost "
                  + ("unknown (no data.teacher.price_per_mtok)" if estimate is None else f"${estimate:,.4f}")
                  + (f", budget ${teacher.max_cost_usd:,.2f}" if teacher.max_cost_usd else ""), highlight=False)
    schema = spec if recipe.task.type == "extraction" else None
    cache = frontier.ResponseCache(frontier.default_cache_path())
    spent, cached, done = 0.0, 0, 0
    answers: list[dict[str, Any]] = []
    chunk = teacher.max_concurrency * 8
    started, shown = time.perf_counter(), 0
    try:
        while done < len(rows):
            if teacher.max_cost_usd is not None and spent >= teacher.max_cost_usd:
                labelled = sum(1 for a in answers[: len(todo)] if a.get("raw") is not None)
                raise UserError(
                    f"data.teacher.max_cost_usd: the budget (${teacher.max_cost_usd:,.2f}) is spent (${spent:,.4f}) "
                    f"after {labelled:,} of {len(todo):,} rows; every answer is cached, so raising max_cost_usd and "
                    "running again continues without paying for them twice")
            part = frontier.ask_all(baseline, key, prompts[done: done + chunk], teacher.max_new_tokens, schema, cache,
                                    logprobs=teacher.logprobs)
            answers += part
            spent += sum(answer_cost(a, teacher) for a in part)
            cached += sum(1 for a in part if a.get("cached"))
            done += len(part)
            if done - shown >= max(chunk, len(rows) // 10) or done == len(rows):  # a line every ~10%
                shown = done
                rate = done / max(time.perf_counter() - started, 1e-9)
                console.print(f"teacher: {done:,}/{len(rows):,} rows, {rate:.1f}/s, ${spent:,.4f} so far"
                              + (f", ETA {(len(rows) - done) / rate / 60:.0f} min" if done < len(rows) else ""),
                              highlight=False)
    finally:
        cache.close()
    failed, unparsable = 0, 0
    taught_confidences: list[float | None] = []  # one per labelled row
    for e, answer in zip(todo, answers[: len(todo)]):
        target = task.parse_answer(answer["raw"], spec) if answer.get("raw") is not None else None
        if answer.get("raw") is None:
            failed += 1
            rejected.append({"source": e.source, "line": e.line, "id": e.id, "reason": "teacher_failed",
                             "detail": frontier.scrub(str(answer.get("error")), key)})
        elif target is None:
            unparsable += 1
            shown = answer["raw"].strip().replace("\n", " ")
            rejected.append({"source": e.source, "line": e.line, "id": e.id, "reason": "teacher_unparsable",
                             "detail": f"the teacher's answer is not a target: {shown[:120]!r}"})
        else:
            e.target, e.provenance = task.normalize_target(target), f"teacher:{teacher.model}"
            taught_confidences.append(answer.get("confidence"))
    kept = [e for e in examples if e.provenance != "unlabeled"]
    agreeing = [task.parse_answer(a["raw"], spec) == e.target
                for e, a in zip(sample, answers[len(todo):]) if a.get("raw") is not None]
    low, high = wilson_interval(sum(agreeing), len(agreeing))
    summary = {
        "model": teacher.model, "rows": len(todo), "labelled": len(taught_confidences), "failed": failed,
        "unparsable": unparsable, "estimated_cost_usd": estimate, "cost_usd": round(spent, 6),
        "cached_answers": cached,
        "confidence": confidence_summary(taught_confidences) if teacher.logprobs else None,
        "agreement_with_gold": {"rows": len(agreeing), "agreement": sum(agreeing) / len(agreeing) if agreeing else None,
                                "interval_95": [low, high] if agreeing else None},
    }
    console.print(f"[green]teacher[/]: labelled {len(taught_confidences):,} of {len(todo):,} rows for ${spent:,.4f} "
                  f"({cached} answers from the cache); {failed} failed, {unparsable} unparsable", highlight=False)
    return kept, summary
