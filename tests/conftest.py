"""Shared fixtures: a real MLflow server, a tiny local model, and recipe helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.support.mlflow_server import mlflow_server
from tests.support.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real `mlflow server` on a free 127.0.0.1 port for the whole session."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def tracking_env(mlflow_uri, monkeypatch, tmp_path):
    """Point the pipeline at the session's MLflow server and keep caches inside tmp."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return mlflow_uri


def shipped_rows(relative: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / relative).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) with a BPE tokenizer trained on the shipped data."""
    texts = [r["text"] for r in shipped_rows("tickets/tickets.jsonl") + shipped_rows("orders/orders.jsonl")]
    texts += [json.dumps(r["fields"]) for r in shipped_rows("orders/orders.jsonl")]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts)


def shipped_recipe(recipe_file: str, **overrides) -> dict:
    """A shipped recipe as a dict, with `data.source` and the baselines' stand-in files made absolute and keys
    overridden the way `--set` does (`pipeline.recipe.schema.apply_overrides`): `shipped_recipe("x", **{"train.epochs":
    3})`. Overriding `eval.baselines` drops the shipped `eval.routing` (its tiers name the shipped baselines) unless
    `eval.routing` is overridden too; a recipe left without triage also loses the shipped router split (rows held
    out of training for routers nobody trains) unless `data.split` is overridden."""
    from pipeline.recipe.schema import apply_overrides

    recipe = yaml.safe_load((ROOT / "recipes" / f"{recipe_file}.yaml").read_text())
    recipe["data"]["source"] = str((ROOT / "recipes" / recipe["data"]["source"]).resolve())
    for baseline in recipe.get("eval", {}).get("baselines", []):
        if "stand_in" in baseline:
            baseline["stand_in"]["path"] = str((ROOT / "recipes" / baseline["stand_in"]["path"]).resolve())
    if "eval.baselines" in overrides and "eval.routing" not in overrides:
        recipe.get("eval", {}).pop("routing", None)
    sets = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    recipe = apply_overrides(recipe, sets)
    triage = ((recipe.get("eval") or {}).get("routing") or {}).get("triage")
    if triage is None and not any(key.startswith("data.split") for key in overrides):
        recipe["data"].get("split", {}).pop("router", None)
    return recipe


def write_recipe(directory: Path, recipe: dict) -> Path:
    path = directory / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def clean_secret_env(monkeypatch):
    """No real provider key leaks into tests from the developer's shell."""
    for key in list(os.environ):
        if key.endswith("_API_KEY"):
            monkeypatch.delenv(key)


def isolate(mp: pytest.MonkeyPatch, mlflow_uri: str, tmp: Path, **env: str) -> None:
    """A module-scoped fixture's environment (`mp` from `pytest.MonkeyPatch.context()`): no provider key from the
    developer's shell, the session's MLflow server, caches and the working directory in `tmp`, and `env` set."""
    for name in [k for k in os.environ if k.endswith("_API_KEY")]:
        mp.delenv(name)
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    mp.setenv("EXPERT_CACHE", str(tmp / "cache"))
    for name, value in env.items():
        mp.setenv(name, value)
    mp.chdir(tmp)


def registry_recipe(tiny_model_dir: Path, directory: Path, model: str) -> Path:
    """The shipped ticket recipe on the tiny model for the registry's tests: 2 training steps, no baselines, a gate
    any expert passes, named and registered as `model`; written into `directory`."""
    recipe = shipped_recipe("ticket-classification", **{
        "model.base": str(tiny_model_dir), "train": {"max_steps": 2, "batch_size": 8},
        "eval.baselines": [], "eval.gate": {"metric": "accuracy", "max_drop_vs_best_baseline": 1.0},
        "registry.model_name": model})
    recipe["name"] = model
    return write_recipe(directory, recipe)
