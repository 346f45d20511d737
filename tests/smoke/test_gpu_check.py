"""The device check's own code, run on the CPU in CI: a lent GPU is rare and its minutes few, so the check must
refuse to pass where no GPU ran, and its explicit CPU dry run (the GPU stage tests with `EXPERT_GPU_TESTS_ON_CPU=1`
and the benchmark's `--cpu-smoke`) must already pass here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.smoke
CHECK_ENV = {**os.environ, "PYTHON": sys.executable, "WHEELS": ""}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: this asserts the check's refusal without one")
def test_the_plain_check_exits_non_zero_saying_no_gpu_was_visible(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--fresh"], cwd=ROOT, env={**CHECK_ENV, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no GPU was visible" in proc.stderr
    assert "passed (gpu)" not in proc.stdout and not (tmp_path / "gpu-tests.xml").exists()  # nothing else ran
    assert "torch " in (tmp_path / "versions.txt").read_text()  # the versions it would have tested are printed


def test_the_explicit_cpu_dry_run_passes_with_no_test_skipped(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--fresh"], cwd=ROOT,
                          env={**CHECK_ENV, "OUT": str(tmp_path), "EXPERT_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu_check: passed (cpu)" in proc.stdout
    suite = ET.parse(tmp_path / "gpu-tests.xml").getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("failures", "errors", "skipped")}
    assert counts == {"failures": 0, "errors": 0, "skipped": 0} and int(suite.get("tests")) >= 8, counts
    bench = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert {(r["method"], r["checkpointing"]) for r in bench["rows"]} == {(m, c) for m in ("lora", "qlora") for c in (0, 1)}
    assert bench["eval"][0]["labels"] == 77 and bench["eval"][0]["examples_per_s"] > 0
    assert "| model | method | checkpointing |" in (tmp_path / "bench_gpu.log").read_text()
    steps = (tmp_path / "steps.txt").read_text()
    assert all(f"{step} passed" in steps for step in ("versions", "tests", "bench")), steps

    rerun = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT,
                           env={**CHECK_ENV, "OUT": str(tmp_path / "rerun")}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert "tests passed before, skipped" in rerun.stdout and "bench passed before, skipped" in rerun.stdout


def test_a_skipped_gpu_test_fails_the_check(tmp_path):
    """test_train_gpu.py skips without CUDA even in the dry run: the tests step must fail on it, not pass green."""
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--fresh"], cwd=ROOT,
                          env={**CHECK_ENV, "OUT": str(tmp_path), "GPU_TESTS": "tests/gpu/test_train_gpu.py"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED at tests: 2 of 2 tests skipped" in proc.stderr
    assert "tests passed" not in (tmp_path / "steps.txt").read_text() and not (tmp_path / "bench_gpu.log").exists()


def test_a_check_over_its_time_budget_fails_naming_the_step(tmp_path):
    """The check must fit the few minutes of a lent machine: a step that would start past the budget fails."""
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--fresh"], cwd=ROOT,
                          env={**CHECK_ENV, "OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED at tests: the check is over its 1 s budget" in proc.stderr
    assert not (tmp_path / "gpu-tests.xml").exists()
