"""Routing across tiers (cheapest first): each request climbs until a tier is confident enough, or the last answers.

Why one search over all thresholds together: a tier's threshold decides what the next tier sees, so thresholds
chosen one at a time are not the cheapest set that meets a target. The search evaluates every combination of
candidate thresholds on the validation split, vectorised over examples:

- two tiers: every distinct validation confidence of the first tier is a candidate, so the search is exact;
- three or more: each tier's candidates are its confidences thinned to `max_candidates` quantiles (0 and "above
  every confidence" always included), and every combination of those is tried: exact on that grid.

A request answered by tier k has paid every tier up to k (each was asked), so its cost is the sum of their costs
per request and its latency the sum of their latencies. With triage (`Triage`: a router's scores and where it runs)
the route also has cut-offs, one per tier above the expert: a request starts at the highest tier whose cut-off its
score reaches, and climbs from there; the tiers below its start cost nothing and add no time (a router that runs
after the expert, `probe`, has paid the expert all the same). Cut-offs and thresholds are searched together: every
combination of each on its grid. The chosen point is the cheapest that meets the target:
by point estimate (`point`), or by the lower end of a bootstrap 95% interval of validation quality (`margin`),
which holds on more resamples at a higher cost. The route is then measured once on the test split, against the
last tier alone on the same rows (paired bootstrap intervals of the cost saving and the quality difference).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import baseline_kinds, tasks
from pipeline.baseline_kinds import common
from pipeline.evaluation import stats
from pipeline.routing import triage as triage_rules
from pipeline.tasks.metrics import GateMetric


@dataclass(frozen=True)
class TierAnswers:
    """One tier's answers on one split, in the split's order: predictions, confidences (None for the last tier),
    cost per request in dollars (None when unknown) and seconds per request."""

    name: str
    predictions: list[Any]
    confidences: np.ndarray | None
    cost_per_request: float | None
    latency_s: np.ndarray


class Scorer:
    """The metric of any mix of the tiers' answers, fast: each tier's per-example rows (`GateMetric.encode`) are
    computed once, so a combination costs one gather."""

    def __init__(self, metric: GateMetric, golds: list[Any], tiers: list[TierAnswers], spec: Any):
        self.metric, self.n = metric, len(golds)
        self.table = np.stack([metric.encode(golds, t.predictions, spec) for t in tiers])
        self.columns = np.arange(self.n)

    def picked(self, answering: np.ndarray) -> np.ndarray:
        return self.table[answering, self.columns]

    def value(self, answering: np.ndarray, rows: np.ndarray | None = None) -> float:
        picked = self.picked(answering)
        return self.metric.value(picked if rows is None else picked[rows])

    def resampled(self, answering: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The metric on each bootstrap resample (rows of `idx`)."""
        return self.metric.resampled(self.picked(answering), idx)


@dataclass(frozen=True)
class Triage:
    """A router's scores on one split (the probability the expert is wrong), whether it runs before any tier (a
    request it sends up never pays the expert) or on the expert's pass, and its seconds per request."""

    scores: np.ndarray
    before_expert: bool
    latency_s: float
    cost_per_request: float = 0.0


def answering_tier(confidences: list[np.ndarray], thresholds: tuple[float, ...], n: int,
                   start: np.ndarray | None = None) -> np.ndarray:
    """Index of the tier that answers each example: the first from its start (tier 0 without triage) whose
    confidence reaches its threshold, else the last. (Later tiers are written first so that earlier ones overwrite
    them.)"""
    answering = np.full(n, len(confidences), dtype=np.int64)
    for i in range(len(confidences) - 1, -1, -1):
        reaches = confidences[i] >= thresholds[i]
        answering = np.where(reaches if start is None else reaches & (start <= i), i, answering)
    return answering


def paid(per_tier: list[float | np.ndarray], answering: np.ndarray, start: np.ndarray | None = None,
         triage: Triage | None = None) -> np.ndarray:
    """What each request spent (cost or seconds, `per_tier` per tier): every tier from its start to the one that
    answered; a router after the expert has paid the expert too."""
    n = len(answering)
    table, columns = cumulative(per_tier, n), np.arange(n)
    total = table[answering, columns]
    if start is None:
        return total
    total = total - np.where(start > 0, table[np.maximum(start - 1, 0), columns], 0.0)
    if not triage.before_expert:
        total = total + np.where(start > 0, table[0, columns], 0.0)
    return total


def cumulative(values: list[float | np.ndarray], n: int) -> np.ndarray:
    """Tiers x examples: what a request answered at tier k has spent, the sum over tiers 0..k."""
    return np.cumsum(np.stack([np.broadcast_to(np.asarray(v, dtype=float), (n,)) for v in values]), axis=0)


def candidates(confidences: np.ndarray, exact: bool, most: int) -> list[float]:
    return stats.candidate_thresholds(confidences.tolist(), most=len(confidences) + 2 if exact else most)


def candidate_grids(tiers: list[TierAnswers], max_candidates: int) -> list[list[float]]:
    """Each tier's candidate thresholds (all but the last tier), from its confidences on the split given."""
    return [candidates(t.confidences, exact=len(tiers) == 2, most=max_candidates) for t in tiers[:-1]]


def cutoff_grid(triage: Triage, tiers: int, most: int) -> list[tuple[float, ...]]:
    """Every non-decreasing tuple of cut-offs (one per tier above the expert) from the router's validation scores
    thinned to `most` quantiles, `triage.NEVER` (nothing sent up) included."""
    candidates = sorted(set(stats.candidate_thresholds(triage.scores.tolist(), most=most)) | {triage_rules.NEVER})
    return list(itertools.combinations_with_replacement(candidates, tiers - 1))


def evaluate_grid(metric: GateMetric, golds: list[Any], tiers: list[TierAnswers], spec: Any,
                  grids: list[list[float]], triage: Triage | None = None,
                  cutoffs: list[tuple[float, ...]] | None = None) -> list[dict[str, Any]]:
    """Every combination of candidate thresholds (and, with triage, cut-offs) on this split: quality, cost per
    1,000 and each tier's share of the answers (and of the starts)."""
    n = len(golds)
    scorer = Scorer(metric, golds, tiers, spec)
    confs = [t.confidences for t in tiers[:-1]]
    costs = [t.cost_per_request or 0.0 for t in tiers]
    points = []
    for cut in (cutoffs if triage is not None else [None]):
        start = None if cut is None else triage_rules.start_tier(triage.scores, cut)
        for thresholds in itertools.product(*grids):
            answering = answering_tier(confs, thresholds, n, start)
            point = {"thresholds": [float(t) for t in thresholds], "metric": scorer.value(answering),
                     "cost_per_1k": 1000 * (float(paid(costs, answering, start, triage).mean()) +
                                            (0.0 if cut is None else triage.cost_per_request)),
                     "shares": [float(s) for s in np.bincount(answering, minlength=len(tiers)) / max(n, 1)]}
            if cut is not None:
                point["cutoffs"] = [float(c) for c in cut]
                point["starts"] = [float(s) for s in np.bincount(start, minlength=len(tiers)) / max(n, 1)]
            points.append(point)
    return points


def preference(point: dict[str, Any]) -> tuple:
    """Cheaper first; then fewer requests past tier 0 (what decides when a tier's cost is unknown: a cascade to
    an unpriced frontier); then higher quality; then, among thresholds that route this split identically, the
    strictest (the gap below it is where unseen confidences are safest), and the cut-offs that send fewest up."""
    return (point["cost_per_1k"], -point["shares"][0], -point["metric"], tuple(-t for t in point["thresholds"]),
            tuple(-c for c in point.get("cutoffs", ())))


def plan_of(point: dict[str, Any], tiers: list[TierAnswers], triage: Triage | None) -> tuple[np.ndarray | None, np.ndarray]:
    """(start, answering tier) per example of a point's thresholds and cut-offs on `tiers`' split."""
    n = len(tiers[0].predictions)
    start = triage_rules.start_tier(triage.scores, tuple(point["cutoffs"])) if triage is not None and "cutoffs" in point else None
    return start, answering_tier([t.confidences for t in tiers[:-1]], tuple(point["thresholds"]), n, start)


def cheapest(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The preferred point (see `preference`) among those meeting the target."""
    return min((p for p in points if p["metric"] >= target), key=preference, default=None)


def cheapest_with_margin(points: list[dict[str, Any]], target: float, metric: GateMetric, golds: list[Any],
                         tiers: list[TierAnswers], spec: Any, samples: int, seed: int,
                         most_tried: int = 500, triage: Triage | None = None) -> dict[str, Any] | None:
    """The cheapest point whose lower bootstrap 95% bound of validation quality meets the target (points that
    meet it by point estimate, tried in cost order; at most `most_tried`)."""
    scorer = Scorer(metric, golds, tiers, spec)
    idx = np.random.default_rng(seed).integers(0, len(golds), size=(samples, len(golds)))
    ordered = sorted((p for p in points if p["metric"] >= target), key=preference)
    for point in ordered[:most_tried]:
        _, answering = plan_of(point, tiers, triage)
        low = float(np.percentile(scorer.resampled(answering, idx), 2.5))
        if low >= target:
            return {**point, "validation_ci_low": low}
    return None


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both cost and quality, cheapest first."""
    out, best = [], -np.inf
    for p in sorted(points, key=lambda p: (p["cost_per_1k"], -p["metric"])):
        if p["metric"] > best:
            out.append(p)
            best = p["metric"]
    return out


def measure(metric: GateMetric, golds: list[Any], tiers: list[TierAnswers], spec: Any, point: dict[str, Any],
            target: float, samples: int, seed: int, triage: Triage | None = None) -> dict[str, Any]:
    """The route at a point's thresholds (and cut-offs) on one split: quality, cost, latency (the router's own
    included), shares, and against the last tier alone (cost saving and quality difference, paired bootstrap
    95%); how often quality meets the target on resamples."""
    n = len(golds)
    scorer = Scorer(metric, golds, tiers, spec)
    start, answering = plan_of(point, tiers, triage)
    cost = paid([t.cost_per_request or 0.0 for t in tiers], answering, start, triage)
    latency = paid([t.latency_s for t in tiers], answering, start, triage)
    if start is not None:  # the router's own time and cost, on every request
        cost, latency = cost + triage.cost_per_request, latency + triage.latency_s
    last = tiers[-1]
    last_cost = np.full(n, last.cost_per_request or 0.0)
    routed = [tiers[k].predictions[j] for j, k in enumerate(answering)]
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    resampled = scorer.resampled(answering, idx)
    saving_samples = 1 - cost[idx].sum(axis=1) / np.maximum(last_cost[idx].sum(axis=1), 1e-300)
    quality = scorer.value(answering)
    starts = {} if start is None else {"starts": {t.name: float(s) for t, s in
                                                   zip(tiers, np.bincount(start, minlength=len(tiers)) / n)}}
    return {
        **starts,
        "rows": n,
        "metric": quality,
        "cost_per_1k": 1000 * float(cost.mean()),
        "latency_ms_p50": 1000 * float(np.percentile(latency, 50)),
        "latency_ms_p95": 1000 * float(np.percentile(latency, 95)),
        "shares": {t.name: float(s) for t, s in zip(tiers, np.bincount(answering, minlength=len(tiers)) / n)},
        "meets_target": quality >= target,
        "target_held_on_resamples": float((resampled >= target).mean()),
        "metric_interval_95": [float(v) for v in np.percentile(resampled, [2.5, 97.5])],
        "vs_last_tier": {
            "tier": last.name,
            "last_tier_metric": stats.metric_value(metric, golds, last.predictions, spec),
            "last_tier_cost_per_1k": 1000 * float(last_cost.mean()),
            "cost_saving": (1 - float(cost.sum() / last_cost.sum())) if last_cost.sum() > 0 else None,
            "cost_saving_interval_95": ([float(v) for v in np.percentile(saving_samples, [2.5, 97.5])]
                                        if last_cost.sum() > 0 else None),
            "quality_difference": stats.paired_bootstrap(metric, golds, routed, last.predictions, spec, samples, seed),
        },
    }


def routed(tiers: list[TierAnswers], point: dict[str, Any], triage: Triage | None = None) -> list[tuple[str, Any]]:
    """(answering tier, its answer) per example."""
    _, answering = plan_of(point, tiers, triage)
    return [(tiers[k].name, tiers[k].predictions[j]) for j, k in enumerate(answering)]


def tier_answers(name: str, rows: list[dict[str, Any]], cost_per_1k: float | None, needs_confidence: bool,
                 split: str, latency_s: list[float]) -> TierAnswers:
    """A tier's rows as the search sees them. A row the tier failed on (an error after its retries) has
    confidence 0: the request passes on to the next tier, as it does at run time."""
    confidences = None
    if needs_confidence:
        missing = sum(1 for r in rows if r.get("confidence") is None and not r.get("error"))
        if missing:
            raise ValueError(f"tier `{name}` gave no confidence on {missing} of {len(rows)} {split} rows (an "
                             "`openai` tier needs an endpoint that returns log-probabilities; recorded predictions "
                             "need `confidence` per line)")
        confidences = np.array([0.0 if r.get("error") else r["confidence"] for r in rows], dtype=float)
    return TierAnswers(name, [r["prediction"] for r in rows], confidences,
                       None if cost_per_1k is None else cost_per_1k / 1000,
                       np.array(latency_s, dtype=float))


def chain_answers(recipe, chain: list[str], outputs, metrics, split: str) -> list[TierAnswers]:
    """Each tier of the chain on one split, as the search sees it (every tier but the last needs a confidence)."""
    return [tier_answers(name, outputs[name][split], metrics[name]["cost_per_1k"], i < len(chain) - 1, split,
                         latencies(name, recipe, outputs[name][split])) for i, name in enumerate(chain)]


def confidence_source(name: str, recipe) -> str:
    if name == "expert":
        return "the expert's answer probability (label scoring or the decoded sequence)"
    baseline = next(b for b in recipe.eval.baselines if b.name == name)
    return baseline_kinds.of(baseline).confidence_source(baseline) or "none (it can only be the last tier)"


def latencies(name: str, recipe, rows: list[dict[str, Any]]) -> list[float]:
    """Seconds per request of a tier on its rows: the expert's as measured, a baseline's as its kind says."""
    if name == "expert":
        return common.latency_s(rows)
    return baseline_kinds.of(next(b for b in recipe.eval.baselines if b.name == name)).latency_s(rows)


def route_result(recipe, spec, splits, outputs, metrics, skipped) -> dict[str, Any]:
    """route.json: the chain, the thresholds chosen together on validation (point and margin), the route on test
    against the last tier alone, every threshold combination's cost and quality on test, and whether the target
    held on test. `reason` says why there is no route."""
    section = recipe.eval.routing
    result: dict[str, Any] = {"chain": None, "thresholds": None, "reason": None}
    if section is None:
        result["reason"] = "no eval.routing in the recipe"
        return result
    chain = section.tiers
    result.update(chain=chain, choose=section.choose, target_metric=section.target.metric,
                  confidence={name: confidence_source(name, recipe) for name in chain[:-1]},
                  search=("exact: every distinct validation confidence of the first tier" if len(chain) == 2 else
                          f"every combination of {section.max_candidates} quantile thresholds per tier"))
    gone = [name for name in chain if name in skipped]
    if gone:
        result["reason"] = f"tier `{gone[0]}` was skipped: {skipped[gone[0]]}"
        return result
    if not splits["validation"]:
        result["reason"] = "the validation split is empty; set data.split.validation > 0 to choose thresholds"
        return result
    unpriced = [name for name in chain if metrics[name]["cost_per_1k"] is None]
    if unpriced:
        result["reason"] = (f"tier `{unpriced[0]}` has no cost (give its baseline `price_per_mtok`, with token "
                            "counts in its answers): the cheapest route cannot be chosen without one")
        return result
    metric = tasks.for_type(recipe.task.type).gate_metric(section.target.metric)
    tiers, golds = {}, {}
    try:
        for split in ("validation", "test"):
            golds[split] = [r["target"] for r in splits[split]]
            tiers[split] = chain_answers(recipe, chain, outputs, metrics, split)
    except ValueError as err:
        result["reason"] = str(err)
        return result
    last_on_validation = stats.metric_value(metric, golds["validation"], tiers["validation"][-1].predictions, spec)
    target = section.target.value if section.target.value is not None else last_on_validation - section.target.below_last
    result.update(target=target, target_rule=(f"{metric.name} >= {target:.4f}" + (
        f" (`{chain[-1]}` on validation, {last_on_validation:.4f}, minus {section.target.below_last})"
        if section.target.value is None else "")))
    samples, seed = recipe.eval.bootstrap_samples, recipe.eval.seed
    grids = candidate_grids(tiers["validation"], section.max_candidates)
    grid = evaluate_grid(metric, golds["validation"], tiers["validation"], spec, grids)
    chosen = {"point": cheapest(grid, target),
              "margin": cheapest_with_margin(grid, target, metric, golds["validation"], tiers["validation"], spec,
                                             samples, seed)}
    result["options"], result["unmet"] = {}, {}
    for how, point in chosen.items():
        if point is None:
            result["unmet"][how] = (f"no thresholds reach {metric.name} {target:.4f} on validation" +
                                    (" with their lower 95% bound" if how == "margin" else ""))
            continue
        on = {split: measure(metric, golds[split], tiers[split], spec, point, target, samples, seed)
              for split in ("validation", "test")}
        result["options"][how] = {"thresholds": point["thresholds"], "validation": on["validation"], "test": on["test"]}
    result["singles"] = {t.name: {"metric": stats.metric_value(metric, golds["test"], t.predictions, spec),
                                  "cost_per_1k": 1000 * (t.cost_per_request or 0.0)} for t in tiers["test"]}
    result["test_grid"] = evaluate_grid(metric, golds["test"], tiers["test"], spec, grids)
    result["test_front"] = pareto(result["test_grid"])
    picked = result["options"].get(section.choose)
    if picked is None:
        best = max(p["metric"] for p in grid)
        result["reason"] = (f"no thresholds reach {metric.name} {target:.4f} on validation" +
                            (" with the margin (lower 95% bound)" if section.choose == "margin" else "") +
                            f" (best {best:.4f})")
        return result
    test = picked["test"]
    result.update(thresholds=picked["thresholds"], holds_on_test=test["meets_target"],
                  missed_by=max(0.0, target - test["metric"]),
                  test_answers=routed(tiers["test"], picked))
    return result
