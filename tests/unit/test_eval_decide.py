"""Eval's decision as a pure function of collected answers (`evaluate.decide`), on fixed rows: no model, no file,
no network. Also the typed readers of the documents eval and prep write (`stage_documents`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import tasks
from pipeline.errors import UserError
from pipeline.evaluation import evidence, stats
from pipeline.recipe.schema import BaseModelBaseline, Recipe
from pipeline.run.stage_documents import VerdictDocument, read_metrics, read_spec, read_verdict
from pipeline.stages import evaluate
from pipeline.stages.eval_report import print_summary, render_report, route_summary, summary_table

LABELS = ["a", "b", "c"]
WRONG = {g: LABELS[(LABELS.index(g) + 1) % 3] for g in LABELS}


def split_rows(n, seed, expert_sure_from=0.6, frontier_miss_every=10):
    """Fixed synthetic answers: the expert is right exactly when its confidence >= `expert_sure_from`; the
    frontier misses every `frontier_miss_every`-th row."""
    rng = np.random.default_rng(seed)
    golds = [LABELS[i] for i in rng.integers(0, 3, n)]
    conf = np.round(rng.uniform(0.3, 1.0, n), 3)
    examples = [{"id": f"{seed}-{i}", "target": g} for i, g in enumerate(golds)]
    expert = [{"prediction": g if c >= expert_sure_from else WRONG[g], "confidence": float(c), "latency_s": 0.02}
              for g, c in zip(golds, conf)]
    frontier = [{"prediction": WRONG[g] if i % frontier_miss_every == 0 else g, "latency_s": 0.5,
                 "input_tokens": 100, "output_tokens": 5} for i, g in enumerate(golds)]
    return examples, expert, frontier


def recipe(cascade=None, routing=None, gate=None):
    doc = {"name": "r", "task": {"type": "classification", "instruction": "Route it.", "labels": LABELS},
           "data": {"source": "tickets.jsonl", "fields": {"id": "id", "text": "text", "target": "queue"}},
           "model": {"base": "smollm2-135m-instruct"}, "registry": {"model_name": "r"},
           "eval": {"baselines": [{"name": "frontier", "kind": "predictions", "path": "f.jsonl"}],
                    "gate": gate or {"metric": "accuracy"}, "bootstrap_samples": 200}}
    if cascade is not None:
        doc["eval"]["cascade"] = cascade
    if routing is not None:
        doc["eval"]["routing"] = routing
    return Recipe.model_validate(doc)


def collected(n=40, frontier_cost=0.5, **rows_kwargs) -> evaluate.Collected:
    splits, outputs = {}, {"expert": {}, "frontier": {}}
    for split, seed in (("validation", 1), ("test", 2)):
        splits[split], outputs["expert"][split], outputs["frontier"][split] = split_rows(n, seed, **rows_kwargs)
    return evaluate.Collected(splits, outputs, {"frontier": frontier_cost}, {})


def test_decide_measures_every_system_and_escalates_to_the_frontier_when_the_expert_falls_short():
    got = collected()
    evidence_ = evaluate.decide(recipe(cascade={"target_metric": "accuracy", "target": 0.85}),
                                tasks.for_type("classification"), LABELS, got)
    golds = [r["target"] for r in got.splits["test"]]
    for name in ("expert", "frontier"):
        right = [r["prediction"] == g for r, g in zip(got.outputs[name]["test"], golds)]
        assert evidence_.metrics[name]["accuracy"] == pytest.approx(np.mean(right))
    assert evidence_.metrics["frontier"]["cost_per_1k"] == 0.5
    # the expert (machine time: 20 ms at the default $0.10 an hour) is far below the frontier: no replace
    assert evidence_.metrics["expert"]["cost_per_1k"] == pytest.approx(1000 * 0.02 * 0.10 / 3600)
    assert evidence_.verdict["passed"] is False and evidence_.verdict["decision"] == "cascade"
    assert evidence_.verdict["threshold"] == evidence_.cascade["threshold"] is not None
    assert evidence_.comparisons["frontier"]["difference"] == pytest.approx(
        evidence_.metrics["expert"]["accuracy"] - evidence_.metrics["frontier"]["accuracy"])
    assert evidence_.metrics["expert"]["ece"] == evidence_.calibration["ece"]
    assert evidence_.route["reason"] == "no eval.routing in the recipe"


def test_decide_replaces_the_frontier_when_the_expert_is_as_good():
    got = collected()
    for split in ("validation", "test"):  # the expert now answers exactly as the frontier does
        got.outputs["expert"][split] = [{**e, "prediction": f["prediction"]}
                                        for e, f in zip(got.outputs["expert"][split], got.outputs["frontier"][split])]
    evidence_ = evaluate.decide(recipe(), tasks.for_type("classification"), LABELS, got)
    assert evidence_.verdict["passed"] is True and evidence_.verdict["decision"] == "replace"
    assert evidence_.cascade["reason"] == "no eval.cascade in the recipe"


def test_decide_routes_and_compares_the_label_mix_of_validation_with_tests():
    got = collected()
    got.outputs["frontier"] = {s: [{**r, "confidence": 1.0} for r in rows] for s, rows in got.outputs["frontier"].items()}
    evidence_ = evaluate.decide(recipe(routing={"tiers": ["expert", "frontier"], "target": {"value": 0.85}}),
                                tasks.for_type("classification"), LABELS, got)
    assert evidence_.route["thresholds"] is not None and "label_mix" in evidence_.route
    assert evidence_.route["label_mix"] == stats.label_mix_shift([r["target"] for r in got.splits["validation"]],
                                                                 [r["target"] for r in got.splits["test"]])
    assert len(evidence_.route["test_answers"]) == len(got.splits["test"])


def test_written_documents_read_back_typed(tmp_path):
    got = collected()
    evidence_ = evaluate.decide(recipe(cascade={"target_metric": "accuracy", "target": 0.85}),
                                tasks.for_type("classification"), LABELS, got)
    (tmp_path / "verdict.json").write_text(json.dumps(evidence_.verdict))
    (tmp_path / "metrics.json").write_text(json.dumps({"systems": evidence_.metrics, "skipped": {},
                                                       "test_examples": 40, "comparisons": evidence_.comparisons,
                                                       "calibration": evidence_.calibration}))
    verdict, metrics = read_verdict(tmp_path / "verdict.json"), read_metrics(tmp_path / "metrics.json")
    assert verdict.decision == "cascade" and verdict.threshold == evidence_.cascade["threshold"]
    assert metrics.systems["frontier"]["cost_per_1k"] == 0.5 and metrics.test_examples == 40


def test_documents_written_by_the_first_release_still_read(tmp_path):
    """The verdict and spec the first release wrote (no decision, route or baseline prompt) keep reading, with
    the defaults they imply."""
    (tmp_path / "verdict.json").write_text(json.dumps({
        "passed": True, "metric": "macro_f1", "expert": 0.9, "best_baseline": None, "best_baseline_value": None,
        "max_drop_vs_best_baseline": 0.02, "min_value": 0.0, "skipped_baselines": {}, "reasons": []}))
    (tmp_path / "spec.json").write_text(json.dumps({"task": "classification", "spec": LABELS, "system_prompt": "s"}))
    verdict, spec = read_verdict(tmp_path / "verdict.json"), read_spec(tmp_path / "spec.json")
    assert verdict.decision is None and verdict.route is None and verdict.incomplete_baselines == {}
    assert spec.baseline_system_prompt == "s" and spec.spec == LABELS


def test_a_malformed_document_names_the_file_and_the_key(tmp_path):
    (tmp_path / "verdict.json").write_text(json.dumps({"passed": "perhaps", "metric": "accuracy", "expert": 0.5}))
    with pytest.raises(UserError, match=r"verdict.json: not a verdict.json .*first at `passed`"):
        read_verdict(tmp_path / "verdict.json")
    with pytest.raises(UserError, match=r"metrics.json: missing; redo eval"):
        read_metrics(tmp_path / "metrics.json")


# Today's cascade (`evidence.cascade_result` through `stats.cascade_curve` and `stats.choose_threshold`, commit
# 1e1bcc0, before the cascade became the two-tier route search) on `collected()`'s fixed rows, as
# (target metric, target, frontier cost per 1k) -> (threshold, validation (escalation rate, metric, cost per
# 1k), test (the same)); produced by running that code on these rows and copying its output here.
TODAYS_CASCADE = [
    (("accuracy", 0.85, 0.5), (0.412, (0.125, 0.85, 0.0725), (0.1, 0.775, 0.06))),
    (("macro_f1", 0.8, 0.5), (0.404, (0.1, 0.8213633923778851, 0.06), (0.1, 0.7759504862953138, 0.06))),
    (("accuracy", 0.85, None), (0.412, (0.125, 0.85, None), (0.1, 0.775, None))),
    (("accuracy", 0.97, 0.5), (0.496, (0.25, 0.975, 0.135), (0.175, 0.825, 0.0975))),
]


@pytest.mark.parametrize(("inputs", "expected"), TODAYS_CASCADE)
def test_the_cascade_is_the_two_tier_route_search_with_todays_numbers(inputs, expected):
    metric, target, frontier_cost = inputs
    got = collected(frontier_cost=frontier_cost)
    metrics = {"expert": {"cost_per_1k": 0.01}, "frontier": {"cost_per_1k": frontier_cost}}
    cascade = evidence.cascade_result(recipe(cascade={"target_metric": metric, "target": target}), LABELS,
                                      got.splits, got.outputs, metrics, {})
    threshold, validation, test = expected
    assert cascade["threshold"] == pytest.approx(threshold) and cascade["reason"] is None
    for split, (rate, value, cost) in (("validation", validation), ("test", test)):
        point = cascade[split]
        assert point["threshold"] == pytest.approx(threshold)
        assert point["escalation_rate"] == pytest.approx(rate) and point["metric"] == pytest.approx(value)
        assert point["cost_per_1k"] == (None if cost is None else pytest.approx(cost))
    assert len(cascade["curve"]) == len(cascade["validation_curve"]) == 41  # 0, the 39 distinct confidences, above all


def test_a_cascade_the_expert_alone_meets_keeps_the_strictest_threshold_that_escalates_nothing():
    """The one number that moved: today's cascade chose threshold 0.0 here (escalation rate 0, validation
    accuracy 0.725, test 0.675); the route search's rule takes, among thresholds that route validation alike,
    the strictest: the lowest validation confidence. Validation's numbers are the same."""
    got = collected()
    metrics = {"expert": {"cost_per_1k": 0.01}, "frontier": {"cost_per_1k": 0.5}}
    cascade = evidence.cascade_result(recipe(cascade={"target_metric": "accuracy", "target": 0.5}), LABELS,
                                      got.splits, got.outputs, metrics, {})
    lowest = min(r["confidence"] for r in got.outputs["expert"]["validation"])
    assert cascade["threshold"] == pytest.approx(lowest)
    assert cascade["validation"]["escalation_rate"] == 0 and cascade["validation"]["metric"] == pytest.approx(0.725)
    below = [r["confidence"] < lowest for r in got.outputs["expert"]["test"]]
    assert cascade["test"]["escalation_rate"] == pytest.approx(np.mean(below))


NO_FRONTIER = "compared with `base` only: no frontier baseline ran"


def test_a_decision_reached_without_a_frontier_baseline_says_so_everywhere(capsys):
    """The frontier was skipped and the expert beat only the untuned base model: `replace` is no evidence against
    the frontier, so the verdict records that no frontier-kind baseline ran and every text of the decision says
    so (console, report.md, the MLflow run's and the registered version's description)."""
    got = collected()
    base = [{**f, "prediction": e["prediction"]} for e, f in zip(got.outputs["expert"]["test"],
                                                               got.outputs["frontier"]["test"])]
    got = evaluate.Collected(got.splits, {"expert": got.outputs["expert"], "base": {"test": base}}, {"base": 0.01},
                             {"frontier": "environment variable OPENAI_API_KEY is not set"})
    doc = recipe()
    doc = doc.model_copy(update={"eval": doc.eval.model_copy(update={"baselines": [
        *doc.eval.baselines, BaseModelBaseline(name="base", kind="base_model")]})})
    evidence_ = evaluate.decide(doc, tasks.for_type("classification"), LABELS, got)
    verdict = VerdictDocument.model_validate(evidence_.verdict)
    assert evidence_.verdict["decision"] == "replace" and verdict.frontier_baselines == []
    assert verdict.decision_text() == f"replace ({NO_FRONTIER})"
    assert f"**Decision: replace ({NO_FRONTIER})**" in evidence.evidence_markdown(doc, evidence_.metrics, verdict, 40)
    report = render_report(doc, evidence_.metrics, got.skipped, evidence_.comparisons, evidence_.calibration,
                           evidence_.cascade, evidence_.verdict, 40, evidence_.route)
    assert f"Decision: REPLACE the frontier with the expert ({NO_FRONTIER}).**" in report
    print_summary(evidence_.metrics, got.skipped, evidence_.verdict, "accuracy", evidence_.route)
    assert f"decision: replace ({NO_FRONTIER})" in " ".join(capsys.readouterr().err.split())

    with_frontier = evaluate.decide(doc, tasks.for_type("classification"), LABELS, collected())
    frontier_ran = VerdictDocument.model_validate(with_frontier.verdict)
    assert frontier_ran.frontier_baselines == ["frontier"] and frontier_ran.decision_text() == "keep_frontier"
    assert "no frontier baseline ran" not in evidence.evidence_markdown(doc, with_frontier.metrics, frontier_ran, 40)


def test_a_recorded_stand_in_is_labelled_with_its_rule_in_every_table(capsys):
    stand_in = {"rule": "right with probability 0.9 (seed 7)", "path": "/data/recorded-frontier.jsonl"}
    got = collected()
    got.stand_ins["frontier"] = stand_in
    got.outputs["frontier"] = {s: [{**r, "confidence": 1.0} for r in rows] for s, rows in got.outputs["frontier"].items()}
    doc = recipe(routing={"tiers": ["expert", "frontier"], "target": {"value": 0.85}})
    evidence_ = evaluate.decide(doc, tasks.for_type("classification"), LABELS, got)
    assert evidence_.metrics["frontier"]["stand_in"] == stand_in and evidence_.metrics["expert"]["stand_in"] is None
    note = "`frontier` is a recorded stand-in, not the live endpoint (its key was not set): answers from " \
           "`recorded-frontier.jsonl`; right with probability 0.9 (seed 7)"
    report = render_report(doc, evidence_.metrics, {}, evidence_.comparisons, evidence_.calibration,
                           evidence_.cascade, evidence_.verdict, 40, evidence_.route)
    assert "| frontier (recorded stand-in) |" in report and note in report
    markdown = evidence.evidence_markdown(doc, evidence_.metrics, VerdictDocument.model_validate(evidence_.verdict), 40)
    assert "| frontier (recorded stand-in) |" in markdown and note in markdown
    line = route_summary(evidence_.route, evidence_.metrics)
    saving = evidence_.route["options"]["point"]["test"]["vs_last_tier"]
    assert line.startswith("route expert -> frontier (`frontier`: recorded stand-in) on test: expert ")
    assert (f"saving {saving['cost_saving']:.1%} (95% CI {saving['cost_saving_interval_95'][0]:.1%} to "
            f"{saving['cost_saving_interval_95'][1]:.1%})") in line
    table = summary_table(evidence_.metrics, {}, "accuracy")
    assert list(table.columns[0].cells) == ["expert", "frontier (recorded stand-in)"] and table.caption == note
    print_summary(evidence_.metrics, {}, evidence_.verdict, "accuracy", evidence_.route)
    assert line in " ".join(capsys.readouterr().err.split()), "the console prints the route's line"
    without = collected()
    plain = evaluate.decide(recipe(), tasks.for_type("classification"), LABELS, without)
    assert "stand-in" not in render_report(recipe(), plain.metrics, {}, plain.comparisons, plain.calibration,
                                           plain.cascade, plain.verdict, 40, plain.route)
