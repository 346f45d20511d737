"""Row checks after reading: targets against the spec, duplicates, conflicts and leakage, and the stage's limits.

Each check moves the rows it refuses to `rejected` with a reason code and
returns the rest; the limits (`data.max_rejected_fraction`,
`task.min_examples_per_class`) fail the stage with a `UserError` instead.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.examples import Example, rejection
from pipeline.recipe import Recipe
from pipeline.tasks.classification import normalize_label

# when the same text is in two splits, the copy in the later split of this order wins
PROTECTED_ORDER = ("train", "validation", "test")


def spec_of(recipe: Recipe, examples: list[Example]) -> Any:
    """The label set (recipe's, normalised, or the data's sorted labels), the JSON Schema, or None."""
    if recipe.task.type == "classification":
        if recipe.task.labels:
            return [normalize_label(label) for label in recipe.task.labels]
        return sorted({e.target for e in examples})
    return recipe.task.json_schema


def check_targets(examples: list[Example], rejected: list[dict[str, Any]], task, spec) -> list[Example]:
    """Reject labels outside the set and targets that fail the schema (with the failing JSON path)."""
    if spec is None:
        return examples
    reason = "label_outside_set" if isinstance(spec, list) else "schema_invalid"
    kept = []
    for e in examples:
        problem = task.check_target(e.target, spec)
        if problem:
            rejected.append(rejection(e, reason, problem))
        else:
            kept.append(e)
    return kept


def normalize_text(text: str) -> str:
    """The duplicate rule: Unicode NFKC, case-folded, runs of whitespace collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _split_rank(e: Example) -> int:
    return PROTECTED_ORDER.index(e.fixed_split or "train")


def check_duplicates(examples: list[Example], rejected: list[dict[str, Any]], task, spec) -> list[Example]:
    """Reject repeated ids, conflicting targets, duplicates, and texts that leak across splits.

    Texts are compared by `normalize_text`. A text seen with two different
    targets is ambiguous, so every copy is rejected (`conflicting_target`).
    Otherwise one copy is kept: the one in the most protected split (test, then
    validation, then train), earliest first; a copy in another split is
    `leakage`, a copy in the same split `duplicate_exact` (identical text) or
    `duplicate_normalized` (identical after normalisation).
    """
    keys = [_digest(normalize_text(e.text)) for e in examples]
    best: dict[bytes, int] = {}
    first_target: dict[bytes, str] = {}
    conflicts: set[bytes] = set()
    for i, (e, key) in enumerate(zip(examples, keys)):
        target = task.target_text(e.target, spec)
        if key not in best:
            best[key], first_target[key] = i, target
            continue
        if target != first_target[key]:
            conflicts.add(key)
        if _split_rank(e) > _split_rank(examples[best[key]]):
            best[key] = i
    del first_target
    kept: list[Example] = []
    seen_ids: dict[str, str] = {}
    first_loc: dict[bytes, str] = {}
    for i, (e, key) in enumerate(zip(examples, keys)):
        if key in conflicts:
            where = first_loc.setdefault(key, e.location)
            other = f"the same text at {where} has another target" if where != e.location else "the same text appears later with another target"
            rejected.append(rejection(e, "conflicting_target", other))
            continue
        keeper = examples[best[key]]
        if best[key] != i:
            if (keeper.fixed_split or "train") != (e.fixed_split or "train"):
                rejected.append(rejection(
                    e, "leakage", f"same text as {keeper.location} in the {keeper.fixed_split} split; removed from {e.fixed_split or 'train'}"
                ))
            elif keeper.text == e.text:
                rejected.append(rejection(e, "duplicate_exact", f"same text as {keeper.location}"))
            else:
                rejected.append(rejection(e, "duplicate_normalized", f"same text as {keeper.location} after normalising case, whitespace and Unicode"))
            continue
        if e.id in seen_ids:
            rejected.append(rejection(e, "duplicate_id", f"id `{e.id}` is already used at {seen_ids[e.id]}"))
            continue
        seen_ids[e.id] = e.location
        kept.append(e)
    return kept


def check_rejected_fraction(rejected: list[dict[str, Any]], total: int, limit: float, path: Path) -> None:
    if total and len(rejected) / total > limit:
        by_reason = Counter(r["reason"] for r in rejected)
        summary = ", ".join(f"{reason}: {n}" for reason, n in by_reason.most_common())
        raise UserError(
            f"data: {len(rejected)} of {total} rows rejected ({len(rejected) / total:.1%}), above "
            f"data.max_rejected_fraction={limit}. By reason: {summary}. Each row is listed in {path}; "
            "fix the data or raise the limit."
        )


def check_class_counts(examples: list[Example], recipe: Recipe, spec) -> None:
    """Every class of a classification task needs task.min_examples_per_class usable rows."""
    if recipe.task.type != "classification":
        return
    minimum = recipe.task.min_examples_per_class
    counts = Counter(e.target for e in examples)
    short = [(label, counts.get(label, 0)) for label in spec if counts.get(label, 0) < minimum]
    if short:
        listed = ", ".join(f"`{label}` has {n}" for label, n in short)
        raise UserError(
            f"task.min_examples_per_class={minimum}: {len(short)} class(es) have too few usable rows: {listed}. "
            "Add examples, remove the class from task.labels (or the data), or lower task.min_examples_per_class."
        )


def check_pii(examples: list[Example], rejected: list[dict[str, Any]], recipe: Recipe) -> tuple[list[Example], Counter]:
    """`data.pii` on every row before anything is written, sent or logged: `redact` replaces personal data in the
    input, the string leaves of the target and the id; `reject` drops the row as `pii`, naming only the kinds.
    Rejection details already recorded are redacted too (they may quote a row). Returns the rows and the finds
    by kind."""
    from pipeline import pii

    found: Counter = Counter()
    if recipe.data.pii == "keep":
        return examples, found
    kinds, region = recipe.data.pii_kinds, recipe.data.pii_region
    try:
        pii.check_kinds(kinds)
        pii.redact("", kinds, region=region)
    except ValueError as err:
        raise UserError(f"data.pii_region: {err}") from None

    def clean(value: Any, counts: Counter) -> Any:
        if isinstance(value, str):
            text, n = pii.redact(value, kinds, region=region)
            counts.update(n)
            return text
        if isinstance(value, dict):
            return {k: clean(v, counts) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, counts) for v in value]
        return value

    kept: list[Example] = []
    for e in examples:
        counts: Counter = Counter()
        text, row_id = clean(e.text, counts), clean(e.id, counts)
        target = e.target if recipe.task.type == "classification" else clean(e.target, counts)
        found.update(counts)
        if counts and recipe.data.pii == "reject":
            rejected.append({"source": e.source, "line": e.line, "id": row_id, "reason": "pii",
                             "detail": "holds " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))})
            continue
        e.text, e.id, e.target = text, row_id, target
        kept.append(e)
    for r in rejected:
        r["detail"] = clean(r["detail"], Counter())
        if "id" in r:
            r["id"] = clean(r["id"], Counter())
    return kept, found
