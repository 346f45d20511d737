"""Recipe keys per stage, the stale-upstream refusal, `--set` overrides and the stage plan, on plain files."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe.keys import changed_keys, recipe_keys
from pipeline.recipe.schema import apply_overrides, load_recipe
from pipeline.run import contracts, runner
from pipeline.run.rundir import init_run
from tests.conftest import ROOT

RECIPE = ROOT / "recipes" / "ticket-classification.yaml"


def test_recipe_keys_name_leaves_and_index_lists_of_sections():
    recipe = load_recipe(RECIPE)
    keys = recipe_keys(recipe, ("data.max_tokens", "eval"))
    assert "data.max_tokens" in keys and "eval.gate.metric" in keys
    assert "eval.baselines[1].model" in keys, "a baseline's own keys are named by its index"
    assert "task.labels" not in keys
    assert set(recipe_keys(recipe, ())) >= {"name", "task.labels", "registry.model_name"}


def test_changed_keys_are_exactly_the_edited_ones():
    recipe = load_recipe(RECIPE)
    edited = load_recipe(RECIPE, ["train.epochs=5", "eval.baselines.1.model=gpt-5"])
    before = recipe_keys(recipe, ("train", "eval"))
    after = recipe_keys(edited, ("train", "eval"))
    assert changed_keys(before, after) == ["eval.baselines[1].model", "train.epochs"]
    fewer = load_recipe(RECIPE, ["eval.baselines=[]", "eval.routing=null"])  # the route names the baselines
    removed = changed_keys(before, recipe_keys(fewer, ("train", "eval")))
    assert "eval.baselines[0].name" in removed and "eval.baselines" in removed


def test_a_stage_refuses_when_an_upstream_stage_read_a_key_that_changed(tmp_path):
    recipe = load_recipe(RECIPE)
    run = init_run(tmp_path / "run", recipe.name, "", recipe.recipe_hash())
    run.start_stage("prep", {}, recipe, ("data",))
    run.finish_stage("prep", [])
    assert contracts.recipe_inputs(run, "train", recipe, ("train",))  # unchanged: no refusal
    assert contracts.recipe_inputs(run, "train", load_recipe(RECIPE, ["train.epochs=4"]), ("train",))
    with pytest.raises(UserError, match=r"prep: data.max_tokens") as err:
        contracts.recipe_inputs(run, "train", load_recipe(RECIPE, ["data.max_tokens=300"]), ("train",))
    assert "expert run RECIPE --run-dir" in str(err.value)


def test_apply_overrides_parses_yaml_values_and_names_bad_paths():
    raw = {"train": {"epochs": 2}, "eval": {"baselines": [{"name": "a"}]}}
    out = apply_overrides(raw, ["train.epochs=3", "train.packing=true", "eval.baselines.0.name=b", "model.base=x"])
    assert out == {"train": {"epochs": 3, "packing": True}, "eval": {"baselines": [{"name": "b"}]},
                   "model": {"base": "x"}}
    assert raw["train"]["epochs"] == 2, "the caller's mapping is not changed"
    with pytest.raises(UserError, match="index it 0-0"):
        apply_overrides(raw, ["eval.baselines.3.name=c"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides(raw, ["train.epochs"])
    with pytest.raises(UserError, match="`train.epochs` is a value"):
        apply_overrides(raw, ["train.epochs.x=1"])


def test_an_override_is_validated_like_the_file():
    with pytest.raises(UserError, match=r"(?s)--set train.epochz=3.*train -> epochz: unknown key"):
        load_recipe(RECIPE, ["train.epochz=3"])
    with pytest.raises(UserError, match=r"train -> epochs"):
        load_recipe(RECIPE, ["train.epochs=-1"])


def test_the_plan_of_a_new_run_runs_everything_and_a_forced_stage_redoes_what_follows(tmp_path):
    recipe = load_recipe(RECIPE)
    assert [(p.stage, p.runs) for p in runner.plan(recipe, None)] == [(s, True) for s in runner.STAGES]
    run = init_run(tmp_path / "run", recipe.name, "", recipe.recipe_hash())
    with pytest.raises(UserError, match="--force deploy: unknown stage"):
        runner.plan(recipe, run, contracts.StageOptions(redo=frozenset({"deploy"})))
    planned = runner.plan(recipe, run, contracts.StageOptions())
    assert planned[0].why == "not run yet" and planned[1].why == "prep runs before it"


def test_a_hub_base_is_recorded_at_its_commit_and_reloaded_at_that_revision(tiny_model_dir, tmp_path, monkeypatch):
    """No hub here: `hub_snapshot` (huggingface_hub's snapshot_download) is replaced by a local snapshot folder
    named by its commit, as the hub cache names them; what is checked is what the record keeps and asks for."""
    import shutil

    from pipeline.inference import models

    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    asked = []
    monkeypatch.setattr(models, "hub_snapshot", lambda repo, revision: asked.append((repo, revision)) or snapshot)
    source, record = models.resolve_base("org/tiny-model")
    assert source == snapshot and asked == [("org/tiny-model", None)]
    assert (record.kind, record.location, record.revision) == ("hub", "org/tiny-model", "0123abcd")
    assert models.recorded_base(record) == snapshot and asked[-1] == ("org/tiny-model", "0123abcd")
    (snapshot / "config.json").write_text((snapshot / "config.json").read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(UserError, match="not the ones the adapter was trained on"):
        models.recorded_base(record)


def test_the_plan_and_the_stage_decide_up_to_date_by_one_rule(tmp_path):
    """`expert run --dry-run` and the stage itself ask `contracts.why_stale` with the inputs the stage declares:
    a prep recorded with today's inputs is skipped by both; a changed key it read makes both redo it."""
    from pipeline.stages import prep

    recipe = load_recipe(RECIPE)
    run = init_run(tmp_path / "run", recipe.name, "", recipe.recipe_hash())
    run.start_stage("prep", prep.inputs_of(recipe), recipe, prep.RECIPE_KEYS)
    run.finish_stage("prep", [])
    planned = runner.plan(recipe, run)
    assert (planned[0].runs, planned[0].why) == (False, "up to date") and planned[1].why == "not run yet"
    ended = run.stage_record("prep")["ended"]
    assert prep.run(recipe, run) == run.stage_record("prep") and run.stage_record("prep")["ended"] == ended

    edited = load_recipe(RECIPE, ["data.max_tokens=300"])
    why = contracts.why_stale(run, "prep", edited, lambda: prep.inputs_of(edited), contracts.StageOptions())
    assert why == "recipe keys changed: data.max_tokens"
    assert [p.why for p in runner.plan(edited, run)][:2] == [why, "prep runs before it"]


def test_a_forced_promotion_runs_push_in_the_plan_as_in_the_stage():
    options = contracts.StageOptions(push=contracts.PushOptions(force=True, reason="hotfix"))
    assert "push" in options.redo and "push" not in contracts.StageOptions().redo
