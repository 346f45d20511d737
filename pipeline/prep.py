"""Stage 1, prep: load the user's data, reject bad rows loudly, split, render chat prompts.

Outputs (under `prep/`): `train.jsonl`, `validation.jsonl`, `test.jsonl` (each
row: id, text, target, and the TRL prompt/completion chat messages),
`spec.json` (the label set or JSON Schema), `rejected.jsonl` (every rejected
row with its source line and reason) and `stats.json`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.table import Table

from pipeline import models, tasks
from pipeline.errors import UserError
from pipeline.ui import console
from pipeline.recipe import Recipe
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_jsonl, file_hash

STAGE = "prep"
SPLITS = ("train", "validation", "test")
OUTPUTS = [f"{STAGE}/{s}.jsonl" for s in SPLITS] + [f"{STAGE}/spec.json", f"{STAGE}/stats.json"]


@dataclass
class Example:
    id: str
    line: int
    text: str
    target: Any


def inputs_of(recipe: Recipe) -> dict[str, str]:
    source = recipe.data.source
    if not source.is_file():
        raise UserError(f"data.source: {source} does not exist; fix the path (relative paths start at the recipe's folder)")
    return {
        "recipe:task,data,model.base": recipe.section_hash("task", "data") + ":" + recipe.model.base,
        "data.source": file_hash(source),
    }


def run(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    inputs = inputs_of(recipe)
    if run.is_current(STAGE, inputs):
        console.print(f"[green]prep[/]: up to date in {run.path / STAGE}, skipped")
        return run.stage_record(STAGE)
    with run.attempt(STAGE, inputs):
        task = tasks.for_type(recipe.task.type)
        console.print(f"[bold]prep[/]: reading {recipe.data.source}")
        examples, rejected = load_examples(recipe, task)
        spec = recipe.task.labels or recipe.task.json_schema or sorted({e.target for e in examples})
        examples, rejected = check_examples(examples, rejected, task, spec)
        tokenizer = models.load_tokenizer(*_tokenizer_source(recipe))
        system = task.system_prompt(recipe.task.instruction, spec)
        examples, rejected = reject_too_long(examples, rejected, tokenizer, system, recipe, task, spec)
        out = run.stage_dir(STAGE)
        atomic_write_jsonl(out / "rejected.jsonl", rejected)
        total = len(examples) + len(rejected)
        check_rejected_fraction(rejected, total, recipe.data.max_rejected_fraction, out / "rejected.jsonl")
        splits = split_examples(examples, recipe)
        for name, rows in splits.items():
            if not rows:
                raise UserError(f"data.split: the {name} split is empty ({total} usable rows); add data or change the split fractions")
            atomic_write_jsonl(out / f"{name}.jsonl", [render(e, system, task, spec) for e in rows])
        atomic_write_json(out / "spec.json", {"task": recipe.task.type, "spec": spec, "system_prompt": system})
        fingerprint = data_fingerprint(recipe, [out / f"{s}.jsonl" for s in SPLITS])
        stats = build_stats(splits, rejected, recipe.task.type, fingerprint)
        atomic_write_json(out / "stats.json", stats)
        print_stats(stats)
        run.finish_stage(STAGE, OUTPUTS, fingerprint=fingerprint)
    return run.stage_record(STAGE)


def _tokenizer_source(recipe: Recipe) -> tuple[Path | str, bool]:
    source, _ = models.resolve_base(recipe.model.base)
    return source, recipe.model.trust_remote_code


def get_field(row: dict[str, Any], path: str) -> Any:
    """Look up a dotted field path (`meta.subject`); KeyError names the missing part."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def read_rows(source: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line number, row or None, problem) for every data row of a .jsonl or .csv file."""
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        with source.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield line_no, None, "undecodable: not UTF-8"
                    continue
                except json.JSONDecodeError as err:
                    yield line_no, None, f"unparsable: {err.msg}"
                    continue
                if not isinstance(row, dict):
                    yield line_no, None, "unparsable: line is not a JSON object"
                    continue
                yield line_no, row, None
    elif suffix == ".csv":
        with source.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, dict(row), None
    else:
        raise UserError(f"data.source: {source}: unsupported file type `{suffix}`; use .jsonl or .csv")


def load_examples(recipe: Recipe, task) -> tuple[list[Example], list[dict[str, Any]]]:
    fields = recipe.data.fields
    examples: list[Example] = []
    rejected: list[dict[str, Any]] = []
    source = recipe.data.source

    def reject(line: int, reason: str, detail: str) -> None:
        rejected.append({"source": str(source), "line": line, "reason": reason, "detail": detail})

    try:
        for line, row, problem in read_rows(source):
            if row is None:
                reject(line, problem.split(":")[0], problem)
                continue
            try:
                text = get_field(row, fields.text)
                target = get_field(row, fields.target)
                row_id = str(get_field(row, fields.id)) if fields.id else f"{source.stem}:{line}"
            except KeyError as err:
                reject(line, "missing_field", f"field `{err.args[0]}` is missing")
                continue
            if not isinstance(text, str):
                reject(line, "non_text", f"`{fields.text}` is {type(text).__name__}, not text")
                continue
            if not text.strip():
                reject(line, "empty_text", f"`{fields.text}` is empty")
                continue
            try:
                target = task.normalize_target(target)
            except ValueError as err:
                reject(line, "bad_target", str(err))
                continue
            examples.append(Example(id=row_id, line=line, text=text.strip(), target=target))
    except UnicodeDecodeError as err:
        raise UserError(f"data.source: {source} is not UTF-8 text ({err}); re-encode it as UTF-8") from None
    if not examples:
        raise UserError(f"data.source: {source} has no usable rows ({len(rejected)} rejected); check data.fields")
    return examples, rejected


def check_examples(examples: list[Example], rejected: list[dict[str, Any]], task, spec) -> tuple[list[Example], list[dict[str, Any]]]:
    """Reject targets outside the spec, repeated texts, and texts seen with conflicting targets."""
    kept: list[Example] = []
    first_seen: dict[str, Example] = {}
    for e in examples:
        problem = task.check_target(e.target, spec)
        reason = "label_outside_set" if isinstance(spec, list) else "schema_invalid"
        if problem:
            rejected.append(_rejection(e, reason, problem))
            continue
        key = " ".join(e.text.lower().split())
        earlier = first_seen.get(key)
        if earlier is not None:
            if earlier.target == e.target:
                rejected.append(_rejection(e, "duplicate", f"same text as line {earlier.line}"))
            else:
                rejected.append(_rejection(e, "conflicting_target", f"same text as line {earlier.line} with another target"))
            continue
        first_seen[key] = e
        kept.append(e)
    return kept, rejected


def _rejection(e: Example, reason: str, detail: str) -> dict[str, Any]:
    return {"id": e.id, "line": e.line, "reason": reason, "detail": detail}


def reject_too_long(examples, rejected, tokenizer, system, recipe: Recipe, task, spec):
    limit = recipe.data.max_tokens
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": e.text},
             {"role": "assistant", "content": task.target_text(e.target, spec)}],
            tokenize=False,
        )
        for e in examples
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = []
    for e, n in zip(examples, lengths):
        if n > limit:
            rejected.append(_rejection(e, "too_long", f"{n} tokens > data.max_tokens={limit}"))
        else:
            kept.append(e)
    return kept, rejected


def check_rejected_fraction(rejected: list[dict[str, Any]], total: int, limit: float, path: Path) -> None:
    if total and len(rejected) / total > limit:
        by_reason = Counter(r["reason"] for r in rejected)
        summary = ", ".join(f"{reason}: {n}" for reason, n in by_reason.most_common())
        raise UserError(
            f"data: {len(rejected)} of {total} rows rejected ({len(rejected) / total:.1%}), above "
            f"data.max_rejected_fraction={limit}. By reason: {summary}. Each row is listed in {path}; "
            "fix the data or raise the limit."
        )


def split_examples(examples: list[Example], recipe: Recipe) -> dict[str, list[Example]]:
    """Seeded, deterministic split; stratified by target for classification."""
    split = recipe.data.split
    rng = random.Random(split.seed)
    groups: dict[str, list[Example]] = defaultdict(list)
    if split.stratify and recipe.task.type == "classification":
        for e in examples:
            groups[e.target].append(e)
    else:
        groups[""] = list(examples)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda e: e.line)
        rng.shuffle(members)
        n = len(members)
        n_test, n_val = round(n * split.test), round(n * split.validation)
        if n >= 3:  # every split gets each class where its count allows
            n_test, n_val = max(n_test, 1 if split.test else 0), max(n_val, 1 if split.validation else 0)
        out["test"] += members[:n_test]
        out["validation"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    for rows in out.values():
        rows.sort(key=lambda e: e.line)
    return out


def render(e: Example, system: str, task, spec) -> dict[str, Any]:
    return {
        "id": e.id,
        "text": e.text,
        "target": e.target,
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": e.text}],
        "completion": [{"role": "assistant", "content": task.target_text(e.target, spec)}],
    }


def data_fingerprint(recipe: Recipe, split_files: list[Path]) -> str:
    h = hashlib.sha256(recipe.section_hash("data", "task").encode())
    for p in split_files:
        h.update(file_hash(p).encode())
    return h.hexdigest()


def build_stats(splits: dict[str, list[Example]], rejected: list[dict[str, Any]], task_type: str, fingerprint: str) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "rows": {s: len(rows) for s, rows in splits.items()},
        "rejected": dict(Counter(r["reason"] for r in rejected)),
        "fingerprint": fingerprint,
    }
    if task_type == "classification":
        stats["classes"] = {s: dict(sorted(Counter(e.target for e in rows).items())) for s, rows in splits.items()}
    return stats


def print_stats(stats: dict[str, Any]) -> None:
    table = Table(title="prep: rows per split")
    for col in ("split", "rows"):
        table.add_column(col)
    for split, n in stats["rows"].items():
        table.add_row(split, str(n))
    table.add_row("rejected", str(sum(stats["rejected"].values())))
    console.print(table)
    if stats["rejected"]:
        console.print("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in stats["rejected"].items()))
