"""Routing's threshold search on synthetic confidence/correctness tables whose optimum is known."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.evaluation import stats
from pipeline.recipe.schema import load_recipe
from pipeline.routing import route_search
from pipeline.tasks import classification

LABELS = ["a", "b"]
ACCURACY = classification.gate_metric("accuracy")


def tier(name, correct, confidences, cost_per_request, latency=0.01):
    predictions = ["a" if ok else "b" for ok in correct]  # gold is always "a"
    return route_search.TierAnswers(name, predictions, None if confidences is None else np.asarray(confidences, float),
                               cost_per_request, np.full(len(correct), latency))


def three_tiers(n=200, seed=0):
    """Expert right exactly when its confidence >= 0.6, mid tier right exactly when its confidence >= 0.3,
    the frontier always right. Costs 1, 10 and 100 per 1,000 requests."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    return [tier("expert", c0 >= 0.6, c0, 0.001), tier("mid", c1 >= 0.3, c1, 0.01), tier("frontier", [True] * n, None, 0.1)]


def test_three_tiers_reach_perfect_accuracy_at_the_known_cheapest_thresholds():
    tiers = three_tiers()
    golds = ["a"] * 200
    grids = route_search.candidate_grids(tiers, max_candidates=1000)  # every distinct confidence: the exact optimum
    best = route_search.cheapest(route_search.evaluate_grid(ACCURACY, golds, tiers, LABELS, grids), target=1.0)
    c0, c1 = tiers[0].confidences, tiers[1].confidences
    reached = c0 < 0.6  # the mid tier sees what the expert is unsure of
    # any looser threshold lets a wrong answer through; any stricter one sends more requests up at a higher cost
    assert best["thresholds"] == [c0[c0 >= 0.6].min(), c1[reached & (c1 >= 0.3)].min()]
    kept0 = c0 >= 0.6
    kept1 = ~kept0 & (c1 >= 0.3)
    expected = 1000 * np.mean(0.001 + (~kept0) * 0.01 + (~kept0 & ~kept1) * 0.1)
    assert best["metric"] == 1.0
    assert best["cost_per_1k"] == pytest.approx(expected)
    assert best["shares"] == pytest.approx([kept0.mean(), kept1.mean(), 1 - kept0.mean() - kept1.mean()])


def test_two_tier_search_is_exact_against_brute_force():
    rng = np.random.default_rng(3)
    n = 150
    conf = rng.uniform(0, 1, n)
    correct = rng.uniform(0, 1, n) < conf  # confident answers are right more often, not always
    tiers = [tier("expert", correct, conf, 0.0002), tier("frontier", rng.uniform(0, 1, n) < 0.95, None, 0.02)]
    golds = ["a"] * n
    target = 0.9
    best = route_search.cheapest(route_search.evaluate_grid(ACCURACY, golds, tiers, LABELS,
                                                  route_search.candidate_grids(tiers, 41)), target)
    # brute force: every threshold that changes the routing is a distinct confidence, or above them all
    frontier_ok = [p == "a" for p in tiers[1].predictions]
    options = []
    for t in sorted(set(conf.tolist())) + [2.0]:
        acc = np.mean([correct[i] if conf[i] >= t else frontier_ok[i] for i in range(n)])
        cost = np.mean([0.0002 + (0.02 if conf[i] < t else 0.0) for i in range(n)])
        if acc >= target:
            options.append((cost, t))
    cost, threshold = min(options)
    assert best["cost_per_1k"] == pytest.approx(1000 * cost)
    assert best["thresholds"][0] == pytest.approx(threshold)


def test_no_point_meets_an_unreachable_target_and_the_margin_costs_at_least_the_point():
    tiers = three_tiers(seed=1)
    rng = np.random.default_rng(1)
    frontier_ok = rng.uniform(0, 1, 200) < 0.9
    tiers[-1] = tier("frontier", frontier_ok, None, 0.1)
    golds = ["a"] * 200
    grid = route_search.evaluate_grid(ACCURACY, golds, tiers, LABELS, route_search.candidate_grids(tiers, 41))
    assert route_search.cheapest(grid, 1.01) is None
    point = route_search.cheapest(grid, 0.9)
    margin = route_search.cheapest_with_margin(grid, 0.9, ACCURACY, golds, tiers, LABELS, samples=300, seed=2)
    assert point is not None and margin is not None
    assert margin["cost_per_1k"] >= point["cost_per_1k"]
    assert margin["validation_ci_low"] >= 0.9 and margin["metric"] > point["metric"]


def test_answering_tier_is_the_first_confident_one():
    confidences = [np.array([0.9, 0.1, 0.1, 0.5]), np.array([0.0, 0.8, 0.1, 0.9])]
    assert route_search.answering_tier(confidences, (0.5, 0.7), 4).tolist() == [0, 1, 2, 0]


def test_measure_against_the_last_tier_alone():
    tiers = three_tiers()
    golds = ["a"] * 200
    thresholds = [0.6, 0.3]
    m = route_search.measure(ACCURACY, golds, tiers, LABELS, {"thresholds": thresholds}, target=1.0, samples=500, seed=0)
    assert m["metric"] == 1.0 and m["meets_target"] and m["target_held_on_resamples"] == 1.0
    vs = m["vs_last_tier"]
    assert vs["cost_saving"] == pytest.approx(1 - m["cost_per_1k"] / 100)
    low, high = vs["cost_saving_interval_95"]
    assert low <= vs["cost_saving"] <= high
    assert vs["quality_difference"]["difference"] == 0.0
    # latency adds up over the tiers a request climbed: 1, 2 or 3 tiers of 10 ms each
    assert 10 <= m["latency_ms_p50"] <= 30 and m["latency_ms_p95"] <= 30 + 1e-9
    assert sum(m["shares"].values()) == pytest.approx(1.0)


def test_macro_f1_routes_score_like_the_plain_metric():
    rng = np.random.default_rng(5)
    n = 120
    labels = ["x", "y", "z"]
    golds = list(rng.choice(labels, n))
    preds = [list(rng.choice(labels, n)), list(rng.choice(labels, n)), golds]
    tiers = [route_search.TierAnswers(f"t{i}", p, rng.uniform(0, 1, n) if i < 2 else None, 0.001 * 10 ** i, np.zeros(n))
             for i, p in enumerate(preds)]
    grid = route_search.evaluate_grid(classification.gate_metric("macro_f1"), golds, tiers, labels,
                                      route_search.candidate_grids(tiers, 5))
    assert len(grid) == len(list(itertools.product(*route_search.candidate_grids(tiers, 5))))
    for point in grid[::7]:
        answering = route_search.answering_tier([t.confidences for t in tiers[:2]], tuple(point["thresholds"]), n)
        mixed = [preds[k][j] for j, k in enumerate(answering)]
        assert point["metric"] == pytest.approx(stats.metric_value(classification.gate_metric("macro_f1"), golds, mixed, labels))


def test_label_mix_shift_flags_a_moved_class():
    validation = ["in"] * 97 + ["out_of_scope"] * 3
    test = ["in"] * 82 + ["out_of_scope"] * 18
    shift = stats.label_mix_shift(validation, test)
    assert shift["tvd"] == pytest.approx(0.15)
    assert shift["p_value"] < 0.01
    assert {m["label"] for m in shift["moved"]} == {"in", "out_of_scope"}
    same = stats.label_mix_shift(validation, validation)
    assert same["tvd"] == 0.0 and same["p_value"] > 0.5


MID = {"name": "mid", "kind": "openai", "model": "m", "api_key_env": "MID_KEY", "logprobs": True}
TOP = {"name": "top", "kind": "predictions", "path": "top.jsonl"}


@pytest.mark.parametrize("routing, baselines, expected", [
    ({"tiers": ["expert", "mid", "nope"], "target": {"value": 0.9}}, [MID, TOP], "nope not a baseline name"),
    ({"tiers": ["mid", "expert", "top"], "target": {"value": 0.9}}, [MID, TOP], "`expert` first"),
    ({"tiers": ["expert", "mid", "top"], "target": {"value": 0.9}}, [{**MID, "logprobs": False}, TOP],
     "set `logprobs: true`"),
    ({"tiers": ["expert", "mid", "top"], "target": {"value": 0.9}}, [{**MID, "samples": 3}, TOP],
     "give `logprobs: true` or `samples` > 1, not both"),
    ({"tiers": ["expert", "top"], "target": {"value": 0.9, "below_last": 0.01}}, [TOP], "exactly one of `value`"),
    ({"tiers": ["expert", "top"], "target": {}}, [TOP], "exactly one of `value`"),
])
def test_routing_recipe_errors_name_the_key(tmp_path, routing, baselines, expected):
    from tests.conftest import shipped_recipe, write_recipe

    recipe = shipped_recipe("ticket-classification", **{"eval.baselines": baselines, "eval.routing": routing})
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tmp_path, recipe))
    assert "eval" in str(err.value) and expected in str(err.value)


def test_routing_and_cascade_are_one_or_the_other(tmp_path):
    from tests.conftest import shipped_recipe, write_recipe

    recipe = shipped_recipe("ticket-classification", **{
        "eval.baselines": [TOP], "eval.cascade": {"target": 0.9}, "eval.routing": {"tiers": ["expert", "top"],
                                                                                    "target": {"value": 0.9}}})
    with pytest.raises(UserError, match="give `cascade` or `routing`, not both"):
        load_recipe(write_recipe(tmp_path, recipe))


def route_doc(holds: bool) -> dict:
    test = {"metric": 0.95 if holds else 0.85, "cost_per_1k": 1.0, "meets_target": holds,
            "vs_last_tier": {"cost_saving": 0.6}}
    margin = {"metric": 0.93, "cost_per_1k": 2.0, "meets_target": True, "vs_last_tier": {"cost_saving": 0.3}}
    return {"chain": ["expert", "top"], "thresholds": [0.7], "target": 0.93, "target_metric": "accuracy",
            "choose": "point", "holds_on_test": holds, "missed_by": 0.0 if holds else 0.08,
            "options": {"point": {"test": test}, "margin": {"test": margin}}}


@pytest.mark.parametrize("holds", [True, False])
def test_a_route_is_the_decision_only_when_it_holds_on_test(tmp_path, holds):
    from pipeline.evaluation.evidence import gate_verdict
    from tests.conftest import shipped_recipe, write_recipe

    recipe = load_recipe(write_recipe(tmp_path, shipped_recipe("ticket-classification", **{
        "eval.baselines": [TOP], "eval.routing": {"tiers": ["expert", "top"], "target": {"value": 0.93}},
        "eval.gate": {"metric": "accuracy"}})))
    metrics = {"expert": {"accuracy": 0.5, "rows": 10, "errors": 0}, "top": {"accuracy": 0.96, "rows": 10, "errors": 0}}
    verdict = gate_verdict(recipe, metrics, {}, {}, {"threshold": None}, route_doc(holds))
    assert verdict["passed"] is False
    assert verdict["route"] == {"chain": ["expert", "top"], "thresholds": [0.7], "target": 0.93,
                                "target_metric": "accuracy", "holds_on_test": holds, "triage": None}
    text = " ".join(verdict["reasons"])
    if holds:
        assert verdict["decision"] == "route" and "met" in text
    else:
        assert verdict["decision"] == "keep_frontier" and "MISSED by 0.0800" in text
        assert "the `margin` choice (eval.routing.choose: margin) meets the target on test" in text


def test_eval_reads_a_sampled_tier_s_confidence_as_the_agreement_of_its_samples(tmp_path, monkeypatch):
    """A routing tier with `samples: 4` over real HTTP, as eval asks it: the majority answer and its share."""
    from pipeline.evaluation.baselines import ask_frontier
    from pipeline.recipe.schema import OpenAIBaseline
    from tests.conftest import shipped_recipe, write_recipe
    from tests.support.openai_server import FakeOpenAIServer

    votes = iter(["billing", "technical", "billing", "billing"] + ["technical"] * 4)
    monkeypatch.setenv("MID_KEY", "sk-unit")
    recipe = load_recipe(write_recipe(tmp_path, shipped_recipe("ticket-classification")))
    with FakeOpenAIServer(lambda body: next(votes), api_key="sk-unit") as srv:
        tier = OpenAIBaseline(**{**MID, "logprobs": False, "samples": 4, "base_url": srv.base_url, "max_concurrency": 1})
        rows = [{"prompt": [{"role": "user", "content": t}]} for t in ("first", "second")]
        out = ask_frontier(tier, "sk-unit", rows, recipe, classification, ["billing", "technical"], None, "validation")
    assert [(r["prediction"], r["confidence"]) for r in out] == [("billing", 0.75), ("technical", 1.0)]
    assert all(r["output_tokens"] == 4 for r in out), "usage counts every sample"
    assert srv.requests[0]["n"] == 4
