"""Baseline kinds are registered modules implementing one protocol (`pipeline/baseline_kinds/`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from pipeline import baseline_kinds
from pipeline.baseline_kinds import BaselineKind
from pipeline.errors import UserError
from pipeline.recipe.schema import BASELINE_KINDS, load_recipe

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
    with pytest.raises(UserError, match=r"eval -> baselines -> 2 -> kind: `oracle` is not a baseline kind; use one of "
                                        r"openai, base_model, predictions, expert"):
        load_recipe(path)


def test_routing_reads_a_tiers_confidence_through_its_kind_and_liveness_from_its_section(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes/ticket-classification.yaml").read_text())
    recipe["data"]["source"] = str(ROOT / "data/tickets/tickets.jsonl")
    recipe["eval"]["baselines"][1]["samples"] = 3
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    base, frontier = loaded.eval.baselines
    assert baseline_kinds.of(frontier).confidence_source(frontier).startswith("agreement of 3 sampled answers")
    assert frontier.asked_live and not base.asked_live, "only an openai endpoint is asked at request time"
    assert baseline_kinds.of(frontier).confidence_source(frontier.model_copy(update={"samples": 1})) is None


def test_the_guide_names_every_protocol_member():
    guide = (ROOT / "docs/guides/adding-a-baseline-kind.md").read_text(encoding="utf-8")
    missing = [name for name in MEMBERS if f"`{name}" not in guide]
    assert not missing, f"docs/guides/adding-a-baseline-kind.md does not describe {missing}"
