"""Multi-label classification (tagging): the answer is a non-empty set of labels from a fixed set.

A target or an answer is the list of its labels, each once, sorted (Python's string order, after the
classification rule's normalisation: Unicode NFC, surrounding whitespace stripped), so two answers with the same
labels are equal whatever order they were written in. The expert is trained on the JSON list (`["a", "b"]`) and
decodes under a JSON Schema that admits only labels of the set (`decoding_schema`).

An answer parses only when it is exactly a set of labels: a JSON list of strings, or labels separated by commas,
each item exactly one label of the set, none twice, at least one. Anything else ("billing and shipping", an
unknown label, a duplicate, an empty list) is unparsable (None) and counts as wrong.

Confidence for routing: the probability of the whole answer, the product of its token probabilities under the
decoding mask (`answer_confidence`), so an answer is sure only when the model is sure of every label it chose and
of stopping where it did; a set is right only when all of it is (exact match is what a routed answer must get).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.tasks import classification
from pipeline.tasks.classification import normalize_label
from pipeline.tasks.metrics import (
    GateMetric,
    LabelSetMacroF1,
    LabelSetMicroF1,
    MeanMetric,
    exact,
    label_scores,
    mean,
)
from pipeline.tasks.metrics import gate_metric as gate_metric_of

inference = "constrained_json"
gate_metrics = ("micro_f1", "macro_f1", "exact_match")
target_rejection = "label_outside_set"
label_set = True
# the recipe rules of a label set are classification's: `labels` optional and distinct, no `schema`; log formats
# need the labels; the target is one field
check_section = classification.check_section
check_data = classification.check_data


def normalize_target(raw: Any) -> list[str]:
    """A list of labels (or a string holding a JSON list), each normalised; sorted; empty or repeated is an error."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError("labels must be a list (or a JSON list), got a string that is not JSON") from None
    if not isinstance(raw, list):
        raise ValueError(f"labels must be a list, got {type(raw).__name__}")
    labels = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"each label must be a string, got {type(item).__name__}")
        labels.append(normalize_label(str(item)))
    if not labels or any(not label for label in labels):
        raise ValueError("labels are empty" if not labels else "a label is empty")
    twice = sorted(label for label, n in Counter(labels).items() if n > 1)
    if twice:
        raise ValueError(f"label `{twice[0]}` is listed twice")
    return sorted(labels)


def spec_of(section, targets: list[list[str]]) -> list[str]:
    """The label set: the recipe's (normalised), else every label of the data, sorted."""
    if section.labels:
        return [normalize_label(label) for label in section.labels]
    return sorted({label for target in targets for label in target})


def check_target(labels: list[str], spec: list[str]) -> str | None:
    outside = [label for label in labels if label not in spec]
    if outside:
        return f"label `{outside[0]}` is not in the label set"
    return None


def labels_of(labels: list[str]) -> list[str]:
    return labels


def stratum(labels: list[str]) -> str:
    """The whole set: rows with the same labels are split alike."""
    return json.dumps(labels, ensure_ascii=False)


def target_text(labels: list[str], spec: list[str] | None = None) -> str:
    return json.dumps(labels, ensure_ascii=False)


def system_prompt(instruction: str, spec: list[str]) -> str:
    return (f"{instruction}\nAnswer with a JSON list of every label that applies, at least one, each once, and "
            f"nothing else. The labels: {', '.join(spec)}.")


def parse_answer(text: str, spec: list[str]) -> list[str] | None:
    """The sorted labels an answer is, or None unless it is exactly a set of labels (see the module's rule)."""
    answer = unicodedata.normalize("NFC", text).strip()
    if answer.startswith("["):
        try:
            items = json.loads(answer)
        except json.JSONDecodeError:
            return None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            return None
    else:
        items = answer.split(",")
    labels = [item.strip() for item in items]
    if not labels or any(label not in spec for label in labels) or len(set(labels)) != len(labels):
        return None
    return sorted(labels)


def decoding_schema(spec: list[str]) -> dict[str, Any]:
    """A non-empty JSON list of labels of the set (a repeated label, which the schema cannot forbid, is parsed as
    unparsable)."""
    return {"type": "array", "items": {"enum": list(spec)}, "minItems": 1}


def frontier_schema(spec: list[str]) -> None:
    return None  # structured outputs want an object at the root; the prompt lists the labels and the format


def answer_confidence(token_logprobs: list[float]) -> float:
    """The probability of the whole answer: the product of its token probabilities."""
    return math.exp(sum(token_logprobs)) if token_logprobs else 0.0


def max_answer_tokens(spec: list[str]) -> int:
    """Every label once, quoted and separated, with room to spare (about four characters a token)."""
    return sum(len(label) + 4 for label in spec) // 4 + 2


def per_label(golds: list[list[str]], preds: list[list[str] | None], spec: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each label present in gold or predictions."""
    out = {}
    for label in spec:
        tp = sum(label in g and p is not None and label in p for g, p in zip(golds, preds))
        fp = sum(label not in g and p is not None and label in p for g, p in zip(golds, preds))
        fn = sum(label in g and (p is None or label not in p) for g, p in zip(golds, preds))
        if tp + fp + fn:
            out[label] = label_scores(tp, fp, fn)
    return out


_GATE_METRICS = {"micro_f1": LabelSetMicroF1(labels_of), "macro_f1": LabelSetMacroF1(labels_of),
                 "exact_match": MeanMetric("exact_match", exact)}


def metrics(golds: list[list[str]], preds: list[list[str] | None], spec: list[str]) -> dict[str, Any]:
    return {
        "exact_match": mean([p is not None and p == g for g, p in zip(golds, preds)]),
        "micro_f1": _value("micro_f1", golds, preds, spec),
        "macro_f1": _value("macro_f1", golds, preds, spec),
        "per_label": per_label(golds, preds, spec),
        "unparsed": sum(p is None for p in preds),
    }


def _value(name: str, golds: list[list[str]], preds: list[list[str] | None], spec: list[str]) -> float:
    metric = gate_metric(name)
    return metric.value(metric.encode(golds, preds, spec))


def gate_metric(name: str) -> GateMetric:
    return gate_metric_of(_GATE_METRICS, name)


def write_plots(folder: Path, golds: list[list[str]], predictions: dict[str, list[Any]], spec: list[str]) -> None:
    return None  # the per-label table in the report says what a confusion matrix would


def report_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Per label and system: precision / recall / F1 and the gold count."""
    lines = ["", "## Labels (precision / recall / F1 per label, over every example's decision on it)", "",
             "| system | label | precision | recall | F1 | gold |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        for label, prf in m["per_label"].items():
            lines.append(f"| {name} | {label} | {prf['precision']:.4f} | {prf['recall']:.4f} | {prf['f1']:.4f} | "
                         f"{prf['support']} |")
    return lines
