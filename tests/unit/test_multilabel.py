"""Multi-label classification: answer parsing, targets, metrics and their intervals, the shipped sample."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.evaluation import stats
from pipeline.tasks import classification, multilabel
from pipeline.tasks.metrics import f1_report
from tests.conftest import ROOT

LABELS = ["billing", "refund", "shipping", "urgent"]


@pytest.mark.parametrize(("text", "expected"), [
    ('["urgent", "billing"]', ["billing", "urgent"]),
    ("billing, urgent", ["billing", "urgent"]),
    (" shipping \n", ["shipping"]),
    ('["refund"]', ["refund"]),
    ("billing,urgent", ["billing", "urgent"]),
    # anything that is not exactly a set of labels is unparsable
    ("Billing", None),  # labels match exactly
    ("billing and urgent", None),
    ("billing, billing", None),  # a label twice
    ('["billing", "billing"]', None),
    ("[]", None), ("", None), (",", None),
    ('["billing", 3]', None), ('{"labels": ["billing"]}', None), ("[billing]", None),
    ("billing, returns", None),  # a label outside the set
    ("The tags are: billing, urgent", None),
])
def test_an_answer_parses_only_when_it_is_exactly_a_set_of_labels(text, expected):
    assert multilabel.parse_answer(text, LABELS) == expected


def test_targets_are_sorted_sets_and_bad_ones_say_why():
    assert multilabel.normalize_target(["urgent", " billing"]) == ["billing", "urgent"]
    assert multilabel.normalize_target('["refund"]') == ["refund"]
    for raw, why in [([], "empty"), (["a", "a"], "twice"), ("a, b", "not JSON"), ({"a": 1}, "must be a list"),
                     ([None], "must be a string"), ([" "], "empty")]:
        with pytest.raises(ValueError, match=why):
            multilabel.normalize_target(raw)
    assert multilabel.check_target(["billing", "returns"], LABELS) == "label `returns` is not in the label set"
    assert multilabel.parse_answer(multilabel.target_text(["billing", "urgent"]), LABELS) == ["billing", "urgent"]


def synthetic(n: int, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    golds, preds = [], []
    for _ in range(n):
        gold = sorted({LABELS[i] for i in rng.choice(4, size=rng.integers(1, 3), replace=False)})
        flip = rng.random(4) < 0.2
        pred = sorted({label for i, label in enumerate(LABELS) if (label in gold) != flip[i]})
        golds.append(gold)
        preds.append(pred if pred and rng.random() > 0.05 else None)
    return golds, preds


def test_micro_and_macro_f1_match_their_definitions():
    golds, preds = synthetic(300, seed=1)
    m = multilabel.metrics(golds, preds, LABELS)
    pairs = [(label in g, p is not None and label in p) for g, p in zip(golds, preds) for label in LABELS]
    tp = sum(g and p for g, p in pairs)
    fp = sum(p and not g for g, p in pairs)
    fn = sum(g and not p for g, p in pairs)
    assert m["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["macro_f1"] == pytest.approx(np.mean([c["f1"] for c in m["per_label"].values()]))
    assert m["exact_match"] == pytest.approx(np.mean([p == g for g, p in zip(golds, preds)]))
    assert m["unparsed"] == sum(p is None for p in preds) > 0


def test_one_label_sets_score_macro_f1_as_classification_does():
    golds = ["billing", "refund", "urgent", "billing", "shipping", "urgent"]
    preds = ["billing", "urgent", "urgent", None, "shipping", "billing"]
    as_sets = multilabel.metrics([[g] for g in golds], [[p] if p else None for p in preds], LABELS)
    assert as_sets["macro_f1"] == pytest.approx(f1_report(golds, preds, LABELS)["macro_f1"])
    assert stats.metric_value(classification.gate_metric("macro_f1"), golds, preds, LABELS) == pytest.approx(
        as_sets["macro_f1"])


@pytest.mark.parametrize("metric", ["micro_f1", "macro_f1", "exact_match"])
def test_each_gate_metric_has_a_bootstrap_interval_around_a_known_difference(metric):
    golds, better = synthetic(1500, seed=2)
    worse = [p[:1] if p else None for p in better]  # drops every second label
    gate = multilabel.gate_metric(metric)
    ci = stats.paired_bootstrap(gate, golds, better, worse, LABELS, samples=400, seed=3)
    point = stats.metric_value(gate, golds, better, LABELS) - stats.metric_value(gate, golds, worse, LABELS)
    assert ci["difference"] == pytest.approx(point)
    assert 0 < ci["ci_low"] <= point <= ci["ci_high"], "dropping gold labels is measurably worse"
    same = stats.paired_bootstrap(gate, golds, better, better, LABELS, samples=100, seed=3)
    assert same["ci_low"] == same["ci_high"] == 0


def test_a_mix_of_tiers_scores_like_the_plain_metric():
    """Routing gathers rows of each tier's encoding; that must equal the metric of the mixed answers."""
    from pipeline.routing import route_search

    golds, a = synthetic(200, seed=4)
    _, b = synthetic(200, seed=5)
    tiers = [route_search.TierAnswers(name, p, np.linspace(0, 1, 200), 0.001, np.zeros(200)) for name, p in
             (("expert", a), ("frontier", b))]
    for name in multilabel.gate_metrics:
        gate = multilabel.gate_metric(name)
        for point in route_search.evaluate_grid(gate, golds, tiers, LABELS, route_search.candidate_grids(tiers, 7))[::17]:
            mixed = [b[i] if c < point["thresholds"][0] else a[i] for i, c in enumerate(tiers[0].confidences)]
            assert point["metric"] == pytest.approx(stats.metric_value(gate, golds, mixed, LABELS))


def test_confidence_is_the_probability_of_the_whole_answer():
    assert multilabel.answer_confidence([np.log(0.5), np.log(0.5)]) == pytest.approx(0.25)
    assert multilabel.answer_confidence([]) == 0.0


def test_the_shipped_tagging_data_is_derived_from_the_tickets_by_its_rule():
    """data/tickets-tagging is what derive.py makes from data/tickets, byte for byte."""
    folder = ROOT / "data/tickets-tagging"
    made = subprocess.run([sys.executable, "-c", "import derive, sys; sys.stdout.write(derive.derive())"],
                          cwd=folder, capture_output=True, text=True, check=True).stdout
    assert made == (folder / "tickets-tagging.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in made.splitlines()]
    tickets = {json.loads(line)["id"]: json.loads(line) for line in
               (ROOT / "data/tickets/tickets.jsonl").read_text().splitlines()}
    assert len(rows) == len(tickets) == 400
    for row in rows:
        assert tickets[row["id"]]["queue"] in row["tags"] and row["tags"] == sorted(set(row["tags"]))
    assert sum(len(r["tags"]) > 1 for r in rows) >= 50, "a tagging set where many rows have several tags"
