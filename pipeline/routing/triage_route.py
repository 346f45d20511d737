"""Triage in eval: each router kind trained on the router split, its cut-offs searched with the confidence
thresholds on validation, and three routings measured on the same test rows.

- confidence only: the route `route_search.route_result` chose (no router);
- triage only: the router's cut-offs decide the start, and whichever tier a request starts at answers it;
- triage then confidence: cut-offs and thresholds searched together.

Each is the cheapest point meeting `eval.routing.target` on validation by `eval.routing.choose`. Triage is kept only
where its routing is cheaper than confidence only on validation at the target and meets the target on test; the
result says which won and by how much, and how good the router is on its own: of the test requests the expert gets
wrong, the share it sends up; of those it sends up, the share the expert would have got right.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import tasks
from pipeline.routing import route_search, triage
from pipeline.routing.route_search import Triage

ROUTINGS = ("triage_only", "triage_then_confidence")


def triage_result(recipe, spec, splits, outputs, metrics, route: dict[str, Any], states: dict[str, np.ndarray],
                  probe_seconds: float, router_source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `triage` part of route.json, the trained routers by kind). `states`: the expert's states per split
    (for `probe`), `probe_seconds` what computing one request's took, `router_source` where prep took the router
    split from. With no triage the result says why."""
    section = recipe.eval.routing.triage if recipe.eval.routing is not None else None
    if section is None:
        return {"reason": "no eval.routing.triage in the recipe"}, {}
    if route.get("target") is None:
        return {"reason": f"no route to build on: {route.get('reason')}"}, {}
    if not splits.get("router"):
        return {"reason": "the router split is empty: set data.split.router (or data.router_source) so that routers "
                          "learn from rows the expert did not train on"}, {}
    chain, target = route["chain"], route["target"]
    metric = tasks.for_type(recipe.task.type).gate_metric(route["target_metric"])
    golds = {split: [r["target"] for r in splits[split]] for split in ("router", "validation", "test")}
    tiers = {split: route_search.chain_answers(recipe, chain, outputs, metrics, split) for split in ("validation", "test")}
    wrong = {split: triage.expert_wrong(golds[split], [r["prediction"] for r in outputs["expert"][split]])
             for split in golds}
    texts = {split: [r["text"] for r in splits[split]] for split in golds}
    expert_cost = metrics["expert"]["cost_per_1k"] / 1000 if metrics["expert"].get("cost_per_1k") else 0.0
    expert_seconds = float(np.mean(tiers["validation"][0].latency_s)) if len(tiers["validation"][0].latency_s) else 0.0
    samples, seed = recipe.eval.bootstrap_samples, recipe.eval.seed
    result: dict[str, Any] = {"source": f"the router split ({router_source}): {len(splits['router'])} rows the expert "
                                        "did not train on",
                              "outcome": "the expert's answer is not the target (exact)",
                              "expert_wrong_on_router": int(wrong["router"].sum()), "routers": {}}
    confidence_only = route["options"].get(route["choose"])
    result["confidence_only"] = summary(confidence_only) if confidence_only else None
    if confidence_only:
        result["confidence_only"]["answers"] = route_search.routed(tiers["test"], confidence_only)
    routers: dict[str, Any] = {}
    for kind in section.routers:
        inputs = texts if kind == "text" else states
        try:
            router = triage.train(kind, inputs["router"], wrong["router"], seed)
        except ValueError as err:
            result["routers"][kind] = {"reason": str(err)}
            continue
        routers[kind] = router
        scores, seconds = triage.timed_score(router, inputs["validation"])
        if kind == "probe":  # its pass over the prompt is paid on every request, in time and machine cost
            seconds += probe_seconds
        cost = 0.0 if kind == "text" else expert_cost * probe_seconds / max(expert_seconds, 1e-9)
        on = {"validation": Triage(scores, router.before_expert, seconds, cost),
              "test": Triage(router.score(inputs["test"]), router.before_expert, seconds, cost)}
        result["routers"][kind] = {
            "runs": "before any tier" if router.before_expert else "on the expert's forward pass",
            "training": router.training, "ms_per_request": 1000 * seconds,
            "test_roc_auc": roc_auc(wrong["test"], on["test"].scores),
            "routings": {how: routing(how, metric, golds, tiers, spec, on, section, route, target, samples, seed,
                                      wrong["test"], recipe.eval.routing.max_candidates) for how in ROUTINGS}}
    result["expert_confidence_test_roc_auc"] = roc_auc(wrong["test"], 1 - tiers["test"][0].confidences)
    result.update(choose(result, confidence_only))
    return result, routers


PER_ROW = ("answers", "starts")


def without_answers(result: dict[str, Any]) -> dict[str, Any]:
    """The result as route.json keeps it: each routing's test answers and starts left out (`test_answers` has
    them, written to predictions/)."""
    if "routers" not in result:
        return result
    routers = {kind: {**entry, "routings": {how: {k: v for k, v in r.items() if k not in PER_ROW}
                                            for how, r in entry.get("routings", {}).items()}}
               if "routings" in entry else entry for kind, entry in result["routers"].items()}
    confidence_only = result["confidence_only"] and {k: v for k, v in result["confidence_only"].items()
                                                     if k not in PER_ROW}
    return {**result, "routers": routers, "confidence_only": confidence_only}


def test_answers(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per routing (`confidence_only`, `<router>.<routing>`), per test row: where it started and which tier
    answered with what; what a reviewer reads to see where triage sent requests."""
    out = {}
    if result.get("confidence_only") and "answers" in result["confidence_only"]:
        out["confidence_only"] = [{"start": None, "tier": tier, "prediction": answer}
                                  for tier, answer in result["confidence_only"]["answers"]]
    for kind, entry in result.get("routers", {}).items():
        for how, r in entry.get("routings", {}).items():
            if "answers" in r:
                out[f"{kind}.{how}"] = [{"start": start, "tier": tier, "prediction": answer}
                                        for start, (tier, answer) in zip(r["starts"], r["answers"], strict=True)]
    return out


def routing(how: str, metric, golds, tiers, spec, on: dict[str, Triage], section, route, target: float,
            samples: int, seed: int, wrong_test: np.ndarray, section_max: int) -> dict[str, Any]:
    """One routing with a router: the point chosen on validation, measured on validation and test, with the
    test answers (`answers`: per row, the answering tier and its answer)."""
    if how == "triage_only":  # every tier answers what reaches it
        grids = [[0.0] for _ in tiers["validation"][:-1]]
    else:
        grids = route_search.candidate_grids(tiers["validation"], section_max)
    cutoffs = route_search.cutoff_grid(on["validation"], len(tiers["validation"]), section.max_candidates)
    points = route_search.evaluate_grid(metric, golds["validation"], tiers["validation"], spec, grids,
                                        on["validation"], cutoffs)
    if route["choose"] == "margin":
        point = route_search.cheapest_with_margin(points, target, metric, golds["validation"], tiers["validation"],
                                                  spec, samples, seed, triage=on["validation"])
    else:
        point = route_search.cheapest(points, target)
    if point is None:
        return {"reason": f"no cut-offs reach {metric.name} {target:.4f} on validation "
                          f"(best {max(p['metric'] for p in points):.4f})"}
    measured = {split: route_search.measure(metric, golds[split], tiers[split], spec, point, target, samples, seed,
                                            on[split]) for split in ("validation", "test")}
    start, answering = route_search.plan_of(point, tiers["test"], on["test"])
    sent_up = start > 0
    return {"cutoffs": point["cutoffs"], "thresholds": point["thresholds"], **measured,
            "router_on_test": {
                "expert_wrong": int(wrong_test.sum()),
                "caught": float((sent_up & wrong_test).sum() / max(wrong_test.sum(), 1)),
                "sent_up": int(sent_up.sum()),
                "needless": float((sent_up & ~wrong_test).sum() / max(sent_up.sum(), 1))},
            "answers": route_search.routed(tiers["test"], point, on["test"]),
            "starts": [tiers["test"][k].name for k in start]}


def summary(option: dict[str, Any]) -> dict[str, Any]:
    return {"thresholds": option["thresholds"], "validation": option["validation"], "test": option["test"]}


def choose(result: dict[str, Any], confidence_only: dict[str, Any] | None) -> dict[str, Any]:
    """The cheapest routing with a router on validation (at the target), kept only when it is cheaper there than
    confidence only and meets the target on test."""
    candidates = [(kind, how, r) for kind, entry in result["routers"].items()
                  for how, r in entry.get("routings", {}).items() if "cutoffs" in r]
    if not candidates:
        untrained = [f"`{kind}` not trained: {entry['reason']}" for kind, entry in result["routers"].items()
                     if "routings" not in entry]
        return {"kept": False, "chosen": None, "why": "; ".join(untrained) if len(untrained) == len(result["routers"])
                else "no router reached the target on validation"}
    kind, how, best = min(candidates, key=lambda c: (c[2]["validation"]["cost_per_1k"], -c[2]["validation"]["metric"]))
    chosen = {"router": kind, "routing": how, "cutoffs": best["cutoffs"], "thresholds": best["thresholds"]}
    cost = best["validation"]["cost_per_1k"]
    if confidence_only is not None:
        baseline = confidence_only["validation"]["cost_per_1k"]
        chosen["validation_cost_vs_confidence_only"] = cost - baseline
        chosen["test_cost_vs_confidence_only"] = best["test"]["cost_per_1k"] - confidence_only["test"]["cost_per_1k"]
        if cost >= baseline:
            return {"kept": False, "chosen": chosen, "why": (
                f"`{kind}` {how.replace('_', ' ')} costs ${cost:.4f} / 1k on validation, not less than confidence "
                f"alone (${baseline:.4f})")}
    if not best["test"]["meets_target"]:
        return {"kept": False, "chosen": chosen, "why": (
            f"`{kind}` {how.replace('_', ' ')} misses the target on test ({best['test']['metric']:.4f})")}
    if confidence_only is None:
        versus = "no confidence-only route reached the target"
    else:
        on_test = chosen["test_cost_vs_confidence_only"]
        versus = (f"${-chosen['validation_cost_vs_confidence_only']:.4f} / 1k cheaper than confidence alone on "
                  f"validation (on test ${abs(on_test):.4f} / 1k {'cheaper' if on_test <= 0 else 'dearer'})")
    return {"kept": True, "chosen": chosen, "why": f"`{kind}` {how.replace('_', ' ')}: {versus}, target met on test"}


def roc_auc(wrong: np.ndarray, scores: np.ndarray) -> float | None:
    """How well a score ranks the expert's wrong answers above its right ones (None with one outcome only)."""
    from sklearn.metrics import roc_auc_score

    if wrong.all() or not wrong.any():
        return None
    return float(roc_auc_score(wrong.astype(int), scores))


def route_with_triage(route: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """route.json's route replaced by the kept triage routing (its thresholds, measurements and test answers, and
    `triage_route`: the router and its cut-offs); the comparison stays under `triage` (confidence only included)."""
    chosen = result["chosen"]
    kept = result["routers"][chosen["router"]]["routings"][chosen["routing"]]
    option = {"thresholds": kept["thresholds"], "validation": kept["validation"], "test": kept["test"]}
    return {**route, "options": {**route["options"], route["choose"]: option}, "thresholds": kept["thresholds"],
            "holds_on_test": kept["test"]["meets_target"], "missed_by": max(0.0, route["target"] - kept["test"]["metric"]),
            "test_answers": kept["answers"], "triage": without_answers(result),
            "triage_route": {"router": chosen["router"], "cutoffs": kept["cutoffs"],
                             "before_expert": chosen["router"] == "text"}}

