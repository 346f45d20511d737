"""What `expert run` prints is what a user can act on: no library noise (issue: `make demo`'s output carried
bitsandbytes' missing-kernel note, a transformers FutureWarning, MLflow's type-hint warning and a 13-line
artifact-download progress bar), and, without any provider key, the demo's comparison, route and saving from
its recorded stand-ins, labelled as such. The command runs as a real process, as `make demo` runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shipped_recipe, write_recipe

pytestmark = pytest.mark.smoke
NOISE = ["Failed to load CPU gemm_4bit_forward", "FutureWarning", "Add type hints", "Downloading artifacts",
         "Traceback"]


def test_expert_run_prints_no_library_noise_and_ends_with_the_route(tiny_model_dir, tracking_env, tmp_path,
                                                                   clean_secret_env):
    recipe = shipped_recipe("ticket-classification", **{
        "model.base": str(tiny_model_dir), "model.quantization": "4bit",
        "train": {"max_steps": 2, "batch_size": 8}, "eval.bootstrap_samples": 200,
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

    # no key: the shipped mid tier and frontier answer from their stand-ins, and every table says so
    run_dir = next((tmp_path / "runs" / "quiet-demo").iterdir())
    metrics = json.loads((run_dir / "eval/metrics.json").read_text())
    shipped = {b["name"]: b for b in recipe["eval"]["baselines"]}
    for name in ("mid", "frontier"):
        assert metrics["systems"][name]["stand_in"] == shipped[name]["stand_in"], name
    assert metrics["systems"]["expert"]["stand_in"] is None and metrics["skipped"] == {}
    report = (run_dir / "eval/report.md").read_text()
    assert "| frontier (recorded stand-in) |" in report and shipped["frontier"]["stand_in"]["rule"] in report
    verdict = json.loads((run_dir / "eval/verdict.json").read_text())
    assert verdict["frontier_baselines"] == ["mid", "frontier"]
    # `expert run` ends with the route: tiers' shares, cost per 1k against the frontier alone, the saving's interval
    route = json.loads((run_dir / "eval/route.json").read_text())
    tail = " ".join(proc.stdout[proc.stdout.rindex("expert vs baselines"):].split())
    shares = ", ".join(f"{n} {s:.1%}" for n, s in route["options"][route["choose"]]["test"]["shares"].items())
    assert f"route expert -> mid -> frontier (`mid`, `frontier`: recorded stand-ins) on test: {shares};" in tail, tail
    assert re.search(r"cost / 1k \$\d+\.\d{4} vs \$\d+\.\d{4} for `frontier` alone; saving -?\d+\.\d% "
                     r"\(95% CI -?\d+\.\d% to -?\d+\.\d%\)", tail), tail
    # and where triage started the requests, or why it was not kept
    assert route["triage"]["source"].startswith("the router split (carved from data.source, 20%)")
    if route["triage"].get("kept"):
        starts = route["options"][route["choose"]]["test"]["starts"]
        assert (f"triage (`{route['triage_route']['router']}` router) started requests at "
                + ", ".join(f"{n} {s:.1%}" for n, s in starts.items())) in tail, tail
    else:
        assert "; triage not kept: " in tail, tail
