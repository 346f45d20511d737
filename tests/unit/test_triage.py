"""Triage: routers trained on the expert's outcomes (a text router, a probe on a tiny model's states), saved and
loaded without pickle, and the joint search of cut-offs and thresholds against a brute force with a known optimum."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.routing import route_search, triage
from pipeline.tasks import classification

ACCURACY = classification.gate_metric("accuracy")
LABELS = ["a", "b"]


def tier(name, correct, confidences, cost, latency=0.01):
    return route_search.TierAnswers(name, ["a" if ok else "b" for ok in correct],
                                    None if confidences is None else np.asarray(confidences, float), cost,
                                    np.full(len(correct), latency))


def brute_force(tiers, scores, before_expert, target):
    """The cheapest (cut-offs, thresholds) meeting the target, each request simulated one at a time: it starts at
    the tier whose cut-off its score reaches, climbs until a tier's confidence reaches its threshold (the last tier
    answers), and pays every tier it was sent to (and the expert, for a router after it)."""
    n, last = len(scores), len(tiers) - 1
    score_values = sorted(set(scores.tolist()) | {0.0, triage.NEVER})
    threshold_values = [sorted(set(t.confidences.tolist()) | {0.0, 1.0 + 1e-9}) for t in tiers[:-1]]
    best = None
    for cutoffs in itertools.combinations_with_replacement(score_values, last):
        for thresholds in itertools.product(*threshold_values):
            right = cost = 0.0
            for i in range(n):
                start = sum(scores[i] >= c for c in cutoffs)
                k = start
                while k < last and tiers[k].confidences[i] < thresholds[k]:
                    k += 1
                cost += sum(t.cost_per_request for t in tiers[start:k + 1])
                cost += tiers[0].cost_per_request if (start > 0 and not before_expert) else 0.0
                right += tiers[k].predictions[i] == "a"
            if right / n >= target and (best is None or cost / n < best[0] - 1e-12):
                best = (cost / n, right / n)
    return best


@pytest.mark.parametrize("before_expert", [True, False])
def test_the_joint_search_finds_the_brute_force_optimum_of_two_tiers(before_expert):
    """The expert is wrong exactly when the router's score is 0.7 or more, and its confidence says nothing: the
    optimum sends exactly those requests to the frontier and lets the expert answer the rest."""
    rng = np.random.default_rng(0)
    n = 60
    scores = rng.integers(0, 11, n) / 10
    confidence = rng.integers(0, 11, n) / 10
    tiers = [tier("expert", scores < 0.7, confidence, 0.001), tier("frontier", [True] * n, None, 0.1)]
    triage_in = route_search.Triage(scores, before_expert, 0.0)
    grids = route_search.candidate_grids(tiers, 1000)
    cutoffs = route_search.cutoff_grid(triage_in, 2, 1000)
    points = route_search.evaluate_grid(ACCURACY, ["a"] * n, tiers, LABELS, grids, triage_in, cutoffs)
    best = route_search.cheapest(points, 1.0)
    expected_cost, expected_metric = brute_force(tiers, scores, before_expert, 1.0)
    assert best["cost_per_1k"] == pytest.approx(1000 * expected_cost)
    assert best["metric"] == expected_metric == 1.0
    wrong = scores >= 0.7
    known = 1000 * np.mean(np.where(wrong, 0.1 + (0.0 if before_expert else 0.001), 0.001))
    assert best["cost_per_1k"] == pytest.approx(known)
    assert best["cutoffs"] == [0.7] and best["starts"][1] == pytest.approx(wrong.mean())


def test_the_joint_search_of_three_tiers_matches_the_brute_force():
    rng = np.random.default_rng(5)
    n = 40
    scores = rng.integers(0, 6, n) / 5
    c0, c1 = rng.integers(0, 6, n) / 5, rng.integers(0, 6, n) / 5
    tiers = [tier("expert", (scores < 0.6) & (rng.uniform(size=n) < 0.9 + 0.1 * c0), c0, 0.001),
             tier("mid", c1 >= 0.4, c1, 0.01), tier("frontier", rng.uniform(size=n) < 0.97, None, 0.1)]
    triage_in = route_search.Triage(scores, True, 0.0)
    target = 0.9
    points = route_search.evaluate_grid(ACCURACY, ["a"] * n, tiers, LABELS, route_search.candidate_grids(tiers, 1000),
                                        triage_in, route_search.cutoff_grid(triage_in, 3, 1000))
    best = route_search.cheapest(points, target)
    expected_cost, _ = brute_force(tiers, scores, True, target)
    assert best["cost_per_1k"] == pytest.approx(1000 * expected_cost)
    # and the measurement of that point agrees with the search's own numbers
    measured = route_search.measure(ACCURACY, ["a"] * n, tiers, LABELS, best, target, 200, 0, triage_in)
    assert measured["cost_per_1k"] == pytest.approx(best["cost_per_1k"])
    assert measured["metric"] == pytest.approx(best["metric"])
    assert sum(measured["starts"].values()) == pytest.approx(1.0)


def test_a_skipped_tier_adds_no_time_and_the_router_adds_its_own():
    n = 4
    tiers = [tier("expert", [True] * n, [0.9] * n, 0.001, latency=0.05),
             tier("frontier", [True] * n, None, 0.1, latency=0.8)]
    scores = np.array([0.1, 0.9, 0.95, 0.2])
    measured = route_search.measure(ACCURACY, ["a"] * n, tiers, LABELS, {"thresholds": [0.5], "cutoffs": [0.9]},
                                    1.0, 100, 0, route_search.Triage(scores, True, 0.002))
    # two requests start at the frontier (0.8 s + the router's 2 ms), two at the expert (50 ms + 2 ms)
    assert measured["latency_ms_p50"] == pytest.approx(1000 * (0.052 + 0.802) / 2)
    assert measured["cost_per_1k"] == pytest.approx(1000 * (2 * 0.001 + 2 * 0.1) / 4)


REFUND = ["I want a refund for order {}", "refund my money now {}", "can I get my refund {} back"]
SHIPPING = ["where is my parcel {}", "my package {} has not arrived", "track shipment {} please"]


def toy_router_split(n=120):
    """Texts about refunds (the expert gets them wrong) and shipping (it gets them right)."""
    texts, wrong = [], []
    for i in range(n):
        pool = REFUND if i % 3 == 0 else SHIPPING
        texts.append(pool[i % len(pool)].format(i))
        wrong.append(pool is REFUND)
    return texts, np.array(wrong)


def test_a_text_router_learns_the_experts_outcomes_and_survives_save_and_load(tmp_path):
    texts, wrong = toy_router_split()
    router = triage.train("text", texts, wrong, seed=0)
    held_out = ["please refund order 999", "where is my parcel 998"]
    scores = router.score(held_out)
    assert scores[0] > 0.5 > scores[1]
    assert router.training["rows"] == 120 and router.training["expert_wrong"] == 40
    triage.save(router, tmp_path / "text")
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["router.json", "router.safetensors"]
    loaded = triage.load(tmp_path / "text")
    assert loaded.before_expert and loaded.kind == "text"
    np.testing.assert_allclose(loaded.score(held_out), scores, rtol=1e-9, atol=1e-12)


def test_a_router_whose_arrays_do_not_fit_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    texts, wrong = toy_router_split()
    triage.save(triage.train("text", texts, wrong, seed=0), tmp_path)
    arrays = load_file(str(tmp_path / "router.safetensors"))
    arrays["coef"] = arrays["coef"][:, :-1]
    save_file(arrays, str(tmp_path / "router.safetensors"))
    with pytest.raises(UserError, match="router.safetensors: its arrays do not fit"):
        triage.load(tmp_path)
    settings = json.loads((tmp_path / "router.json").read_text())
    (tmp_path / "router.json").write_text(json.dumps({**settings, "format": 99}))
    with pytest.raises(UserError, match="not a triage router"):
        triage.load(tmp_path)


def test_a_router_needs_both_outcomes_on_its_split():
    texts, _ = toy_router_split(30)
    with pytest.raises(ValueError, match="at least 5 of each outcome"):
        triage.train("text", texts, np.zeros(30, dtype=bool), seed=0)


def test_a_probe_router_trains_on_a_tiny_models_states(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts, wrong = toy_router_split(60)
    prompts = [[{"role": "system", "content": "Route it."}, {"role": "user", "content": t}] for t in texts]
    states = triage.expert_states(model, tokenizer, prompts, batch_size=8)
    assert states.shape == (60, model.config.hidden_size)
    # batching pads; one prompt alone has no padding: the state at the answer position is the same
    alone = triage.expert_states(model, tokenizer, prompts[:1], batch_size=1)
    np.testing.assert_allclose(alone[0], states[0], rtol=1e-4, atol=1e-4)
    router = triage.train("probe", states, wrong, seed=0)
    assert not router.before_expert
    scores = router.score(states)
    assert ((scores > 0.5) == wrong).mean() > 0.9  # the refund prompts are apart in the states
    triage.save(router, tmp_path / "probe")
    np.testing.assert_allclose(triage.load(tmp_path / "probe").score(states), scores, rtol=1e-9, atol=1e-12)


def option(validation_cost, test_cost, meets=True):
    return {"cutoffs": [0.5], "thresholds": [0.7],
            "validation": {"cost_per_1k": validation_cost, "metric": 0.95},
            "test": {"cost_per_1k": test_cost, "metric": 0.95 if meets else 0.90, "meets_target": meets}}


@pytest.mark.parametrize(("routing", "confidence_cost", "kept", "why"), [
    (option(1.0, 1.1), 2.0, True, "$1.0000 / 1k cheaper than confidence alone on validation (on test $0.9000 / 1k cheaper)"),
    (option(2.0, 1.0), 2.0, False, "not less than confidence alone ($2.0000)"),
    (option(1.0, 1.0, meets=False), 2.0, False, "misses the target on test (0.9000)"),
    (option(1.0, 1.0), None, True, "no confidence-only route reached the target"),
])
def test_triage_is_kept_only_when_cheaper_on_validation_and_holding_on_test(routing, confidence_cost, kept, why):
    from pipeline.routing import triage_route

    result = {"routers": {"text": {"routings": {"triage_then_confidence": routing,
                                                "triage_only": {"reason": "no cut-offs reach it"}}}}}
    confidence_only = None if confidence_cost is None else {"validation": {"cost_per_1k": confidence_cost},
                                                            "test": {"cost_per_1k": 2.0}}
    decided = triage_route.choose(result, confidence_only)
    assert decided["kept"] is kept and why in decided["why"], decided["why"]
    assert decided["chosen"]["router"] == "text" and decided["chosen"]["routing"] == "triage_then_confidence"


def test_triage_not_kept_because_no_router_could_be_trained_says_why():
    from pipeline.routing import triage_route

    decided = triage_route.choose({"routers": {"text": {"reason": "too few wrong rows"}}}, None)
    assert decided == {"kept": False, "chosen": None, "why": "`text` not trained: too few wrong rows"}


def test_a_router_split_in_source_order_is_cross_validated_on_shuffled_folds():
    """Rows written topic by topic (as a split written intent by intent is), each topic its own words and the
    expert wrong on every third topic: unshuffled folds would hold out whole topics and score near chance; shuffled
    ones see every topic, as the router will at run time."""
    texts, wrong = [], []
    for topic in range(30):
        for i in range(10):
            texts.append(f"question {i} about subject{topic} using term{topic}a and term{topic}b")
            wrong.append(topic % 3 == 0)
    router = triage.train("text", texts, np.array(wrong), seed=0)
    assert router.training["cv_roc_auc"] > 0.9


def test_a_text_routers_features_are_capped_per_analyzer(monkeypatch, tmp_path):
    """The version's size and the per-request work are bounded: each analyzer keeps at most MAX_FEATURES terms,
    however many distinct words the router split has."""
    monkeypatch.setattr(triage, "MAX_FEATURES", 40)
    texts = [f"word{i} word{i + 1} other{i % 7} thing{i * 3}" for i in range(200)]
    router = triage.train("text", texts, np.arange(200) % 2 == 0, seed=0)
    assert [len(v.vocabulary_) for v in router.vectorizers] == [40, 40]
    triage.save(router, tmp_path)
    assert json.loads((tmp_path / "router.json").read_text())["features"] == 80
