"""Plain metric functions shared by the task types."""

from __future__ import annotations

from typing import Any


def mean(values: list[Any]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def accuracy(golds: list[Any], preds: list[Any]) -> float:
    return mean([g == p for g, p in zip(golds, preds, strict=True)])


def f1_report(golds: list[str], preds: list[str | None], labels: list[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1 and their macro average over classes present in gold or predictions.

    An unparsable prediction (None) counts as wrong for its gold class.
    """
    per_class: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        if tp + fp + fn == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return {"macro_f1": mean([c["f1"] for c in per_class.values()]), "per_class": per_class}
