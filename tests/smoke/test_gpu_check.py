"""The device check's own code, run on the CPU in CI: a lent GPU is rare and its minutes few, so the GPU stage
tests (`EXPERT_GPU_TESTS_ON_CPU=1`) and the throughput benchmark (`--cpu-smoke`) must already run here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.smoke


def test_the_gpu_stage_tests_pass_as_a_cpu_dry_run(tmp_path):
    junit = tmp_path / "gpu-tests.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={junit}",
         "tests/gpu/test_stages_gpu.py"],
        cwd=ROOT, env={**os.environ, "EXPERT_GPU_TESTS_ON_CPU": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = ET.parse(junit).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": 8, "failures": 0, "errors": 0, "skipped": 0}, counts


def test_the_gpu_benchmark_runs_expert_trains_path_and_evals_scorer_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--cpu-smoke", "--json", str(out)], cwd=ROOT,
        env={**os.environ, "EXPERT_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [e["labels"] for e in result["eval"]] == [77] and result["eval"][0]["examples_per_s"] > 0
    assert {(r["method"], r["checkpointing"]) for r in rows} == {(m, c) for m in ("lora", "qlora") for c in (False, True)}
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured"] < 1 and math.isfinite(row["train_loss"])
    assert "| model | method | checkpointing |" in proc.stdout
