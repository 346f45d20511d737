"""Recipe keys documented once: the field descriptions in recipe.py are the key table of docs/RECIPE_KEYS.md and
`expert validate --keys / --explain`."""

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.recipe import keys_doc as recipe_docs
from pipeline.recipe.schema import BASELINE_KINDS, Recipe

ROOT = Path(__file__).resolve().parents[2]
KEYS_DOC = ROOT / "docs" / "RECIPE_KEYS.md"

RECIPE = {
    "name": "demo",
    "task": {"type": "classification", "instruction": "Route it.", "labels": ["a", "b"]},
    "data": {"source": "data.jsonl", "fields": {"text": "text", "target": "label"}, "split": {"seed": 7}},
    "model": {"base": "smollm2-135m-instruct"},
    "eval": {"baselines": [{"name": "zero", "kind": "base_model"}, {"name": "four", "kind": "base_model", "shots": 4},
                           {"name": "gpt", "kind": "openai", "model": "gpt-x", "api_key_env": "KEY"}]},
    "registry": {"model_name": "demo-model"},
}


def models_below(model: type[BaseModel]) -> set[type[BaseModel]]:
    """Every pydantic model reachable from `model`'s fields (sections, union members, nested mappings)."""
    found = {model}

    def visit(annotation) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.update(models_below(annotation))
            return
        for arg in get_args(annotation):  # Optional, unions, lists, dicts, Annotated
            visit(arg)

    for info in model.model_fields.values():
        visit(info.annotation)
    return found


def test_key_table_is_generated_from_the_model():
    """The CI check: `make test` fails when a field's description changed and docs/RECIPE_KEYS.md was not
    regenerated; the command that regenerates it writes that file by default."""
    assert recipe_docs.KEYS_DOC == KEYS_DOC
    block = recipe_docs.current_block(KEYS_DOC.read_text(encoding="utf-8"))
    assert block is not None, f"docs/RECIPE_KEYS.md lacks the markers {recipe_docs.START} ... {recipe_docs.END}"
    assert block == recipe_docs.markdown(), (
        "docs/RECIPE_KEYS.md's recipe key table is stale: run `.venv/bin/python -m pipeline.recipe.keys_doc --write`"
    )
    assert recipe_docs.main(["--check"]) == 0  # `--check` and `--write` alone mean docs/RECIPE_KEYS.md


def test_every_field_of_every_section_has_a_description():
    models = models_below(Recipe)
    assert set(BASELINE_KINDS.values()) <= models and len(models) > 10
    missing = [f"{m.__name__}.{name}" for m in models for name, info in m.model_fields.items()
               if not (info.description or "").strip()]
    assert not missing, f"fields without a description: {', '.join(sorted(missing))}"
    assert all(text for _, text in recipe_docs.kinds_text()), "every baseline kind says what it is (its docstring)"
    assert all(k.description for k in recipe_docs.all_keys())


def test_table_rows_name_type_default_and_kinds():
    rows = {k.key: k for k in recipe_docs.keys()}
    seed = rows["data.split.seed"]
    assert (seed.type, seed.default) == ("int (>= 0, < 2^32)", "13") and "few-shot" in seed.description
    assert rows["task.schema"].default == "required for extraction"  # the shown default, not `none`
    assert rows["eval.cascade.target"].default == "required with `eval.cascade`"
    assert rows["train.padding_free"].type == "bool | `auto`"
    assert rows["eval.baselines[].kind"].type == "`openai` | `base_model` | `predictions` | `expert`"
    assert rows["eval.baselines[].shots"].meaning.startswith("base_model only: ")
    assert rows["eval.baselines[].price_per_mtok.input"].kinds == ("openai", "predictions")
    assert rows["eval.baselines[].name"].kinds == () and rows["eval.baselines[].name"].default == "required"
    assert "data.split" not in rows and "eval.baselines" in rows and "eval.cascade" in rows
    table = recipe_docs.markdown()
    assert "| `data.split.seed` | int (>= 0, < 2^32) | 13 | seed of the split" in table
    assert r"`openai` \| `base_model` \| `predictions`" in table  # pipes escaped inside the table


def test_write_regenerates_and_check_fails_on_a_stale_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{recipe_docs.START}\n| old | table |\n{recipe_docs.END}\n\nafter\n")
    assert recipe_docs.main(["--check", str(readme)]) == 1
    assert "--write" in capsys.readouterr().err
    assert recipe_docs.main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "| old |" not in text
    assert recipe_docs.main(["--check", str(readme)]) == 0
    (tmp_path / "bare.md").write_text("no markers\n")
    assert recipe_docs.main(["--check", str(tmp_path / "bare.md")]) == 1


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the terminal table keeps each key on one line
    return CliRunner()


def test_validate_keys_prints_the_table_and_still_validates(tmp_path, runner):
    result = runner.invoke(app, ["validate", str(write(tmp_path, RECIPE)), "--keys"])
    assert result.exit_code == 0, result.output
    for key in ("data.split.seed", "eval.baselines[].api_key_env", "registry.model_name"):
        assert key in result.output
    assert "is a valid classification recipe" in result.output
    plain = runner.invoke(app, ["validate", str(write(tmp_path, RECIPE))])
    assert plain.exit_code == 0 and "data.split.seed" not in plain.output  # plain validate is unchanged


def test_validate_explain_one_key_with_the_recipes_value(tmp_path, runner):
    path = write(tmp_path, RECIPE)
    result = runner.invoke(app, ["validate", str(path), "--explain", "data.split.seed"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "type:     int (>= 0, < 2^32)" in out and "default:  13" in out and "value:    7" in out
    assert "seed of the split and of the few-shot draw" in out

    # a key of the baselines' items: every baseline's value, or which kind does not take it
    shots = runner.invoke(app, ["validate", str(path), "--explain", "eval.baselines.shots"]).output
    assert "[0] zero (kind: base_model): 0" in shots and "[1] four (kind: base_model): 4" in shots
    assert "[2] gpt (kind: openai): not a key of kind `openai`" in shots
    one = runner.invoke(app, ["validate", str(path), "--explain", "eval.baselines[2].model"]).output
    assert "[2] gpt (kind: openai): `gpt-x`" in one and "zero" not in one
    # a key below an optional mapping the recipe does not have, and a section with its keys
    target = runner.invoke(app, ["validate", str(path), "--explain", "eval.cascade.target"]).output
    assert "required with `eval.cascade`" in target and "none (`eval.cascade` is not set)" in target
    split = runner.invoke(app, ["validate", str(path), "--explain", "data.split"]).output
    assert "data.split.stratify" in split and "seed: 7" in split


def test_validate_explain_unknown_key_suggests_the_closest(tmp_path, runner):
    path = write(tmp_path, RECIPE)
    result = runner.invoke(app, ["validate", str(path), "--explain", "data.split.sed"])
    assert result.exit_code == 2
    assert "unknown recipe key `data.split.sed`" in result.output and "closest: data.split.seed" in result.output
    bare = runner.invoke(app, ["validate", str(path), "--explain", "seed"])
    assert bare.exit_code == 2 and "data.split.seed, train.seed, eval.seed" in bare.output


def test_validate_explain_on_a_broken_recipe_explains_then_lists_the_problems(tmp_path, runner):
    broken = {**RECIPE, "train": {"batch_size": 0}}
    result = runner.invoke(app, ["validate", str(write(tmp_path, broken)), "--explain", "train.batch_size"])
    assert result.exit_code == 2
    assert "examples per step" in result.output and "train -> batch_size" in result.output
