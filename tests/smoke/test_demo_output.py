"""What `expert run` prints is what a user can act on: no library noise (issue: `make demo`'s output carried
bitsandbytes' missing-kernel note, a transformers FutureWarning, MLflow's type-hint warning and a 13-line
artifact-download progress bar). The command runs as a real process, as `make demo` runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shipped_recipe, write_recipe

pytestmark = pytest.mark.smoke
NOISE = ["Failed to load CPU gemm_4bit_forward", "FutureWarning", "Add type hints", "Downloading artifacts",
         "Traceback"]


def test_expert_run_prints_no_library_noise(tiny_model_dir, tracking_env, tmp_path, clean_secret_env):
    recipe = shipped_recipe("ticket-classification", **{
        "model.base": str(tiny_model_dir), "model.quantization": "4bit",
        "train": {"max_steps": 2, "batch_size": 8}, "eval.baselines": [{"name": "base", "kind": "base_model"}],
        "registry.model_name": "quiet-demo"})
    recipe["name"] = "quiet-demo"
    proc = subprocess.run([sys.executable, "-c",
                           "import traceback, warnings; warnings.showwarning = lambda *a, **k: traceback.print_stack(); "
                           "from pipeline.cli import app; import sys; sys.argv = [\"expert\"] + sys.argv[1:]; app()",
                           "run", str(write_recipe(tmp_path, recipe))],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    assert "push" in output and "registered quiet-demo version 1" in output
    assert [n for n in NOISE if n in output] == [], output[-4000:]
