"""Prep on real data: BANKING77 (classification) and SNIPS (extraction of {intent, slots}).

The recipes are the shipped recipes/banking77.yaml and recipes/snips.yaml (the ones
docs/RESULTS.md was measured with), read the datasets from ../shared/data and use
the embedded SmolLM2 tokenizer. Each test preps a variant derived from the file in
code (PREP_VARIANTS), never a copy of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.recipe.schema import SplitSection, dump_recipe, load_recipe
from pipeline.tasks import extraction
from tests.real.conftest import RECIPES, SHARED, SHARED_DATA_MARKS

# What these tests change in the shipped recipes: a 10%/20% split, so that every class's 20% test share is
# checked, and a max_tokens no row exceeds, so that the rows prep rejects are the data's own duplicates and
# conflicts (the shipped 128 / 160 tokens each reject one long row, docs/RESULTS.md).
PREP_VARIANTS = {
    "banking77": {"split": SplitSection(validation=0.1, test=0.2, seed=13, stratify=True), "max_tokens": 768},
    "snips": {"split": SplitSection(validation=0.1, test=0.2, seed=13), "max_tokens": 512},
}

pytestmark = SHARED_DATA_MARKS


def derived_recipe(name: str, tmp_path: Path) -> Path:
    """recipes/NAME.yaml with PREP_VARIANTS[name] in its `data` section, written to tmp_path."""
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update=PREP_VARIANTS[name])})
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_recipe(recipe), encoding="utf-8")
    return path


def prepped(name: str, tmp_path: Path) -> Path:
    recipe = derived_recipe(name, tmp_path)
    result = CliRunner().invoke(app, ["prep", str(recipe), "--run-dir", str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    return tmp_path / name / "prep"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_banking77_is_stratified_over_77_intents(mlflow_env, tmp_path):
    out = prepped("banking77", tmp_path)
    categories = json.loads((SHARED / "banking77/categories.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["rows"].values()) + stats["rejected_total"] == 10003
    # the four repeated queries in the file, each found at its line
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (1292, "duplicate_exact"), (1732, "duplicate_exact"), (4606, "duplicate_exact"), (6977, "duplicate_exact")
    ]
    for split in ("train", "validation", "test"):
        assert sorted(stats["classes"][split]) == sorted(categories), f"a class is missing from {split}"
    for label, n_train in stats["classes"]["train"].items():
        total = n_train + stats["classes"]["validation"][label] + stats["classes"]["test"][label]
        assert abs(stats["classes"]["test"][label] - 0.2 * total) <= 1, f"{label} is not stratified"
    longest = stats["tokens"]["all"]["prompt"]["max"] + stats["tokens"]["all"]["answer"]["max"]
    assert longest <= PREP_VARIANTS["banking77"]["max_tokens"]
    row = read_jsonl(out / "test.jsonl")[0]
    assert row["completion"] == [{"role": "assistant", "content": row["target"]}]
    assert (out / "class_distribution.png").read_bytes()[:4] == b"\x89PNG"


def test_snips_targets_are_intent_and_slots_objects_that_fit_the_schema(mlflow_env, tmp_path):
    out = prepped("snips", tmp_path)
    schema = load_recipe(RECIPES / "snips.yaml").task.json_schema
    validator = Draft202012Validator(schema)
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["rows"].values()) + stats["rejected_total"] == 13784
    assert set(stats["rejected"]) <= {"duplicate_exact", "duplicate_normalized", "conflicting_target"}
    intents = set()
    for split in ("train", "validation", "test"):
        for row in read_jsonl(out / f"{split}.jsonl"):
            assert validator.is_valid(row["target"])
            assert extraction.parse_answer(row["completion"][0]["content"], schema) == row["target"]
            intents.add(row["target"]["intent"])
    assert len(intents) == 7
    conflicts = [r for r in read_jsonl(out / "rejected.jsonl") if r["reason"] == "conflicting_target"]
    assert len(conflicts) == stats["rejected"].get("conflicting_target", 0) and conflicts
