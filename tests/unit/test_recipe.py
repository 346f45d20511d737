"""Recipe validation: every problem at once, each with its YAML path."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.recipe.schema import load_recipe

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
    """Every recipe loads; those on the project's own data find it. The public-dataset recipes read
    ../shared/data, which a checkout without it lacks: their files are checked where it exists."""
    for path in (ROOT / "recipes").glob("*.yaml"):
        recipe = load_recipe(path)
        if recipe.data.source.is_relative_to(ROOT) or (ROOT.parent / "shared" / "data").is_dir():
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
    from pipeline.recipe.schema import dump_recipe

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


OPENAI = {"name": "f", "kind": "openai", "model": "m", "api_key_env": "K"}


def test_baselines_are_checked_by_their_kind(tmp_path):
    from pipeline.recipe.schema import (
        BaseModelBaseline,
        OpenAIBaseline,
        PredictionsBaseline,
    )

    baselines = [OPENAI, {"name": "b", "kind": "base_model", "shots": 2},
                 {"name": "r", "kind": "predictions", "path": "out/r.jsonl",
                  "price_per_mtok": {"input": 1, "output": 2}}]
    recipe = load_recipe(write(tmp_path, deep_update(GOOD, "eval.baselines", baselines)))
    assert [type(b) for b in recipe.eval.baselines] == [OpenAIBaseline, BaseModelBaseline, PredictionsBaseline]
    assert recipe.eval.baselines[2].path == (tmp_path / "out/r.jsonl").resolve()  # relative to the recipe
    assert not hasattr(recipe.eval.baselines[1], "path") and not hasattr(recipe.eval.baselines[0], "shots")


@pytest.mark.parametrize(("baseline", "expected"), [
    ({**OPENAI, "shots": 2}, "eval -> baselines -> 0 -> shots: not a key of `kind: openai` baselines"),
    ({"name": "b", "kind": "base_model", "model": "gpt"}, "0 -> model: not a key of `kind: base_model`"),
    ({"name": "r", "kind": "predictions", "path": "p.jsonl", "api_key_env": "K"},
     "0 -> api_key_env: not a key of `kind: predictions`"),
    ({**OPENAI, "modle": "x"}, "eval -> baselines -> 0 -> modle: not a key of `kind: openai`"),
    ({"name": "f", "kind": "openai", "model": "m"},
     "eval -> baselines -> 0 -> api_key_env: required key is missing for a `kind: openai` baseline: the NAME"),
    ({"name": "r", "kind": "predictions"}, "0 -> path: required key is missing for a `kind: predictions`"),
    ({**OPENAI, "timeout_s": 0},
     "eval -> baselines -> 0 -> timeout_s: Input should be greater than 0 (checked as a `kind: openai` baseline)"),
    ({**OPENAI, "price_per_mtok": {"input": 1}}, "0 -> price_per_mtok -> output: required key is missing"),
    ({"name": "x"}, "eval -> baselines -> 0 -> kind: required key is missing: one of openai, base_model, predictions"),
    ({"name": "x", "kind": "frontier"}, "0 -> kind: `frontier` is not a baseline kind; use one of openai"),
    ({"name": "e", "kind": "expert"}, "eval -> baselines -> 0: give exactly one of `run_dir`"),
    ({"name": "e", "kind": "expert", "run_dir": "r", "version": "models:/e/1"}, "0: give exactly one of `run_dir`"),
    ({"name": "e", "kind": "expert", "version": "e/1"}, "version `e/1`: write models:/NAME/N or models:/NAME@ALIAS"),
])
def test_baseline_errors_name_the_yaml_path_and_the_kind(tmp_path, baseline, expected):
    """pydantic puts the union's tag in the location (eval -> baselines -> 0 -> openai -> shots); the message names
    the YAML path a user edits and the kind the baseline was checked as."""
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, deep_update(GOOD, "eval.baselines", [baseline])))
    assert expected in str(err.value)
    assert "-> openai ->" not in str(err.value) and "-> base_model ->" not in str(err.value)


def test_recipes_dumped_before_baselines_had_kinds_still_load(tmp_path):
    """Run directories and registered versions hold recipes dumped when every baseline carried every kind's keys
    (at their defaults): those load; a key of another kind at any other value is still an error."""
    every_key = {"model": None, "base_url": None, "api_key_env": None, "required": False, "max_concurrency": 4,
                 "timeout_s": 60.0, "max_retries": 4, "json_schema_response": False, "price_per_mtok": None,
                 "shots": 0, "path": None}
    old = [{"name": "b", "kind": "base_model", **every_key, "shots": 3},
           {"name": "f", "kind": "openai", **every_key, "model": "m", "api_key_env": "K"},
           {"name": "r", "kind": "predictions", **every_key, "path": "r.jsonl"}]
    recipe = load_recipe(write(tmp_path, deep_update(GOOD, "eval.baselines", old)))
    assert recipe.eval.baselines[0].shots == 3 and recipe.eval.baselines[1].model == "m"
    with pytest.raises(UserError, match="0 -> max_retries: not a key of `kind: base_model`"):
        load_recipe(write(tmp_path, deep_update(GOOD, "eval.baselines", [{**old[0], "max_retries": 2}])))
