"""Plain metric functions shared by the task types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def mean(values: list[Any]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def accuracy(golds: list[Any], preds: list[Any]) -> float:
    return mean([g == p for g, p in zip(golds, preds, strict=True)])


def label_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1 and support of one label from its true positives, false positives and misses."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}


def f1_report(golds: list[str], preds: list[str | None], labels: list[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1 and their macro average over classes present in gold or predictions.

    An unparsable prediction (None) counts as wrong for its gold class.
    """
    per_class: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        if tp + fp + fn:
            per_class[label] = label_scores(tp, fp, fn)
    return {"macro_f1": mean([c["f1"] for c in per_class.values()]), "per_class": per_class}


class GateMetric:
    """A metric the gate, the cascade or a route may name, in a form that resamples and tier mixes cost one gather:
    `encode` turns each example (gold and prediction) into a row of numbers, and `value` gives the metric of any
    selection of rows (a bootstrap resample, the answers of a mix of tiers); the rows of one system stacked with
    another's give their mix."""

    def __init__(self, name: str):
        self.name = name

    def encode(self, golds: list[Any], preds: list[Any], spec: Any) -> np.ndarray:
        raise NotImplementedError

    def value(self, encoded: np.ndarray) -> float:
        raise NotImplementedError

    def resampled(self, encoded: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The metric on each bootstrap resample (rows of `idx`, indices into `encoded`)."""
        return np.array([self.value(encoded[rows]) for rows in idx])


class MeanMetric(GateMetric):
    """A mean over examples of a per-example score (`score(gold, prediction, spec)`)."""

    def __init__(self, name: str, score: Callable[[Any, Any, Any], float]):
        super().__init__(name)
        self.score = score

    def encode(self, golds: list[Any], preds: list[Any], spec: Any) -> np.ndarray:
        return np.array([self.score(g, p, spec) for g, p in zip(golds, preds, strict=True)], dtype=float)

    def value(self, encoded: np.ndarray) -> float:
        return float(encoded.mean()) if len(encoded) else 0.0

    def resampled(self, encoded: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return encoded[idx].mean(axis=1)


def exact(gold: Any, pred: Any, spec: Any) -> float:
    """The whole answer equals the target (an unparsable answer, None, never does)."""
    return float(pred is not None and pred == gold)


def parsed(gold: Any, pred: Any, spec: Any) -> float:
    return float(pred is not None)


class LabelCodeMacroF1(GateMetric):
    """Macro-F1 of one-label answers (`f1_report`'s definition): a row is the gold's and the prediction's index in
    the label set (-1: unparsable, wrong for every class), so a selection costs two bincounts."""

    def __init__(self):
        super().__init__("macro_f1")

    def encode(self, golds: list[Any], preds: list[Any], spec: Any) -> np.ndarray:
        index = {label: i for i, label in enumerate(spec)}
        codes = [(index[g], index.get(p, -1) if p is not None else -1) for g, p in zip(golds, preds, strict=True)]
        return np.array(codes, dtype=np.int64).reshape(len(codes), 2)

    def value(self, encoded: np.ndarray) -> float:
        gold, pred = encoded[:, 0], encoded[:, 1]
        n_labels = int(encoded.max()) + 1 if len(encoded) else 0  # labels past the largest code are absent
        hit = gold == pred
        tp = np.bincount(gold[hit], minlength=n_labels)
        gold_n = np.bincount(gold, minlength=n_labels)
        pred_n = np.bincount(pred[pred >= 0], minlength=n_labels)
        present = (gold_n + pred_n) > 0
        f1 = np.where(gold_n + pred_n > 0, 2 * tp / np.maximum(gold_n + pred_n, 1), 0.0)  # 2tp / (2tp + fp + fn)
        return float(f1[present].mean()) if present.any() else 0.0


class LabelSetMacroF1(GateMetric):
    """Macro-F1 over the labels present in gold or predictions (`f1_report`'s definition), for answers that are a
    set of labels (`labels_of`: one label for classification, several for multi-label). A row is the example's
    gold and predicted labels as two indicator vectors over the label set; an unparsable answer predicts none."""

    def __init__(self, labels_of: Callable[[Any], list[str]]):
        super().__init__("macro_f1")
        self.labels_of = labels_of

    def encode(self, golds: list[Any], preds: list[Any], spec: Any) -> np.ndarray:
        index = {label: i for i, label in enumerate(spec)}
        rows = np.zeros((len(golds), 2 * len(spec)), dtype=np.int32)
        for row, (g, p) in enumerate(zip(golds, preds, strict=True)):
            rows[row, [index[label] for label in self.labels_of(g)]] = 1
            if p is not None:
                rows[row, [len(spec) + index[label] for label in self.labels_of(p) if label in index]] = 1
        return rows

    def value(self, encoded: np.ndarray) -> float:
        k = encoded.shape[1] // 2
        gold, pred = encoded[:, :k], encoded[:, k:]
        tp, gold_n, pred_n = (gold & pred).sum(axis=0), gold.sum(axis=0), pred.sum(axis=0)
        present = (gold_n + pred_n) > 0
        f1 = 2 * tp / np.maximum(gold_n + pred_n, 1)  # 2tp / (2tp + fp + fn)
        return float(f1[present].mean()) if present.any() else 0.0


class LabelSetMicroF1(GateMetric):
    """Micro-F1 over every (example, label) decision of a label-set answer: a row is the example's true positives,
    false positives and false negatives; an unparsable answer predicts no label."""

    def __init__(self, labels_of: Callable[[Any], list[str]]):
        super().__init__("micro_f1")
        self.labels_of = labels_of

    def encode(self, golds: list[Any], preds: list[Any], spec: Any) -> np.ndarray:
        rows = []
        for g, p in zip(golds, preds, strict=True):
            gold, pred = set(self.labels_of(g)), set(self.labels_of(p)) if p is not None else set()
            rows.append((len(gold & pred), len(pred - gold), len(gold - pred)))
        return np.array(rows, dtype=float).reshape(len(rows), 3)

    def value(self, encoded: np.ndarray) -> float:
        tp, fp, fn = encoded.sum(axis=0)
        return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0

    def resampled(self, encoded: np.ndarray, idx: np.ndarray) -> np.ndarray:
        tp, fp, fn = (encoded[idx].sum(axis=1)).T
        denominator = 2 * tp + fp + fn
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-300), 0.0)


def gate_metric(metrics: dict[str, GateMetric], name: str) -> GateMetric:
    if name not in metrics:
        raise ValueError(f"`{name}` is not a gate metric of this task; use one of {', '.join(sorted(metrics))}")
    return metrics[name]
