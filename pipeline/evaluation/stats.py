"""The statistics behind the verdict: paired bootstrap intervals, McNemar's exact test, calibration, the cascade.

Pure functions over gold answers, predictions and confidences, so each is
unit-tested on synthetic tables with known answers. Metrics are the task's
`GateMetric`s, computed from per-example rows with numpy so thousands of
bootstrap resamples stay cheap.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.tasks.metrics import GateMetric


def metric_value(metric: GateMetric, golds: list[Any], preds: list[Any], spec: Any) -> float:
    return metric.value(metric.encode(golds, preds, spec))


def paired_bootstrap(
    metric: GateMetric, golds: list[Any], preds_a: list[Any], preds_b: list[Any], spec: Any, samples: int, seed: int
) -> dict[str, float]:
    """metric(a) - metric(b) and its 95% percentile interval, resampling examples jointly for both systems."""
    n = len(golds)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    a, b = metric.encode(golds, preds_a, spec), metric.encode(golds, preds_b, spec)
    diffs = metric.resampled(a, idx) - metric.resampled(b, idx)
    low, high = np.percentile(diffs, [2.5, 97.5])
    point = metric.value(a) - metric.value(b)
    return {"difference": point, "ci_low": float(low), "ci_high": float(high), "samples": samples}


def mcnemar_exact(correct_a: list[bool], correct_b: list[bool]) -> dict[str, float]:
    """Two-sided exact McNemar test: only the discordant pairs count (a right & b wrong = `a_only`)."""
    a_only = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def calibration(confidences: list[float], correct: list[bool], bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the bins (for a reliability diagram)."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        mean_conf, accuracy = float(conf[members].mean()), float(hit[members].mean())
        ece += members.mean() * abs(mean_conf - accuracy)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                      "confidence": mean_conf, "accuracy": accuracy})
    return {"ece": float(ece), "bins": table}


def candidate_thresholds(confidences: list[float], most: int = 101) -> list[float]:
    """0 (never escalate), the observed confidences thinned to quantiles, and just above the largest (escalate all)."""
    values = np.unique(np.asarray(confidences, dtype=float))
    if len(values) > most - 2:
        values = np.unique(np.quantile(values, np.linspace(0, 1, most - 2)))
    top = float(np.nextafter(values[-1], np.inf)) if len(values) else 1.0
    return [0.0] + [float(v) for v in values if v > 0] + [top]


def machine_cost_per_1k(rows: list[dict[str, Any]], cost_per_hour: float) -> float:
    """A local model's cost per 1,000 requests: its mean measured seconds per request at the machine's hourly
    price (`eval.expert_cost_per_hour`)."""
    latencies = [r["latency_s"] for r in rows if r.get("latency_s") is not None]
    return 1000 * statistics.fmean(latencies) * cost_per_hour / 3600


def wilson_interval(agree: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share `agree`/`n` (95% at z=1.96); (0, 1) when there is nothing to count."""
    if n == 0:
        return (0.0, 1.0)
    p = agree / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


LABEL_MIX_P = 0.01  # a chi-squared p-value under this: two splits' labels are reported as mixed differently


def label_mix_differs(shift: dict[str, Any]) -> bool:
    return shift["p_value"] is not None and shift["p_value"] < LABEL_MIX_P


def moved_labels(shift: dict[str, Any]) -> str:
    """The labels whose share moved most, as text: "`a` 3.0% -> 18.0%, ..."."""
    return ", ".join(f"`{m['label']}` {m['share_a']:.1%} -> {m['share_b']:.1%}" for m in shift["moved"])


def label_mix_shift(labels_a: list[Any], labels_b: list[Any], top: int = 3) -> dict[str, Any]:
    """How differently two splits' labels are mixed: total variation distance (half the summed share gaps), the
    chi-squared test of homogeneity, and the labels whose share moved most. Thresholds chosen on a split that
    does not look like test need not hold on test."""
    from scipy.stats import chi2_contingency

    names = sorted({str(x) for x in labels_a} | {str(x) for x in labels_b})
    a = np.array([sum(str(x) == n for x in labels_a) for n in names], dtype=float)
    b = np.array([sum(str(x) == n for x in labels_b) for n in names], dtype=float)
    if not a.sum() or not b.sum():
        return {"tvd": None, "p_value": None, "moved": []}
    share_a, share_b = a / a.sum(), b / b.sum()
    p_value = float(chi2_contingency(np.stack([a, b]))[1]) if len(names) > 1 else 1.0
    order = np.argsort(-np.abs(share_a - share_b))[:top]
    return {"tvd": float(0.5 * np.abs(share_a - share_b).sum()), "p_value": p_value,
            "moved": [{"label": names[i], "share_a": float(share_a[i]), "share_b": float(share_b[i])} for i in order]}
