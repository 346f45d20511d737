"""What eval's baseline kinds share (each kind is a module of `pipeline/baseline_kinds/`): the context they run
in, their result, the baselines' prompt, the few-shot examples, recorded answers and frontier answers as rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.evaluation.inference import _progress
from pipeline.recipe.schema import BaselineSection, Recipe, StandIn
from pipeline.routing import frontier
from pipeline.run.rundir import RunDir

FEWSHOT = "prep/fewshot.json"
Rows = list[dict[str, Any]]


@dataclass
class BaselineContext:
    """What every baseline kind may use: the recipe and task, the prompts' inputs, the loaded expert model
    (a base_model baseline runs it with the adapter disabled) and what each kind's `load` read, by baseline."""

    recipe: Recipe
    task: Any
    spec: Any
    baseline_system: str
    fewshot: Rows
    model: Any
    tokenizer: Any
    loaded: dict[str, Any]


@dataclass
class BaselineResult:
    outputs: dict[str, Rows] | None  # split -> rows; None when skipped
    skipped: str | None = None
    stand_in: StandIn | None = None  # the recorded answers that answered in the system's place, when they did


def load_fewshot(run: RunDir, recipe: Recipe) -> list[dict[str, Any]]:
    """prep/fewshot.json examples when a base_model baseline asks for shots; a clear error when they are missing."""
    wanting = [(i, b) for i, b in enumerate(recipe.eval.baselines) if getattr(b, "shots", 0) > 0]
    if not wanting:
        return []
    path = run.path / FEWSHOT
    i, first = wanting[0]
    where = f"eval -> baselines -> {i} -> shots"
    if not path.is_file():
        raise UserError(
            f"{where}: `{first.name}` asks for {first.shots} few-shot examples but {path} does not exist; "
            "re-run `expert prep` with a prep stage that writes it, or set shots: 0"
        )
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a few-shot file ({{\"examples\": [...]}} expected): {err}") from None
    most = max(b.shots for _, b in wanting)
    if len(examples) < most:
        raise UserError(f"{where}: {most} shots asked for but {path} holds only {len(examples)} examples; lower shots")
    return examples


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


def _completion_text(example: dict[str, Any]) -> str:
    completion = example["completion"]
    if isinstance(completion, list):  # TRL conversational form: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"]
    return str(completion)


def baseline_rows(
    rows: list[dict[str, Any]], system_prompt: str, fewshot: list[dict[str, Any]] = (), shots: int = 0
) -> list[dict[str, Any]]:
    """Rows as an untuned model is asked them: the baseline system prompt (instruction with the label list or
    schema) in place of the expert's, then `shots` user/assistant example turns, then the question
    (`baseline_prompt`, which builds every escalated request of predict and serve too)."""
    examples = [(example["text"], _completion_text(example)) for example in fewshot[:shots]]
    return [{**row, "prompt": baseline_prompt(system_prompt, row["prompt"], examples)} for row in rows]


def load_recorded(baseline: BaselineSection, splits: dict[str, list[dict[str, Any]]], task, spec,
                  stand_in: StandIn | None = None) -> dict[str, list]:
    """Recorded outputs matched to each split's rows by id; every needed id must be there. They are the file of a
    `predictions` baseline's `path`, or of the `stand_in` given (an `openai` baseline's recorded answers)."""
    path = baseline.path if stand_in is None else stand_in.path
    if not path.is_file():
        key = "path" if stand_in is None else "stand_in -> path"
        raise UserError(f"eval.baselines `{baseline.name}` -> {key}: {path} does not exist")
    by_id: dict[str, dict[str, Any]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "id" not in row or "output" not in row:
            raise UserError(f"{path}:{line_no}: each line needs `id` and `output` (the recorded answer)")
        confidence = row.get("confidence")
        if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                                       or not 0 <= confidence <= 1):
            raise UserError(f"{path}:{line_no}: `confidence` must be a number in [0, 1], got {confidence!r}")
        key = str(row["id"])
        if key in by_id:
            raise UserError(f"{path}:{line_no}: id {key} appears twice; keep one answer per example")
        by_id[key] = row
    out = {}
    for split, rows in splits.items():
        missing = [str(r["id"]) for r in rows if str(r["id"]) not in by_id]
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise UserError(
                f"{path}: {len(missing)} {split} example id(s) have no recorded output: {shown}; "
                f"record an output for every {split} example"
            )
        out[split] = [recorded_row(by_id[str(r["id"])], task, spec) for r in rows]
    return out


def recorded_row(row: dict[str, Any], task, spec) -> dict[str, Any]:
    output = row["output"]
    raw = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    latency = row.get("latency_ms")
    return {
        "raw": raw,
        "prediction": task.parse_answer(raw, spec),
        "latency_s": latency / 1000 if isinstance(latency, (int, float)) else None,
        "input_tokens": row.get("input_tokens"),
        "output_tokens": row.get("output_tokens"),
        "confidence": row.get("confidence"),
    }


def ask_frontier(baseline: BaselineSection, key: str, rows, recipe: Recipe, task, spec, cache, split: str):
    schema = task.frontier_schema(spec)
    with _progress(f"{baseline.name} ({split})", len(rows)) as advance:
        answers = frontier.ask_all(baseline, key, [r["prompt"] for r in rows], recipe.eval.max_new_tokens, schema,
                                   cache, advance, logprobs=getattr(baseline, "logprobs", False))
    failed = sum(1 for a in answers if a.get("error"))
    if failed:
        console.print(f"[yellow]eval[/]: `{baseline.name}` failed on {failed} of {len(rows)} {split} examples "
                      "after retries; they count as wrong (see the report)")
    out = []
    for a in answers:
        prediction, confidence = frontier.parsed_answer(a, lambda raw: task.parse_answer(raw, spec))
        out.append({**a, "prediction": prediction, **({"confidence": confidence} if "samples" in a else {})})
    return out
