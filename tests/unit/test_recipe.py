"""Recipe validation: every problem at once, each with its YAML path."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]

GOOD = {
    "name": "demo",
    "task": {"type": "classification", "instruction": "Route it.", "labels": ["a", "b"]},
    "data": {"source": "data.jsonl", "fields": {"text": "text", "target": "label"}},
    "model": {"base": "smollm2-135m-instruct"},
    "registry": {"model_name": "demo-model"},
}


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def deep_update(base: dict, path: str, value) -> dict:
    out = yaml.safe_load(yaml.safe_dump(base))
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def test_good_recipe_loads_with_defaults_and_resolves_source(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.model.adapter.r == 16
    assert recipe.data.source == (tmp_path / "data.jsonl").resolve()
    assert recipe.eval.gate.metric == "macro_f1"


def test_shipped_recipes_are_valid():
    for path in (ROOT / "recipes").glob("*.yaml"):
        recipe = load_recipe(path)
        assert recipe.data.source.is_file(), f"{path}: data.source missing"


def test_unknown_key_and_bad_rank_reported_together(tmp_path):
    bad = deep_update(GOOD, "model.adapter", {"r": -1})
    bad["task"]["colour"] = "red"
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, bad))
    message = str(err.value)
    assert "task -> colour: unknown key" in message
    assert "model -> adapter -> r:" in message and "greater than 0" in message
    assert "2 problem(s)" in message


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("task.type", "summarise", "task -> type"),
        ("task.labels", ["only-one"], "at least two labels"),
        ("data.split", {"validation": 0.5, "test": 0.45}, "at least 10%"),
        ("eval.gate", {"metric": "field_exact_match"}, "does not apply to classification"),
        ("eval.baselines", [{"name": "f", "kind": "openai", "model": "m"}], "api_key_env"),
        ("eval.baselines", [{"name": "b", "kind": "base_model"}, {"name": "b", "kind": "base_model"}], "repeated: b"),
        ("train.learning_rate", 0, "train -> learning_rate"),
    ],
)
def test_invalid_values_name_their_key(tmp_path, path, value, expected):
    with pytest.raises(UserError, match=expected):
        load_recipe(write(tmp_path, deep_update(GOOD, path, value)))


def test_extraction_needs_a_valid_schema(tmp_path):
    recipe = deep_update(GOOD, "task", {"type": "extraction", "instruction": "x"})
    with pytest.raises(UserError, match="need `schema`"):
        load_recipe(write(tmp_path, recipe))
    recipe["task"]["schema"] = {"type": "objekt"}
    recipe["eval"] = {"gate": {"metric": "field_exact_match"}}
    with pytest.raises(UserError, match="not a valid JSON Schema"):
        load_recipe(write(tmp_path, recipe))


def test_yaml_errors_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(write(tmp_path, GOOD))])
    assert ok.exit_code == 0, ok.output
    bad = deep_update(GOOD, "model.adapter", {"r": -1})
    bad["nonsense"] = 1
    result = runner.invoke(app, ["validate", str(write(tmp_path, bad))])
    assert result.exit_code == 2
    assert "nonsense" in result.output and "model -> adapter -> r" in result.output


@pytest.mark.parametrize(
    "path, value, where, expected",
    [
        ("data.source", "data.xlsx", "data -> source", "unsupported file type"),
        ("data.test_source", "hf:", "data -> test_source", "hf:<dataset id>"),
        ("data.validation_source", "hf:org/name:", "data -> validation_source", "hf:<dataset id>"),
        ("data.max_tokens_policy", "drop", "data -> max_tokens_policy", "'reject' or 'truncate'"),
        ("data.fields.target", {"intent": "intent"}, "data -> fields -> target", "applies to extraction only"),
        ("data.fields.text", [], "data -> fields -> text", "at least 1 item"),
        ("task.labels", ["a", " a "], "`labels`", "duplicates (after normalisation"),
    ],
)
def test_data_section_errors_name_the_key(tmp_path, path, value, where, expected):
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, deep_update(GOOD, path, value)))
    assert where in str(err.value) and expected in str(err.value)


def test_extra_sources_resolve_and_hf_sources_stay_text(tmp_path):
    recipe = deep_update(deep_update(GOOD, "data.validation_source", "val.csv"), "data.test_source", "hf:org/set:cfg")
    loaded = load_recipe(write(tmp_path, recipe))
    assert loaded.data.validation_source == (tmp_path / "val.csv").resolve()
    assert loaded.data.test_source == "hf:org/set:cfg"


def test_generation_and_class_minimum_belong_to_their_task_types(tmp_path):
    generation = deep_update(GOOD, "task", {"type": "generation", "instruction": "Reply."})
    with pytest.raises(UserError, match="eval -> gate|does not apply to generation"):
        load_recipe(write(tmp_path, generation))
    ok = load_recipe(write(tmp_path, deep_update(generation, "eval", {"gate": {"metric": "exact_match"}})))
    assert ok.task.type == "generation"
    extraction = deep_update(GOOD, "task", {"type": "extraction", "instruction": "x", "schema": {"type": "object"},
                                            "min_examples_per_class": 5})
    with pytest.raises(UserError, match="min_examples_per_class` applies to classification"):
        load_recipe(write(tmp_path, extraction))


def test_dumped_recipe_reloads_identically(tmp_path):
    """The run directory and the registry store the resolved recipe; it must load back to the same recipe."""
    from pipeline.recipe import dump_recipe

    for path in (ROOT / "recipes").glob("*.yaml"):
        recipe = load_recipe(path)
        copy = tmp_path / path.name
        copy.write_text(dump_recipe(recipe))
        assert load_recipe(copy).recipe_hash() == recipe.recipe_hash()


@pytest.mark.parametrize(("path", "value", "where"), [
    ("train.batch_size", 1e30, "train.batch_size"), ("train.max_steps", 10**30, "train.max_steps"),
    ("eval.batch_size", 10**6, "eval.batch_size"), ("train.seed", 2**70, "train.seed"),
    ("registry.model_name", "../../x", "registry.model_name"), ("registry.model_name", "team/router", "registry.model_name"),
])
def test_values_that_would_crash_a_later_stage_are_refused_by_validate(tmp_path, path, value, where):
    """1e30 as a batch size crashed training (islice), `../../x` as a model name crashed push after prep, train
    and eval had run: both must be recipe errors naming the key, found before anything runs."""
    with pytest.raises(UserError, match=rf"  - {where.replace('.', ' -> ')}: "):
        load_recipe(write(tmp_path, deep_update(GOOD, path, value)))


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(GOOD) + "train:\n  epochs: 1\ntrain:\n  batch_size: 4\n")
    with pytest.raises(UserError, match=r"key `train` is given twice \(lines \d+ and \d+\)"):
        load_recipe(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({**GOOD, "train": {"epochs": 1}}).replace("  epochs: 1", "  epochs: 1\n  epochs: 2"))
    with pytest.raises(UserError, match="key `epochs` is given twice"):
        load_recipe(nested)
