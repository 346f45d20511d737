"""The eval stage's PNG plots: confusion matrix, reliability diagram, cascade quality vs cost.

matplotlib with the non-interactive Agg backend, written atomically like every
other run-directory file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def confusion_matrix(path: Path, golds: list[str], preds: list[str | None], labels: list[str], title: str) -> None:
    plt = _figure()
    columns = labels + (["(unparsed)"] if any(p is None for p in preds) else [])
    index = {label: i for i, label in enumerate(columns)}
    counts = [[0] * len(columns) for _ in labels]
    for g, p in zip(golds, preds):
        counts[index[g]][index[p if p is not None else "(unparsed)"]] += 1
    size = max(4, 0.35 * len(columns) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7 if len(columns) > 20 else 9)
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    if len(columns) <= 20:
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                if c:
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=8)
    _save(plt, fig, path)


def reliability_diagram(path: Path, calibration: dict[str, Any], title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = calibration["bins"]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins],
           width=[b["high"] - b["low"] for b in bins], alpha=0.6, edgecolor="black", label="accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {calibration['ece']:.3f})")
    ax.legend(loc="upper left")
    _save(plt, fig, path)


def cascade_plot(path: Path, curve: list[dict[str, Any]], expert: dict[str, Any], frontier: dict[str, Any],
                 chosen: dict[str, Any] | None, metric: str, target: float) -> None:
    """Quality vs cost per 1,000 requests (or share escalated when a price is missing) along the test curve.

    `expert` and `frontier` are {"metric", "cost_per_1k"} of each system alone.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    priced = all(p["cost_per_1k"] is not None for p in curve)
    key = "cost_per_1k" if priced else "escalation_rate"
    ax.plot([p[key] for p in curve], [p["metric"] for p in curve], marker=".", label="cascade")
    ax.scatter(expert["cost_per_1k"] if priced else 0.0, expert["metric"], marker="s", s=60, color="tab:green",
               label="expert only", zorder=3)
    ax.scatter(frontier["cost_per_1k"] if priced else 1.0, frontier["metric"], marker="^", s=60, color="tab:red",
               label="frontier only", zorder=3)
    if chosen is not None:
        ax.scatter(chosen[key], chosen["metric"], marker="*", s=160, color="gold", edgecolor="black",
                   label=f"chosen threshold {chosen['threshold']:.3f}", zorder=4)
    ax.axhline(target, linestyle=":", color="grey", label=f"target {target}")
    ax.set_xlabel("cost per 1,000 requests ($)" if priced else "share escalated to the frontier")
    ax.set_ylabel(metric)
    ax.set_title("cascade on the test split")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def route_plot(path: Path, route: dict[str, Any]) -> None:
    """Every threshold combination's cost and quality on test (grey), their Pareto front, each tier alone and the
    chosen point(s), with the target."""
    from matplotlib.ticker import NullFormatter

    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    grid = route["test_grid"]
    ax.scatter([p["cost_per_1k"] for p in grid], [p["metric"] for p in grid], s=6, color="lightgrey",
               label=f"{len(grid):,} threshold combinations")
    front = route["test_front"]
    ax.plot([p["cost_per_1k"] for p in front], [p["metric"] for p in front], color="tab:blue", label="Pareto front")
    for (name, single), marker in zip(route["singles"].items(), ["s", "D", "^", "v", "P"]):
        ax.scatter(single["cost_per_1k"], single["metric"], marker=marker, s=60, zorder=3, label=f"{name} alone")
    for how, option in route.get("options", {}).items():
        test = option["test"]
        ax.scatter(test["cost_per_1k"], test["metric"], marker="*" if how == route["choose"] else "X", s=160,
                   edgecolor="black", color="gold" if how == route["choose"] else "white", zorder=4,
                   label=f"{how} choice" + (" (the route)" if how == route["choose"] else ""))
    ax.axhline(route["target"], linestyle=":", color="grey", label=f"target {route['target']:.3f}")
    costs = [p["cost_per_1k"] for p in grid] + [s["cost_per_1k"] for s in route["singles"].values()]
    if min(costs) > 0:
        ax.set_xscale("log")
    else:  # a free tier (recorded answers without a price): log-like, with 0 on the axis
        ax.set_xscale("symlog", linthresh=max(min((c for c in costs if c > 0), default=1e-3), 1e-6))
        ax.set_xlim(left=0)
    ax.xaxis.set_minor_formatter(NullFormatter())  # a span under a decade labels its minor ticks, overlapping
    ax.set_xlabel("cost per 1,000 requests ($)")
    ax.set_ylabel(route["target_metric"])
    ax.set_title(" -> ".join(route["chain"]) + " (test split)")
    ax.legend(fontsize=7, loc="lower right")
    _save(plt, fig, path)
