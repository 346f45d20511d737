"""The statistics behind the verdict, on synthetic tables whose answers are known."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.evaluation import stats
from pipeline.tasks import classification, extraction
from pipeline.tasks.metrics import f1_report

LABELS = ["a", "b", "c"]


def synthetic_pair(n: int, acc_a: float, acc_b: float, seed: int):
    """Two systems with exactly acc_a * n and acc_b * n correct answers, shuffled independently."""
    rng = random.Random(seed)
    golds = [rng.choice(LABELS) for _ in range(n)]

    def system(acc):
        right = [True] * round(acc * n) + [False] * (n - round(acc * n))
        rng.shuffle(right)
        return [g if r else LABELS[(LABELS.index(g) + 1) % 3] for g, r in zip(golds, right)]

    return golds, system(acc_a), system(acc_b)


def test_bootstrap_interval_contains_the_known_difference_and_excludes_zero():
    golds, a, b = synthetic_pair(2000, 0.80, 0.70, seed=1)
    ci = stats.paired_bootstrap(classification.gate_metric("accuracy"), golds, a, b, LABELS, samples=1000, seed=3)
    assert ci["difference"] == pytest.approx(0.10)
    assert ci["ci_low"] < 0.10 < ci["ci_high"]
    assert ci["ci_low"] > 0, "a 10-point gap on 2,000 examples is clearly significant"
    assert ci["ci_high"] - ci["ci_low"] < 0.06


def test_bootstrap_interval_for_equal_systems_straddles_zero_and_macro_f1_path_agrees():
    golds, a, b = synthetic_pair(400, 0.75, 0.75, seed=2)
    for metric in ("accuracy", "macro_f1"):
        ci = stats.paired_bootstrap(classification.gate_metric(metric), golds, a, b, LABELS, samples=500, seed=3)
        assert ci["ci_low"] < 0 < ci["ci_high"] or ci["difference"] == 0


def test_macro_f1_matches_the_task_definition_with_unparsed_answers():
    golds, a, _ = synthetic_pair(300, 0.6, 0.5, seed=4)
    a[::7] = [None] * len(a[::7])
    assert stats.metric_value(classification.gate_metric("macro_f1"), golds, a, LABELS) == \
        pytest.approx(f1_report(golds, a, LABELS)["macro_f1"])


def test_field_exact_match_per_example_mean_equals_per_field_mean():
    spec = {"properties": {"x": {}, "y": {}}}
    golds = [{"x": 1, "y": 2}, {"x": 1, "y": 2}, {"x": 3, "y": 4}]
    preds = [{"x": 1, "y": 0}, None, {"x": 3, "y": 4}]
    # x right in 2 of 3 examples, y in 1 of 3
    assert stats.metric_value(extraction.gate_metric("field_exact_match"), golds, preds, spec) == \
        pytest.approx((2 / 3 + 1 / 3) / 2)
    assert stats.metric_value(extraction.gate_metric("field_exact_match"), golds, preds, spec) == pytest.approx(
        extraction.metrics(golds, preds, spec)["field_exact_match"]
    )


def test_mcnemar_exact_p_values():
    # 10 discordant pairs all favouring a: p = 2 * 0.5**10
    a = [True] * 10 + [True] * 5
    b = [False] * 10 + [True] * 5
    assert stats.mcnemar_exact(a, b) == {"a_only": 10, "b_only": 0, "p_value": pytest.approx(2 / 1024)}
    # balanced discordance: no evidence
    assert stats.mcnemar_exact([True, False] * 5, [False, True] * 5)["p_value"] == 1.0
    assert stats.mcnemar_exact([True], [True])["p_value"] == 1.0


def test_calibration_error_of_known_bins():
    # bin 0.9: 10 examples, 9 right (calibrated); bin 0.6: 10 examples, 3 right (0.3 over-confident)
    conf = [0.95] * 10 + [0.65] * 10
    correct = [True] * 9 + [False] + [True] * 3 + [False] * 7
    cal = stats.calibration(conf, correct)
    assert cal["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.35)
    assert [(b["count"], b["accuracy"]) for b in cal["bins"]] == [(10, 0.3), (10, 0.9)]


def test_cascade_picks_the_cheapest_threshold_meeting_the_target():
    """The cascade is the two-tier route search (`route_search.evaluate_grid`, `route_search.cheapest`)."""
    from pipeline.routing import route_search

    # expert right on its confident half, wrong on the unsure half; the frontier is always right
    golds = ["a"] * 8
    expert = ["a", "a", "a", "a", "b", "a", "b", "b"]
    conf = [0.99, 0.95, 0.9, 0.85, 0.6, 0.55, 0.5, 0.4]
    frontier = ["a"] * 8
    tiers = [route_search.TierAnswers("expert", expert, np.array(conf), 0.01 / 1000, np.zeros(8)),
             route_search.TierAnswers("frontier", frontier, None, 1.0 / 1000, np.zeros(8))]
    curve = route_search.evaluate_grid(classification.gate_metric("accuracy"), golds, tiers, LABELS,
                                       [stats.candidate_thresholds(conf)])
    by_t = {p["thresholds"][0]: p for p in curve}
    assert by_t[0.0]["shares"][1] == 0.0 and by_t[0.0]["metric"] == 5 / 8
    assert by_t[0.0]["cost_per_1k"] == pytest.approx(0.01)
    chosen = route_search.cheapest(curve, target=1.0)
    assert chosen["thresholds"] == [0.85], "escalating the four unsure answers is the cheapest way to 100%"
    assert chosen["shares"][1] == 0.5 and chosen["cost_per_1k"] == pytest.approx(0.51)
    # the expert alone already meets 60%: of the thresholds that escalate nothing (0 and the lowest confidence),
    # the strictest (before the cascade was a route, 0.0)
    assert route_search.cheapest(curve, target=0.6)["thresholds"] == [0.4]
    assert route_search.cheapest(curve, target=1.01) is None
    assert curve[-1]["shares"][1] == 1.0 and curve[-1]["metric"] == 1.0


def test_candidate_thresholds_are_thinned_but_keep_the_extremes():
    conf = [i / 1000 for i in range(1, 1001)]
    t = stats.candidate_thresholds(conf, most=51)
    assert len(t) <= 51 and t[0] == 0.0 and t[1] == 0.001 and t[-2] == 1.0 and t[-1] > 1.0, "last escalates all"
