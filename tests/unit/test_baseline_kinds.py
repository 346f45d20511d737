"""Baseline kinds are registered modules implementing one protocol (`pipeline/baseline_kinds/`)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import baseline_kinds
from pipeline.baseline_kinds import BaselineKind
from pipeline.errors import UserError
from pipeline.evaluation.baselines import BaselineContext
from pipeline.files import file_hash
from pipeline.recipe.schema import BASELINE_KINDS, Recipe, load_recipe
from pipeline.routing import cascade
from pipeline.tasks import classification
from tests.support.openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = [name for name in dir(BaselineKind) if not name.startswith("_")] + list(BaselineKind.__annotations__)


def test_every_recipe_kind_is_registered_and_implements_the_protocol():
    assert set(baseline_kinds.KINDS) == set(BASELINE_KINDS)
    for kind, module in baseline_kinds.KINDS.items():
        assert isinstance(module, BaselineKind), f"{module.__name__} misses a protocol member"
        assert module.KIND == kind and module.SECTION is BASELINE_KINDS[kind]
        for name, member in vars(BaselineKind).items():
            if callable(member) and not name.startswith("_"):
                wanted = list(inspect.signature(member).parameters)[1:]  # without `self`
                assert list(inspect.signature(getattr(module, name)).parameters) == wanted, f"{kind}.{name}"


def test_an_unknown_kind_fails_at_recipe_validation_naming_the_key(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes/ticket-classification.yaml").read_text())
    recipe["data"]["source"] = str(ROOT / "data/tickets/tickets.jsonl")
    recipe["eval"]["baselines"].append({"name": "mystery", "kind": "oracle"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=r"eval -> baselines -> 3 -> kind: `oracle` is not a baseline kind; use one of "
                                        r"openai, base_model, predictions, expert"):
        load_recipe(path)


def test_routing_reads_a_tiers_confidence_through_its_kind_and_liveness_from_its_section(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes/ticket-classification.yaml").read_text())
    recipe["data"]["source"] = str(ROOT / "data/tickets/tickets.jsonl")
    recipe["eval"]["baselines"][2]["samples"] = 3
    recipe["eval"]["baselines"][2].pop("stand_in")
    recipe["eval"]["baselines"][1].pop("stand_in")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    base, _, frontier = loaded.eval.baselines
    assert baseline_kinds.of(frontier).confidence_source(frontier).startswith("agreement of 3 sampled answers")
    assert frontier.asked_live and not base.asked_live, "only an openai endpoint is asked at request time"
    assert baseline_kinds.of(frontier).confidence_source(frontier.model_copy(update={"samples": 1})) is None


def test_the_guide_names_every_protocol_member():
    guide = (ROOT / "docs/guides/adding-a-baseline-kind.md").read_text(encoding="utf-8")
    missing = [name for name in MEMBERS if f"`{name}" not in guide]
    assert not missing, f"docs/guides/adding-a-baseline-kind.md does not describe {missing}"


def test_only_hosted_or_recorded_kinds_count_as_a_frontier():
    assert {kind: module.FRONTIER for kind, module in baseline_kinds.KINDS.items()} == {
        "openai": True, "predictions": True, "base_model": False, "expert": False}


def shipped_demo() -> Recipe:
    return load_recipe(ROOT / "recipes/ticket-classification.yaml")


def test_the_demo_recipe_validates_and_its_stand_ins_answer_every_ticket_as_their_rule_says(tmp_path):
    """Both hosted tiers of the demo have a stand-in line for every ticket, in the predictions format, made by the
    seeded script (rebuilt here byte for byte) with about the accuracy, latency and token counts their rule
    states."""
    demo = shipped_demo()
    tickets = {r["id"]: r for r in map(json.loads, (ROOT / "data/tickets/tickets.jsonl").read_text().splitlines())}
    assert len(tickets) == 400
    assert demo.eval.routing.tiers == ["expert", "mid", "frontier"]
    rebuilt = subprocess.run([sys.executable, str(ROOT / "scripts/make_recorded_tiers.py"), "--out", str(tmp_path)],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    readme = (ROOT / "data/README.md").read_text(encoding="utf-8")
    for name, accuracy, latency_ms in (("mid", 0.90, 250), ("frontier", 0.97, 700)):
        baseline = next(b for b in demo.eval.baselines if b.name == name)
        assert baseline.stand_in.path.read_bytes() == (tmp_path / baseline.stand_in.path.name).read_bytes()
        assert f"right with probability {accuracy:.2f}" in baseline.stand_in.rule and f"~{latency_ms} ms" in \
            baseline.stand_in.rule
        assert f"`{baseline.stand_in.path.name}`" in readme
        rows = [json.loads(line) for line in baseline.stand_in.path.read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(tickets)
        got = classification.parse_answer  # the recorded `output` is a label the task parses
        right = np.mean([got(r["output"], demo.task.labels) == tickets[r["id"]]["queue"] for r in rows])
        assert abs(right - accuracy) < 0.03, f"{name}: {right:.3f} right"
        assert abs(np.mean([r["latency_ms"] for r in rows]) - latency_ms) < 0.1 * latency_ms
        assert all(0 <= r["confidence"] <= 1 and r["input_tokens"] > r["output_tokens"] > 0 for r in rows)
        system = classification.system_prompt(demo.task.instruction, demo.task.labels)
        first = rows[0]
        assert first["input_tokens"] == pytest.approx((len(system) + len(tickets[first["id"]]["text"])) / 4, abs=12)
    mid = {r["id"]: r for r in map(json.loads, (tmp_path / "recorded-mid.jsonl").read_text().splitlines())}
    right = [r["confidence"] for i, r in mid.items() if r["output"] == tickets[i]["queue"]]
    wrong = [r["confidence"] for i, r in mid.items() if r["output"] != tickets[i]["queue"]]
    assert np.mean(right) > np.mean(wrong) + 0.15 and min(right) < max(wrong), "lower when wrong, but overlapping"


def splits_of(ids: list[str]) -> dict[str, list[dict]]:
    tickets = {r["id"]: r for r in map(json.loads, (ROOT / "data/tickets/tickets.jsonl").read_text().splitlines())}
    return {"test": [{"id": i, "text": tickets[i]["text"], "prompt": tickets[i]["text"], "target": tickets[i]["queue"]}
                     for i in ids]}


def context(recipe: Recipe, loaded: dict) -> BaselineContext:
    system = classification.system_prompt(recipe.task.instruction, recipe.task.labels)
    return BaselineContext(recipe, classification, recipe.task.labels, system, [], None, None, loaded)


def test_without_its_key_an_openai_baseline_answers_from_its_stand_in_and_with_it_asks_the_endpoint(
        tmp_path, monkeypatch, clean_secret_env):
    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    demo = shipped_demo()
    frontier = next(b for b in demo.eval.baselines if b.name == "frontier")
    kind = baseline_kinds.of(frontier)
    splits = splits_of(["t0001", "t0002", "t0003"])
    recorded = {r["id"]: r for r in map(json.loads, frontier.stand_in.path.read_text().splitlines())}

    loaded = kind.load(frontier, splits, classification, demo.task.labels)
    result = kind.answer(frontier, splits, context(demo, {"frontier": loaded}))
    assert result.stand_in == frontier.stand_in and result.skipped is None
    assert [r["prediction"] for r in result.outputs["test"]] == [recorded[i]["output"] for i in ("t0001", "t0002", "t0003")]
    assert [r["latency_s"] for r in result.outputs["test"]] == [recorded[i]["latency_ms"] / 1000
                                                                for i in ("t0001", "t0002", "t0003")]
    tokens_in = np.mean([recorded[i]["input_tokens"] for i in ("t0001", "t0002", "t0003")])
    tokens_out = np.mean([recorded[i]["output_tokens"] for i in ("t0001", "t0002", "t0003")])
    assert kind.cost_per_1k(frontier, result.outputs["test"], demo) == pytest.approx(
        1000 * (tokens_in * 0.15 + tokens_out * 0.60) / 1e6)
    assert "stand-in" in kind.confidence_source(frontier)
    stale = kind.staleness_inputs(frontier, tmp_path)
    assert stale == {"stand_in:frontier": file_hash(frontier.stand_in.path)}, "a changed stand-in file reruns eval"

    with FakeOpenAIServer(lambda body: "billing", api_key="sk-live") as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-live")
        live = frontier.model_copy(update={"base_url": server.base_url})
        assert kind.load(live, splits, classification, demo.task.labels) is None, "the stand-in is not even read"
        result = kind.answer(live, splits, context(demo, {"frontier": None}))
        assert result.stand_in is None and len(server.requests) == 3
        assert [r["prediction"] for r in result.outputs["test"]] == ["billing"] * 3
        assert kind.staleness_inputs(live, tmp_path) == {}, "setting the key makes eval stale: the endpoint answers"


def test_a_stand_in_is_never_asked_at_request_time(clean_secret_env):
    """Serving and `expert predict` escalate only to a live endpoint: without the keys, the demo's route and a
    cascade to its frontier stay off and say which key is missing, stand-ins or not."""
    demo = shipped_demo()
    route = {"chain": ["expert", "mid", "frontier"], "thresholds": [0.8, 0.7]}
    assert cascade.escalation(demo, 0.8, None, route=route).note == "off: DEEPINFRA_API_KEY is not set (route tier `mid`)"
    assert cascade.escalation(demo, 0.8, "frontier").note == "off: OPENAI_API_KEY is not set"
