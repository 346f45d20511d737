"""Extraction: the answer is one JSON object that satisfies the recipe's JSON Schema.

The target text is canonical JSON (keys in the schema's property order, no
extra whitespace variation), so training teaches one spelling of each answer.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

from pipeline.tasks.metrics import mean


def normalize_target(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"target is a string but not JSON: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"target must be a JSON object, got {type(raw).__name__}")
    return raw


def check_target(obj: dict[str, Any], spec: dict[str, Any]) -> str | None:
    """Why a target fails the schema (with its JSON path), or None when it is valid."""
    errors = sorted(Draft202012Validator(spec).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    first = errors[0]
    return f"target fails the schema at {first.json_path}: {first.message}"


def target_text(obj: dict[str, Any], spec: dict[str, Any] | None = None) -> str:
    order = list((spec or {}).get("properties", {}))
    keys = [k for k in order if k in obj] + sorted(k for k in obj if k not in order)
    return json.dumps({k: obj[k] for k in keys}, ensure_ascii=False)


def system_prompt(instruction: str, spec: dict[str, Any]) -> str:
    return (
        f"{instruction}\nReply with one JSON object and nothing else. It must match this JSON Schema:\n"
        f"{json.dumps(spec, ensure_ascii=False)}"
    )


def parse_answer(text: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The first JSON object in the text if it satisfies the schema, else None."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict) and check_target(obj, spec) is None:
            return obj
        return None
    return None


def metrics(golds: list[dict[str, Any]], preds: list[dict[str, Any] | None], spec: dict[str, Any]) -> dict[str, Any]:
    fields = list(spec.get("properties", {})) or sorted({k for g in golds for k in g})
    per_field = {f: mean([p is not None and p.get(f) == g.get(f) for g, p in zip(golds, preds)]) for f in fields}
    return {
        "valid_json_rate": mean([p is not None for p in preds]),
        "exact_match": mean([p == g for g, p in zip(golds, preds)]),
        "field_exact_match": mean(list(per_field.values())),
        "per_field": per_field,
        "unparsed": sum(p is None for p in preds),
    }
