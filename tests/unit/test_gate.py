"""The eval gate: pass within max_drop of the best baseline that ran, and above min_value."""

from pipeline.evaluation.evidence import gate_verdict
from pipeline.recipe.schema import Recipe


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


def test_a_baseline_that_failed_on_rows_is_no_evidence():
    """A frontier that is down scores 0.0; beating it proves nothing: the gate cannot pass, no `replace`."""
    down = {"expert": {"accuracy": 0.08, "errors": 0, "rows": 80}, "frontier": {"accuracy": 0.0, "errors": 80, "rows": 80}}
    v = gate_verdict(recipe(), down, {})
    assert not v["passed"] and v["decision"] == "incomplete"
    assert v["incomplete_baselines"] == {"frontier": {"failed": 80, "rows": 80}}
    assert v["failed_rows"] == {"expert": 0, "frontier": 80}
    assert "comparison incomplete: `frontier` failed on 80 of 80 test rows" in v["reasons"][0]
    one_row = {**down, "frontier": {"accuracy": 0.05, "errors": 1, "rows": 80}}
    assert gate_verdict(recipe(), one_row, {})["decision"] == "incomplete", "default: any failed row"
    tolerant = gate_verdict(recipe(max_baseline_failure_rate=0.05), one_row, {})
    assert tolerant["passed"] and tolerant["decision"] == "replace" and not tolerant["incomplete_baselines"]
