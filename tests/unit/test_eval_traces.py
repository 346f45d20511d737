"""The per-example trace an eval writes: what its assessments say about each system."""

from __future__ import annotations

import json

from pipeline.evaluation.traces import disagreement, example_assessments, example_trace


def test_disagreement_is_a_difference_in_being_right():
    assert disagreement({"expert": True, "frontier": False})
    assert disagreement({"expert": False, "base": False, "frontier": True})
    assert not disagreement({"expert": False, "frontier": False}), "both wrong: nothing to decide between them"
    assert not disagreement({"expert": True, "frontier": True})


def test_assessments_name_the_target_each_systems_rightness_and_the_confidence():
    got = {a.name: a for a in example_assessments({"intent": "x"}, {"expert": {"intent": "x"}, "mid": {"intent": "y"}},
                                                  0.4321, "tr-1")}
    assert got["target"].value == {"intent": "x"} and got["target"].expectation is not None
    assert got["expert_correct"].value is True and got["mid_correct"].value is False
    assert got["expert_confidence"].value == 0.4321
    assert got["disagreement"].value is True
    alone = {a.name for a in example_assessments("a", {"expert": "a"}, None, "tr-2")}
    assert alone == {"target", "expert_correct"}, "no baseline: no disagreement; no confidence: none invented"


def test_a_trace_links_its_run_and_example_and_carries_every_answer():
    info, span = example_trace("7", "run-1", {"id": "e-3", "text": "where is my parcel", "target": "shipping"},
                               {"expert": "shipping", "frontier": "returns"}, 0.9, 1_700_000_000_000)
    assert info.trace_metadata["mlflow.sourceRun"] == "run-1" and info.trace_metadata["expert.example_id"] == "e-3"
    assert info.trace_location.mlflow_experiment.experiment_id == "7"
    assert json.loads(info.request_preview) == {"text": "where is my parcel"}
    assert span.inputs == {"text": "where is my parcel"}
    assert span.outputs == {"expert": "shipping", "frontier": "returns"}
    assert span.request_id == info.trace_id and span.parent_id is None
