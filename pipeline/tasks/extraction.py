"""Extraction: the answer is one JSON object that satisfies the recipe's JSON Schema.

The target text is canonical JSON (keys in the schema's property order, no
extra whitespace variation), so training teaches one spelling of each answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from jsonschema import Draft202012Validator

from pipeline.data import json_depth
from pipeline.tasks.metrics import GateMetric, MeanMetric, exact, mean, parsed
from pipeline.tasks.metrics import gate_metric as gate_metric_of
from pipeline.tasks.shared import check_no_class_minimum, mean_token_probability

inference = "constrained_json"
gate_metrics = ("field_exact_match", "exact_match", "valid_json_rate")
target_rejection = "schema_invalid"
label_set = False


def check_section(section) -> None:
    """`schema` is required and a valid JSON Schema (draft 2020-12); no `labels`, no `min_examples_per_class`."""
    check_no_class_minimum(section)
    if section.json_schema is None:
        raise ValueError("extraction tasks need `schema`: the JSON Schema of the target object")
    if section.labels is not None:
        raise ValueError("`labels` applies to classification tasks only; remove it")
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(section.json_schema)
    except SchemaError as err:
        raise ValueError(f"`schema` is not a valid JSON Schema: {err.message}") from None


def check_data(section, data) -> None:
    return None  # the target is a field holding the object, or a mapping of fields that builds it


def spec_of(section, targets: list[dict[str, Any]]) -> dict[str, Any]:
    return section.json_schema


def labels_of(obj: dict[str, Any]) -> list[str]:
    return []


def stratum(obj: dict[str, Any]) -> str:
    return ""


def normalize_target(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = json_depth.loads(raw)
        except json_depth.TooDeep as err:
            raise ValueError(f"target is {err}") from None
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


def decoding_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return spec


def frontier_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return spec  # sent as the endpoint's structured-output schema where the baseline allows it


def answer_confidence(token_logprobs: list[float]) -> float:
    """The geometric mean of the answer's token probabilities, under the schema's mask when decoding is
    constrained."""
    return mean_token_probability(token_logprobs)


def max_answer_tokens(spec: dict[str, Any]) -> None:
    return None  # an object's length is not bounded by the schema: the teacher's max_new_tokens


# an answer may come wrapped in a markdown code block (```json ... ```), the way chat models write JSON
_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n(.*)\n[ \t]*```\Z", re.DOTALL)


def parse_answer(text: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The answer as an object when it is exactly one JSON object that satisfies the schema, else None.

    Surrounding whitespace and one markdown code block around the object are allowed; any other text is not
    ("Not {...}. It is {...}" would otherwise be read as the object it denies). An answer nested deeper than
    `json_depth.MAX_DEPTH`, which neither the parser nor the validator could walk, is None too."""
    answer = text.strip()
    fenced = _FENCE.match(answer)
    if fenced:
        answer = fenced.group(1).strip()
    if not answer.startswith("{"):
        return None
    try:
        obj = json_depth.loads(answer)
    except (json_depth.TooDeep, json.JSONDecodeError):
        return None
    if isinstance(obj, dict) and check_target(obj, spec) is None:
        return obj
    return None


def leaves(value: Any, path: str = "$") -> list[tuple[str, str]]:
    """An object as (JSON path, value) pairs: nested objects by key, list items each at their list's path
    (a slot holding two values is two pairs, whatever their order); the unit of field precision/recall."""
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in leaves(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [pair for item in value for pair in leaves(item, path)]
    return [(path, json.dumps(value, ensure_ascii=False, sort_keys=True))]


def precision_recall_f1(golds: list[list], preds: list[list]) -> dict[str, float]:
    """Micro-averaged over examples: a predicted pair is right when the gold object of its example holds it."""
    from collections import Counter

    tp = predicted = relevant = 0
    for gold, pred in zip(golds, preds, strict=True):
        g, p = Counter(gold), Counter(pred)
        tp += sum((g & p).values())
        predicted += sum(p.values())
        relevant += sum(g.values())
    precision = tp / predicted if predicted else 0.0
    recall = tp / relevant if relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": relevant}


def metrics(golds: list[dict[str, Any]], preds: list[dict[str, Any] | None], spec: dict[str, Any]) -> dict[str, Any]:
    fields = list(spec.get("properties", {})) or sorted({k for g in golds for k in g})
    per_field = {f: mean([p is not None and p.get(f) == g.get(f) for g, p in zip(golds, preds)]) for f in fields}
    gold_leaves = [leaves(g) for g in golds]
    pred_leaves = [leaves(p) if p is not None else [] for p in preds]

    def under(field: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(path, v) for path, v in pairs if path == f"$.{field}" or path.startswith(f"$.{field}.")]

    return {
        "valid_json_rate": mean([p is not None for p in preds]),
        "exact_match": mean([p == g for g, p in zip(golds, preds)]),
        "field_exact_match": mean(list(per_field.values())),
        "per_field": per_field,
        # every leaf value (nested keys and list items too), micro-averaged, overall and per top-level field
        "micro_f1": precision_recall_f1(gold_leaves, pred_leaves)["f1"],
        "field_f1": {f: precision_recall_f1([under(f, g) for g in gold_leaves], [under(f, p) for p in pred_leaves])
                     for f in fields},
        "unparsed": sum(p is None for p in preds),
    }


class FieldExactMatch(MeanMetric):
    """Per example, the share of fields (the schema's properties, else every key of any gold) it gets exactly."""

    def encode(self, golds: list[dict[str, Any]], preds: list[Any], spec: dict[str, Any]):
        fields = list(spec.get("properties", {})) or sorted({k for g in golds for k in g})
        return np.array([mean([p is not None and p.get(f) == g.get(f) for f in fields])
                         for g, p in zip(golds, preds, strict=True)], dtype=float)


_GATE_METRICS = {
    "exact_match": MeanMetric("exact_match", exact),
    "valid_json_rate": MeanMetric("valid_json_rate", parsed),
    "field_exact_match": FieldExactMatch("field_exact_match", exact),
}


def gate_metric(name: str) -> GateMetric:
    return gate_metric_of(_GATE_METRICS, name)


def write_plots(folder: Path, golds: list[dict[str, Any]], predictions: dict[str, list[Any]],
                spec: dict[str, Any]) -> None:
    return None


def report_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    return []
