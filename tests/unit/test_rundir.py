"""Run directory: atomic writes, manifest bookkeeping, skip/redo decisions."""

import json
import os
from pathlib import Path

import pytest

from pipeline.rundir import RunDir, atomic_write_text, create_run, latest_run, tree_hash


def make_run(tmp_path: Path) -> RunDir:
    return create_run(tmp_path / "runs", "demo", "name: demo\n", "hash0")


def test_create_and_latest(tmp_path):
    first = make_run(tmp_path)
    second = make_run(tmp_path)
    assert (first.path / "recipe.yaml").read_text() == "name: demo\n"
    assert latest_run(tmp_path / "runs", "demo").path == max(first.path, second.path)
    assert latest_run(tmp_path / "runs", "other") is None


def test_atomic_write_keeps_old_content_when_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"], "temp file left behind"


def test_stage_lifecycle_and_skip_rules(tmp_path):
    run = make_run(tmp_path)
    inputs = {"a": "1"}
    assert not run.is_current("prep", inputs)
    with run.attempt("prep", inputs):
        atomic_write_text(run.path / "prep" / "x.txt", "data")
    run.finish_stage("prep", ["prep/x.txt"])
    assert run.is_current("prep", inputs)
    assert not run.is_current("prep", {"a": "2"}), "changed inputs must redo the stage"
    (run.path / "prep" / "x.txt").write_text("tampered")
    assert not run.is_current("prep", inputs), "changed outputs must redo the stage"


def test_failed_stage_is_recorded_and_later_stages_go_stale(tmp_path):
    run = make_run(tmp_path)
    for stage in ("prep", "train"):
        with run.attempt(stage, {}):
            pass
        run.finish_stage(stage, [])
    with pytest.raises(RuntimeError):
        with run.attempt("prep", {"new": "input"}):
            raise RuntimeError("boom")
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["stages"]["prep"]["status"] == "failed"
    assert "boom" in manifest["stages"]["prep"]["error"]
    assert manifest["stages"]["train"]["status"] == "stale"


def test_tree_hash_sees_names_and_contents(tmp_path):
    d = tmp_path / "d"
    atomic_write_text(d / "a.txt", "1")
    h1 = tree_hash(d)
    atomic_write_text(d / "a.txt", "2")
    h2 = tree_hash(d)
    (d / "a.txt").rename(d / "b.txt")
    assert len({h1, h2, tree_hash(d)}) == 3
