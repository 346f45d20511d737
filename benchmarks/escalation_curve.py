"""The expert's side of the cascade, from a finished eval: what escalating its unsure answers buys.

    .venv/bin/python benchmarks/escalation_curve.py runs/banking77 [--metric accuracy]

Why: the cascade curve in `eval/report.md` needs a frontier baseline's
answers on the same examples. Without one (no API key, no recorded
predictions), this prints what the expert alone determines: for each
confidence threshold, the share of test requests that would go to the
frontier and the expert's quality on the requests it keeps. With a frontier
of quality F on the escalated requests (at most 1), cascade quality is
kept x (1 - escalated) + F x escalated, and cascade cost per 1,000 requests is
the expert's cost plus escalated x the frontier's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import stats  # noqa: E402

THRESHOLDS = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--metric", default=None, help="per-example metric (default: the recipe's gate metric)")
    args = parser.parse_args()
    metrics = json.loads((args.run_dir / "eval/metrics.json").read_text(encoding="utf-8"))
    spec = json.loads((args.run_dir / "prep/spec.json").read_text(encoding="utf-8"))["spec"]
    rows = [json.loads(line) for line in (args.run_dir / "eval/predictions/expert.jsonl").read_text().splitlines()]
    metric = args.metric or metrics.get("gate", {}).get("metric", "accuracy")
    if metric == "macro_f1":
        metric = "accuracy"  # macro-F1 is not a mean over examples; accuracy is what a kept request scores
    scores = stats.example_scores(metric, [r["target"] for r in rows], [r["prediction"] for r in rows], spec)
    confidence = np.array([r["confidence"] for r in rows])
    print(f"{args.run_dir}: {len(rows)} test examples, per-example {metric}, expert overall {scores.mean():.3f}\n")
    print(f"| threshold | escalated | expert {metric} on kept | cascade {metric} if the frontier scores 0.95 / 1.0 |")
    print("|---|---|---|---|")
    for t in THRESHOLDS:
        kept = confidence >= t
        share = 1 - kept.mean()
        on_kept = scores[kept].mean() if kept.any() else float("nan")
        kept_total = scores[kept].sum() / len(rows)
        print(f"| {t:.2f} | {share:.1%} | {on_kept:.3f} | {kept_total + 0.95 * share:.3f} / {kept_total + share:.3f} |")


if __name__ == "__main__":
    main()
