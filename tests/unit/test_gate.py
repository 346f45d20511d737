"""The eval gate: pass within max_drop of the best baseline that ran, and above min_value."""

from pipeline.evaluate import gate_verdict
from pipeline.recipe import Recipe


def recipe(**gate) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "task": {"type": "classification", "instruction": "x"},
            "data": {"source": "d.jsonl", "fields": {"text": "t", "target": "l"}},
            "model": {"base": "m"},
            "eval": {"gate": {"metric": "accuracy", **gate}},
            "registry": {"model_name": "m"},
        }
    )


def test_within_drop_passes_beyond_fails():
    r = recipe(max_drop_vs_best_baseline=0.02)
    ok = gate_verdict(r, {"expert": {"accuracy": 0.89}, "frontier": {"accuracy": 0.9}, "base": {"accuracy": 0.2}}, {})
    assert ok["passed"] and ok["best_baseline"] == "frontier"
    bad = gate_verdict(r, {"expert": {"accuracy": 0.87}, "frontier": {"accuracy": 0.9}}, {})
    assert not bad["passed"] and "frontier" in bad["reasons"][0]


def test_min_value_and_no_baseline():
    v = gate_verdict(recipe(min_value=0.5), {"expert": {"accuracy": 0.4}}, {"frontier": "no key"})
    assert not v["passed"]
    assert any("no baseline ran" in r for r in v["reasons"])
    assert v["skipped_baselines"] == {"frontier": "no key"}
