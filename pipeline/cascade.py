"""The cascade: which baseline answers what the expert is unsure of, how it is asked, and what its failure means.

Eval, `expert predict` and `expert serve` share this module:

- `frontier_baseline` and `escalation`: the frontier is the baseline `recipe.eval.cascade_frontier()` names (eval
  records that name in a version's `cascade.json`); it can be asked live when it is an `openai` baseline whose
  key is in the environment variable the recipe names. `escalation` says which (with the key, never shown) or
  why escalation is off.
- `baseline_prompt`: the messages a baseline is asked: its own system prompt (the instruction with the label
  list or schema) in place of the expert's, then few-shot turns, then the question. Eval's baselines
  (`baselines.baseline_rows`) and every escalated request are built by it.
- `escalate` and `settle`, the one failure policy: a frontier that fails (an error after its retries, or an
  answer that does not parse as the task's answer) leaves the expert's answer in place, flagged
  (`escalation_error`, scrubbed of secrets); when escalation is off the row says why (`escalation_skipped`).
  `expert predict` writes such rows as they are; `expert serve` answers them, or 502 with `--frontier-down 502`.
  Eval keeps its own record of a failed frontier row (the error, no prediction; `baselines.ask_frontier`), which
  counts as wrong and against `eval.gate.max_baseline_failure_rate`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import frontier, tasks
from pipeline.recipe import BaselineSection

UNPARSED = "the frontier's answer could not be parsed"


def baseline_prompt(system_prompt: str, question: str | Sequence[dict[str, str]],
                    examples: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The messages a baseline is asked: `system_prompt`, a user/assistant turn per (text, answer) example, then
    the question (a text, or a conversation whose system messages are dropped)."""
    if isinstance(question, str):
        question = [{"role": "user", "content": question}]
    turns = []
    for text, answer in examples:
        turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return [{"role": "system", "content": system_prompt}, *turns, *(m for m in question if m["role"] != "system")]


def frontier_baseline(recipe, name: str | None = None) -> BaselineSection | None:
    """The `openai` baseline escalated requests go to: `name` (the frontier eval recorded for a version), else the
    one `recipe.eval.cascade_frontier()` names; None when there is none or it cannot be asked live."""
    name = name or recipe.eval.cascade_frontier()
    return next((b for b in recipe.eval.baselines if b.name == name and b.kind == "openai"), None)


@dataclass(frozen=True)
class Escalation:
    """Where answers under the threshold go: the frontier baseline and its key, or nowhere and why (`note`)."""

    note: str  # "on: below 0.6123 to `frontier` (gpt-4o-mini)" or "off: <why>"
    baseline: BaselineSection | None = None
    key: str | None = field(default=None, repr=False)

    @property
    def on(self) -> bool:
        return self.baseline is not None and bool(self.key)

    @property
    def why_off(self) -> str:
        return self.note.removeprefix("off: ")


def escalation(recipe, threshold: float | None, frontier_name: str | None, escalate: bool = True,
               retries: int | None = None, timeout_s: float | None = None) -> Escalation:
    """The cascade of a version (its recipe, threshold and recorded frontier). `retries`/`timeout_s` replace the
    baseline's own (eval's patient settings) where an answer cannot wait, as in serving."""
    if threshold is None:
        return Escalation("off: the version has no cascade threshold")
    if not escalate:
        return Escalation("off: --no-escalate")
    baseline = frontier_baseline(recipe, frontier_name)
    if baseline is None:
        return Escalation(f"off: the cascade frontier `{frontier_name or recipe.eval.cascade_frontier()}` "
                          "is not an openai baseline")
    key = os.environ.get(baseline.api_key_env or "")
    if not key:
        return Escalation(f"off: {baseline.api_key_env} is not set")
    update = {name: value for name, value in (("max_retries", retries), ("timeout_s", timeout_s)) if value is not None}
    if update:
        baseline = baseline.model_copy(update=update)
    return Escalation(f"on: below {threshold:.4f} to `{baseline.name}` ({baseline.model})", baseline, key)


def ask(esc: Escalation, texts: list[str], expert) -> list[dict[str, Any]]:
    """The frontier's reply to each text (`frontier.ask_all`: raw text and usage, or the final error), asked with
    the version's baseline prompt; extraction sends the schema along."""
    recipe = expert.recipe
    schema = expert.spec if recipe.task.type == "extraction" else None
    prompts = [baseline_prompt(expert.baseline_system_prompt, text) for text in texts]
    return frontier.ask_all(esc.baseline, esc.key, prompts, recipe.eval.max_new_tokens, schema)


def settle(row: dict[str, Any], reply: dict[str, Any], task, spec, key: str | None = None) -> dict[str, Any]:
    """`row` (the expert's `answer`, marked `escalate`) after the frontier's reply: the frontier's parsed answer
    (`escalated: true`, the expert's kept as `expert_answer`), or the expert's answer with `escalation_error`."""
    parsed = task.parse_answer(reply["raw"], spec) if reply.get("raw") is not None else None
    if parsed is None:
        return {**row, "escalation_error": frontier.scrub(reply.get("error") or UNPARSED, key)}
    return {**row, "expert_answer": row["answer"], "answer": parsed, "escalated": True}


def escalate(rows: list[dict[str, Any]], texts: list[str], esc: Escalation, expert) -> list[dict[str, Any]]:
    """Rows (the expert's `answer`, `escalate` when under the threshold) for `texts`: the unsure ones go to the
    frontier together (at its `max_concurrency`) and are settled; with escalation off they say why
    (`escalation_skipped`). Every row gets `escalated`."""
    out = [{**row, "escalated": False} for row in rows]
    unsure = [i for i, row in enumerate(out) if row["escalate"]]
    if not unsure:
        return out
    if not esc.on:
        for i in unsure:
            out[i]["escalation_skipped"] = esc.why_off
        return out
    task = tasks.for_type(expert.recipe.task.type)
    replies = ask(esc, [texts[i] for i in unsure], expert)
    for i, reply in zip(unsure, replies, strict=True):
        out[i] = settle(out[i], reply, task, expert.spec, esc.key)
    return out
