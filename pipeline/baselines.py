"""Eval's baselines, one function per `kind`: the untuned base model (zero or k shots, the expert's model with
its adapter disabled), an OpenAI-compatible endpoint, or recorded predictions. `BY_KIND` maps a kind to its
function; each returns the baseline's rows per split and its cost, or why it was skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import frontier
from pipeline.errors import UserError
from pipeline.eval_inference import _progress, infer_local
from pipeline.recipe import (
    BaseModelBaseline,
    BaselineSection,
    ExpertBaseline,
    OpenAIBaseline,
    PredictionsBaseline,
    Recipe,
)
from pipeline.rundir import RunDir
from pipeline.ui import console

FEWSHOT = "prep/fewshot.json"
Rows = list[dict[str, Any]]


@dataclass
class BaselineContext:
    """What every baseline function may use: the recipe and task, the prompts' inputs, the loaded expert model
    (a base_model baseline runs it with the adapter disabled), recorded outputs and the response cache."""

    recipe: Recipe
    task: Any
    spec: Any
    baseline_system: str
    fewshot: Rows
    model: Any
    tokenizer: Any
    recorded: dict[str, dict[str, Rows]]
    cache: frontier.ResponseCache | None


@dataclass
class BaselineResult:
    outputs: dict[str, Rows] | None  # split -> rows; None when skipped
    cost_per_1k: float | None = None
    skipped: str | None = None


def run_base_model(baseline: BaseModelBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    with ctx.model.disable_adapter():
        return BaselineResult({
            s: infer_local(ctx.model, ctx.tokenizer, baseline_rows(rows, ctx.baseline_system, ctx.fewshot, baseline.shots),
                           ctx.recipe, ctx.spec, f"{baseline.name} ({s})")
            for s, rows in splits.items()
        })


def run_predictions(baseline: PredictionsBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    recorded = ctx.recorded[baseline.name]
    return BaselineResult({s: recorded[s] for s in splits}, frontier.cost_per_1k(baseline.price_per_mtok, recorded["test"]))


def run_openai(baseline: OpenAIBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    key = frontier.api_key(baseline)
    if key is None:
        return BaselineResult(None, skipped=f"environment variable {baseline.api_key_env} is not set")
    outputs = {s: ask_frontier(baseline, key, baseline_rows(rows, ctx.baseline_system), ctx.recipe, ctx.task, ctx.spec,
                               ctx.cache, s)
               for s, rows in splits.items()}
    return BaselineResult(outputs, frontier.cost_per_1k(baseline.price_per_mtok, outputs["test"]))


def run_other_expert(baseline: ExpertBaseline, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    """Another expert (a run directory's, loaded as its train record says, or a registered version's, loaded as
    `expert predict` loads it), asked with its own system prompt on these rows."""
    from pipeline.examples import chat_messages

    if baseline.version is not None:
        where = f"eval.baselines `{baseline.name}` -> version: {baseline.version}"
        other, other_spec, system, model, tokenizer = _registered_expert(baseline.version, where)
    else:
        where = f"eval.baselines `{baseline.name}` -> run_dir: {baseline.run_dir}"
        other, other_spec, system, model, tokenizer = _run_dir_expert(baseline.run_dir, where)
    if other.task.type != ctx.recipe.task.type or other_spec != ctx.spec:
        raise UserError(f"{where}: that expert answers another task (its task type or labels/schema differ from "
                        "this run's prep/spec.json); route only between experts of the same task")
    return BaselineResult({
        s: infer_local(model, tokenizer, [{**row, "prompt": chat_messages(system, row["text"])} for row in rows],
                       other, ctx.spec, f"{baseline.name} ({s})")
        for s, rows in splits.items()
    })


def _run_dir_expert(run_dir: Path, where: str):
    """(recipe, spec, system prompt, model, tokenizer) of a trained run directory, run as its own eval ran it
    (the runtime eval and serving share, where that run has no eval yet)."""
    from pipeline import contracts, runtime
    from pipeline.eval_inference import load_expert
    from pipeline.recipe import load_recipe

    needed = [run_dir / p for p in ("recipe.yaml", "train/record.json", "train/adapter", "prep/spec.json")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise UserError(f"{where}: not a trained run directory ({', '.join(missing)} missing); run `expert train` "
                        "there first")
    other = load_recipe(run_dir / "recipe.yaml")
    spec_doc = json.loads((run_dir / "prep/spec.json").read_text(encoding="utf-8"))
    trained = contracts.read_record(run_dir / "train/record.json", contracts.TrainRecord)
    model, tokenizer = load_expert(other, trained, run_dir / "train/adapter")
    evaluated = contracts.evaluated_runtime(run_dir / "eval" / contracts.RECORD)
    model, _ = runtime.prepare(model, other, runtime.adapter_for(model, other, None, evaluated))
    return other, spec_doc["spec"], spec_doc["system_prompt"], model, tokenizer


def _registered_expert(model_uri: str, where: str):
    """(recipe, spec, system prompt, model, tokenizer) of a registered version, from its bundle, run as it was
    evaluated (`pipeline/runtime.py`), as `expert serve` would run it."""
    from pipeline import registry, runtime

    try:
        _, version = registry.load_version(model_uri)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    runtime.prepare_expert(version)
    return version.recipe, version.spec, version.system_prompt, version.model, version.tokenizer


BY_KIND = {"base_model": run_base_model, "predictions": run_predictions, "openai": run_openai,
           "expert": run_other_expert}


def run_baseline(baseline: BaselineSection, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
    return BY_KIND[baseline.kind](baseline, splits, ctx)


def load_fewshot(run: RunDir, recipe: Recipe) -> list[dict[str, Any]]:
    """prep/fewshot.json examples when a base_model baseline asks for shots; a clear error when they are missing."""
    wanting = [(i, b) for i, b in enumerate(recipe.eval.baselines) if b.kind == "base_model" and b.shots > 0]
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
    (`cascade.baseline_prompt`, which builds every escalated request of predict and serve too)."""
    from pipeline.cascade import baseline_prompt

    examples = [(example["text"], _completion_text(example)) for example in fewshot[:shots]]
    return [{**row, "prompt": baseline_prompt(system_prompt, row["prompt"], examples)} for row in rows]


def load_recorded(baseline: BaselineSection, splits: dict[str, list[dict[str, Any]]], task, spec) -> dict[str, list]:
    """Recorded outputs matched to each split's rows by id; every needed id must be there."""
    path = baseline.path
    if not path.is_file():
        raise UserError(f"eval.baselines `{baseline.name}` -> path: {path} does not exist")
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
