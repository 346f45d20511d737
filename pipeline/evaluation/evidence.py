"""Eval's evidence from the systems' answers: per-system metrics, paired comparisons, the cascade, the verdict,
and the rows and flat metrics written to disk and MLflow."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pipeline import baseline_kinds, tasks
from pipeline.evaluation import stats
from pipeline.recipe.schema import Recipe
from pipeline.routing import route_search
from pipeline.run.stage_documents import VerdictDocument


def prediction_rows(examples: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": e["id"], "target": e["target"], **r} for e, r in zip(examples, rows, strict=True)]


def _percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return 1000 * (ordered[low] + (ordered[high] - ordered[low]) * (k - low))


def system_metrics(recipe: Recipe, task, spec, examples, rows, costs: dict[str, float | None], name: str,
                   stand_in: dict[str, str] | None = None) -> dict[str, Any]:
    """A system's metrics on test; `stand_in` (`{rule, path}`) when recorded answers stood in for it (null else),
    so every table that shows the system can say so."""
    m = task.metrics([e["target"] for e in examples], [r["prediction"] for r in rows], spec)
    latencies = [r["latency_s"] for r in rows if r.get("latency_s") is not None]
    m["latency_ms_p50"] = _percentile_ms(latencies, 0.5)
    m["latency_ms_p95"] = _percentile_ms(latencies, 0.95)
    m["latency_ms_mean"] = 1000 * statistics.fmean(latencies) if latencies else None
    m["errors"] = sum(1 for r in rows if r.get("error"))
    m["rows"] = len(rows)
    m["unparsed_ids"] = [str(e["id"]) for e, r in zip(examples, rows) if r["prediction"] is None]
    m["stand_in"] = stand_in
    if name in costs:  # a baseline: as its kind prices it
        m["cost_per_1k"] = costs[name]
    else:  # the expert: measured machine seconds per request at the recipe's hourly price
        m["cost_per_1k"] = stats.machine_cost_per_1k(rows, recipe.eval.expert_cost_per_hour)
    if any("attempts" in r for r in rows):
        m["api_calls"] = sum(r.get("attempts", 0) for r in rows)
        m["cache_hits"] = sum(1 for r in rows if r.get("cached"))
        m["retries"] = sum(max(0, r.get("attempts", 0) - 1) for r in rows)
        m["input_tokens"] = sum(r.get("input_tokens") or 0 for r in rows if r.get("raw") is not None)
        m["output_tokens"] = sum(r.get("output_tokens") or 0 for r in rows if r.get("raw") is not None)
    return m


def compare_all(recipe: Recipe, spec, golds, outputs) -> dict[str, Any]:
    """Expert minus each baseline on the gate metric: paired bootstrap 95% interval and McNemar's exact test."""
    metric = tasks.for_type(recipe.task.type).gate_metric(recipe.eval.gate.metric)
    expert = [r["prediction"] for r in outputs["expert"]["test"]]
    expert_correct = [p == g for p, g in zip(expert, golds)]
    out = {}
    for name, by_split in outputs.items():
        if name == "expert":
            continue
        other = [r["prediction"] for r in by_split["test"]]
        interval = stats.paired_bootstrap(metric, golds, expert, other, spec, recipe.eval.bootstrap_samples,
                                          recipe.eval.seed)
        test = stats.mcnemar_exact(expert_correct, [p == g for p, g in zip(other, golds)])
        out[name] = {"metric": metric.name, **interval, "mcnemar": {"expert_only_correct": test["a_only"],
                                                               "baseline_only_correct": test["b_only"],
                                                               "p_value": test["p_value"]}}
    return out


def cascade_result(recipe: Recipe, spec, splits, outputs, metrics, skipped) -> dict[str, Any]:
    """The two-tier route expert -> frontier, searched as every route is (`route_search.evaluate_grid`, chosen by
    `route_search.cheapest`) on the cascade's candidate thresholds: the threshold chosen on validation, and the curve
    of every candidate on validation and on test (escalation rate, metric, cost per 1,000 when both are
    priced)."""
    section = recipe.eval.cascade
    name = recipe.eval.cascade_frontier()
    result: dict[str, Any] = {
        "threshold": None,
        "target_metric": section.target_metric if section else None,
        "target": section.target if section else None,
        "frontier": name,
        "curve": [],
        "validation_curve": [],
        "reason": None,
    }
    if section is None:
        result["reason"] = "no eval.cascade in the recipe"
        return result
    if name in skipped:
        result["reason"] = f"frontier baseline `{name}` was skipped: {skipped[name]}"
        return result
    if not splits["validation"]:
        result["reason"] = "the validation split is empty; set data.split.validation > 0 to choose a threshold"
        return result
    answers = [r for split in ("validation", "test") for r in outputs[name][split]]
    failed = sum(1 for r in answers if r.get("error"))
    if failed / len(answers) > recipe.eval.gate.max_baseline_failure_rate:
        result["reason"] = (f"frontier baseline `{name}` failed on {failed} of {len(answers)} validation and test rows; "
                            "a threshold chosen against answers it did not give proves nothing")
        return result
    expert_cost, frontier_cost = metrics["expert"]["cost_per_1k"], metrics[name]["cost_per_1k"]
    metric = tasks.for_type(recipe.task.type).gate_metric(section.target_metric)
    priced = expert_cost is not None and frontier_cost is not None
    golds = {split: [r["target"] for r in splits[split]] for split in ("validation", "test")}
    tiers = {split: [route_search.tier_answers(system, outputs[system][split], cost, system == "expert", split,
                                          route_search.latencies(system, recipe, outputs[system][split]))
                     for system, cost in (("expert", expert_cost), (name, frontier_cost))]
             for split in ("validation", "test")}
    # the cascade's candidates as before it was a route: up to 101 quantiles of validation's confidences
    grids = [stats.candidate_thresholds(tiers["validation"][0].confidences.tolist())]
    points = {split: route_search.evaluate_grid(metric, golds[split], tiers[split], spec, grids)
              for split in ("validation", "test")}
    result["validation_curve"], result["curve"] = (
        [{"threshold": p["thresholds"][0], "escalation_rate": p["shares"][1], "metric": p["metric"],
          "cost_per_1k": p["cost_per_1k"] if priced else None} for p in points[split]]
        for split in ("validation", "test"))
    best = route_search.cheapest(points["validation"], section.target)
    chosen = None if best is None else result["validation_curve"][points["validation"].index(best)]
    if chosen is None:
        best = max(p["metric"] for p in result["validation_curve"])
        result["reason"] = (f"no threshold reaches {section.target_metric} {section.target} on validation "
                            f"(best {best:.4f}, escalating everything)")
        return result
    result["threshold"] = chosen["threshold"]
    result["validation"] = chosen
    result["test"] = next(p for p in result["curve"] if p["threshold"] == chosen["threshold"])
    return result


def gate_verdict(recipe: Recipe, metrics: dict[str, Any], skipped: dict[str, str],
                 comparisons: dict[str, Any] | None = None, cascade: dict[str, Any] | None = None,
                 route: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gate (expert within `max_drop_vs_best_baseline` of the best baseline and above `min_value`) and a decision.

    `replace` when the gate passes; else `route` when thresholds chosen on validation also meet the routing
    target on test (a route chosen on validation that misses on test is no route: the reasons say by how much);
    else `cascade` when a threshold met the cascade target on validation; else `keep_frontier`.
    """
    gate = recipe.eval.gate
    expert = metrics["expert"][gate.metric]
    baselines = {n: m[gate.metric] for n, m in metrics.items() if n != "expert"}
    reasons = []
    incomplete = incomplete_baselines(metrics, gate.max_baseline_failure_rate)
    best_name, best = (max(baselines.items(), key=lambda kv: kv[1]) if baselines else (None, None))
    passed = not incomplete
    for name, failed in incomplete.items():
        reasons.append(
            f"comparison incomplete: `{name}` failed on {failed['failed']} of {failed['rows']} test rows "
            f"(more than eval.gate.max_baseline_failure_rate {gate.max_baseline_failure_rate:g}); its score is no "
            "evidence, so the gate cannot pass")
    if expert < gate.min_value:
        passed = False
        reasons.append(f"expert {gate.metric} {expert:.4f} is below eval.gate.min_value {gate.min_value}")
    if best is not None and expert < best - gate.max_drop_vs_best_baseline:
        passed = False
        reasons.append(
            f"expert {gate.metric} {expert:.4f} is more than {gate.max_drop_vs_best_baseline} below "
            f"`{best_name}` ({best:.4f})"
        )
    if best is None:
        reasons.append("no baseline ran; only eval.gate.min_value was checked")
    if passed and best is not None:
        reasons.append(f"expert {gate.metric} {expert:.4f} vs best baseline `{best_name}` {best:.4f}")
    difference = (comparisons or {}).get(best_name)
    if difference is not None:
        reasons.append(
            f"expert - `{best_name}` {gate.metric}: {difference['difference']:+.4f} "
            f"(95% CI {difference['ci_low']:+.4f} to {difference['ci_high']:+.4f}; "
            f"McNemar p={difference['mcnemar']['p_value']:.3g})"
        )
    threshold = (cascade or {}).get("threshold")
    route_holds = bool(route and route.get("thresholds") is not None and route["holds_on_test"])
    if route and route.get("thresholds") is not None:
        test = route["options"][route["choose"]]["test"]
        saving = test["vs_last_tier"]["cost_saving"]
        chain = " -> ".join(f"{n} (>= {t:.6g})" for n, t in zip(route["chain"], route["thresholds"]))
        if route.get("triage_route"):
            kept = route["triage_route"]
            reasons.append(f"triage: the `{kept['router']}` router starts each request at the tier whose cut-off its "
                           "score reaches (" + ", ".join(f"{n} >= {c:.4g}" for n, c in zip(route["chain"][1:],
                                                                                         kept["cutoffs"])) + "); "
                           + route["triage"]["why"])
        elif route.get("triage", {}).get("why") or route.get("triage", {}).get("reason"):
            reasons.append("no triage: " + (route["triage"].get("why") or route["triage"]["reason"]))
        reasons.append(
            f"route {chain} -> {route['chain'][-1]}: on test {route['target_metric']} {test['metric']:.4f} "
            f"(target {route['target']:.4f}, " + ("met" if route_holds else f"MISSED by {route['missed_by']:.4f}") +
            f"), cost / 1k {test['cost_per_1k']:.4f}" +
            (f", {saving:.1%} below `{route['chain'][-1]}` alone" if saving is not None else ""))
        others = {how: o for how, o in route["options"].items() if how != route["choose"]}
        for how, other in others.items():
            if not route_holds and other["test"]["meets_target"]:
                reasons.append(f"the `{how}` choice (eval.routing.choose: {how}) meets the target on test: "
                               f"{other['test']['metric']:.4f} at cost / 1k {other['test']['cost_per_1k']:.4f}")
    elif route and route.get("reason") and route.get("chain"):
        reasons.append(f"no route: {route['reason']}")
    if incomplete:
        decision = "incomplete"
    elif passed:
        decision = "replace"
    elif route_holds:
        decision = "route"
    elif threshold is not None:
        decision = "cascade"
        test = cascade["test"]
        reasons.append(
            f"cascade: escalate when expert confidence < {threshold:.4f}; on test {test['escalation_rate']:.1%} "
            f"escalated, {cascade['target_metric']} {test['metric']:.4f} (target {cascade['target']})"
        )
    else:
        decision = "keep_frontier"
        if cascade and cascade.get("reason") and recipe.eval.routing is None:
            reasons.append(f"no cascade: {cascade['reason']}")
    return {
        "passed": passed,
        "decision": decision,
        "metric": gate.metric,
        "expert": expert,
        "best_baseline": best_name,
        "best_baseline_value": best,
        "max_drop_vs_best_baseline": gate.max_drop_vs_best_baseline,
        "min_value": gate.min_value,
        "difference_vs_best_baseline": difference,
        "threshold": threshold,
        "route": ({"chain": route["chain"], "thresholds": route["thresholds"], "target": route["target"],
                   "target_metric": route["target_metric"], "holds_on_test": route["holds_on_test"],
                   "triage": route.get("triage_route")}
                  if route and route.get("thresholds") is not None else None),
        "skipped_baselines": skipped,
        "incomplete_baselines": incomplete,
        "failed_rows": {n: m.get("errors", 0) for n, m in metrics.items()},
        "reasons": reasons,
        "frontier_baselines": [b.name for b in recipe.eval.baselines
                               if b.name in metrics and baseline_kinds.of(b).FRONTIER],
    }


def incomplete_baselines(metrics: dict[str, Any], max_failure_rate: float) -> dict[str, dict[str, int]]:
    """Baselines that failed (no answer after retries) on more than `max_failure_rate` of the test rows."""
    out = {}
    for name, m in metrics.items():
        rows, failed = m.get("rows", 0), m.get("errors", 0)
        if name != "expert" and rows and failed / rows > max_failure_rate:
            out[name] = {"failed": failed, "rows": rows}
    return out


def verdict_word(verdict: dict[str, Any]) -> str:
    return "pass" if verdict["passed"] else "fail"


def flat_metrics(metrics: dict[str, Any], comparisons: dict[str, Any] | None = None,
                 cascade: dict[str, Any] | None = None, route: dict[str, Any] | None = None) -> dict[str, float]:
    out = {}
    for system, m in metrics.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                out[f"{system}.{k}"] = float(v)
        for field, prf in m.get("field_f1", {}).items():  # extraction: per top-level field
            out[f"{system}.field_f1.{field}"] = prf["f1"]
    for name, c in (comparisons or {}).items():
        for k in ("difference", "ci_low", "ci_high"):
            out[f"expert_vs_{name}.{k}"] = c[k]
        out[f"expert_vs_{name}.mcnemar_p"] = c["mcnemar"]["p_value"]
    if route and route.get("thresholds") is not None:
        test = route["options"][route["choose"]]["test"]
        for i, t in enumerate(route["thresholds"]):
            out[f"route.threshold.{route['chain'][i]}"] = t
        out["route.test_metric"] = test["metric"]
        out["route.test_cost_per_1k"] = test["cost_per_1k"]
        out["route.test_latency_ms_p50"] = test["latency_ms_p50"]
        out["route.test_latency_ms_p95"] = test["latency_ms_p95"]
        for name, share in test["shares"].items():
            out[f"route.test_share.{name}"] = share
        if test["vs_last_tier"]["cost_saving"] is not None:
            out["route.test_cost_saving"] = test["vs_last_tier"]["cost_saving"]
        out["route.test_quality_vs_last_tier"] = test["vs_last_tier"]["quality_difference"]["difference"]
        for name, share in test.get("starts", {}).items():  # triage kept: where requests started
            out[f"route.test_start.{name}"] = share
    compared = (route or {}).get("triage") or {}
    if "routers" in compared:
        out["triage.kept"] = float(compared["kept"])
        for kind, entry in compared["routers"].items():
            if "routings" not in entry:
                continue
            out[f"triage.{kind}.ms_per_request"] = entry["ms_per_request"]
            if entry["test_roc_auc"] is not None:
                out[f"triage.{kind}.test_roc_auc"] = entry["test_roc_auc"]
            for how, routing in entry["routings"].items():
                if "test" in routing:
                    out[f"triage.{kind}.{how}.test_cost_per_1k"] = routing["test"]["cost_per_1k"]
                    out[f"triage.{kind}.{how}.test_metric"] = routing["test"]["metric"]
    if cascade and cascade.get("threshold") is not None:
        out["cascade.threshold"] = cascade["threshold"]
        out["cascade.test_escalation_rate"] = cascade["test"]["escalation_rate"]
        out["cascade.test_metric"] = cascade["test"]["metric"]
        if cascade["test"]["cost_per_1k"] is not None:
            out["cascade.test_cost_per_1k"] = cascade["test"]["cost_per_1k"]
    return out


def system_label(name: str, metrics: dict[str, Any]) -> str:
    """A system's name as every table shows it: marked when recorded answers stood in for it."""
    return f"{name} (recorded stand-in)" if metrics.get("stand_in") else name


def stand_in_note(name: str, stand_in: dict[str, str]) -> str:
    """Under a table: which system's answers were a recorded stand-in, from which file, made how."""
    return (f"`{name}` is a recorded stand-in, not the live endpoint (its key was not set): answers from "
            f"`{Path(stand_in['path']).name}`; {stand_in['rule']}")


def evidence_markdown(recipe: Recipe, metrics: dict[str, Any], verdict: VerdictDocument, test_rows: int) -> str:
    """The verdict and its evidence in a few Markdown lines: the eval run's description in the MLflow UI, the
    registered version's (push adds the promotion), and what `expert compare` prints under its table."""
    gate = verdict.metric
    lines = [f"**Decision: {verdict.decision_text()}** (gate {'passed' if verdict.passed else 'failed'} on `{gate}`, "
             f"{test_rows} test examples of `{recipe.name}`, expert on `{recipe.model.base}`)", ""]
    lines += [f"- {reason}" for reason in verdict.reasons]
    lines += ["", f"| system | {gate} | cost / 1k requests | latency p50 |", "|---|---|---|---|"]
    for name, m in sorted(metrics.items(), key=lambda item: item[0] != "expert"):
        cost = "-" if m.get("cost_per_1k") is None else f"${m['cost_per_1k']:.4f}"
        latency = "-" if m.get("latency_ms_p50") is None else f"{m['latency_ms_p50']:.0f} ms"
        value = m.get(gate)
        lines.append(f"| {system_label(name, m)} | {'-' if value is None else f'{value:.4f}'} | {cost} | {latency} |")
    lines += [f"\n{stand_in_note(name, m['stand_in'])}" for name, m in metrics.items() if m.get("stand_in")]
    for name, why in verdict.skipped_baselines.items():
        lines.append(f"\n`{name}` did not run: {why}")
    return "\n".join(lines)
