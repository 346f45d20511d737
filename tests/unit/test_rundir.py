"""Run directory: atomic writes, manifest bookkeeping, skip/redo decisions."""

import json
import os
from pathlib import Path

import pytest

from pipeline.files import atomic_write_text, tree_hash
from pipeline.run.rundir import RunDir, create_run, latest_run


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


def test_a_newer_failed_prep_does_not_hide_the_completed_run(tmp_path):
    """`expert train` without --run-dir used to pick the newest run folder even when its prep had failed."""
    from pipeline.run.rundir import init_run

    done = init_run(tmp_path / "r" / "20260101-000000-aaaaaa", "r", "name: r\n", "h")
    (done.path / "prep").mkdir()
    (done.path / "prep/out.txt").write_text("x")
    done.start_stage("prep", {"in": "1"})
    done.finish_stage("prep", ["prep/out.txt"])
    failed = init_run(tmp_path / "r" / "20260102-000000-bbbbbb", "r", "name: r\n", "h")
    failed.start_stage("prep", {"in": "1"})
    failed.fail_stage("prep", "UserError: bad data")
    assert latest_run(tmp_path, "r").path == failed.path
    assert latest_run(tmp_path, "r", complete="prep").path == done.path
    assert latest_run(tmp_path, "r", complete="train") is None


def hold_in_another_process(run_path: Path, command: str):
    """A real second process that holds the run directory (as `expert <command>`) until it is killed."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from pipeline.run.rundir import RunDir\n"
         f"with RunDir(Path({str(run_path)!r})).locked({command!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_directory_is_held_by_one_process_and_the_second_is_told_who(tmp_path):
    """Two `expert run` on one run directory both trained, evaluated and pushed; a second one started
    mid-training resumed from the first one's live checkpoints. The holder is a real second process here."""
    import time

    from pipeline.errors import UserError
    from pipeline.run.rundir import init_run

    run = init_run(tmp_path / "r" / "20260101-000000-aaaaaa", "r", "name: r\n", "h")
    holder = hold_in_another_process(run.path, "train")
    try:
        with pytest.raises(UserError, match=r"is in use by `expert train` \(pid \d+ on .*\); wait for it"):
            with run.locked("run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with run.locked("run"):  # a killed holder leaves no stale lock
        assert "expert run" in (run.path / "run.lock").read_text()


def test_a_second_command_on_a_held_run_directory_exits_2_naming_the_holder(tmp_path):
    """The CLI takes the lock before it reads or writes the run: `expert train` on a run directory another
    process works in stops at once with exit 2 (here the holder is a real second process)."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.run.rundir import init_run

    recipe = {"name": "held", "task": {"type": "classification", "instruction": "x", "labels": ["a", "b"]},
              "data": {"source": str(tmp_path / "d.jsonl"), "fields": {"text": "t", "target": "l"}},
              "model": {"base": "m"}, "registry": {"model_name": "held"}}
    recipe_path = tmp_path / "held.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    run = init_run(tmp_path / "run", "held", recipe_path.read_text(), "h")
    recipe_before = (run.path / "recipe.yaml").read_bytes()
    holder = hold_in_another_process(run.path, "run")
    try:
        result = CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir", str(run.path)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    assert "is in use by `expert run`" in result.output
    assert (run.path / "recipe.yaml").read_bytes() == recipe_before, "nothing in the held run was rewritten"


def test_a_rerun_that_changes_nothing_a_later_stage_read_leaves_it_current(tmp_path):
    """Prep re-run for a new router split writes byte-identical train rows: train (and what follows it, in order)
    is complete again; when train's rows change, train and every stage after it stay stale."""
    run = make_run(tmp_path)

    def stage(name, inputs, files):
        with run.attempt(name, inputs):
            for rel, text in files.items():
                atomic_write_text(run.path / rel, text)
        run.finish_stage(name, list(files))

    stage("prep", {}, {"prep/train.jsonl": "rows", "prep/test.jsonl": "test"})
    prep_out = run.stage_record("prep")["outputs"]
    stage("train", {"prep/train.jsonl": prep_out["prep/train.jsonl"]}, {"train/adapter": "w"})
    stage("eval", {"prep/test.jsonl": prep_out["prep/test.jsonl"],
                   "train/adapter": run.stage_record("train")["outputs"]["train/adapter"]}, {"eval/verdict.json": "v"})

    stage("prep", {}, {"prep/train.jsonl": "rows", "prep/test.jsonl": "test", "prep/router.jsonl": "new"})
    assert [run.stage_record(s)["status"] for s in ("train", "eval")] == ["complete", "complete"]
    assert run.is_current("train", {"prep/train.jsonl": prep_out["prep/train.jsonl"]})

    stage("prep", {}, {"prep/train.jsonl": "other rows", "prep/test.jsonl": "test"})
    assert [run.stage_record(s)["status"] for s in ("train", "eval")] == ["stale", "stale"], \
        "eval read nothing that changed, but the adapter it measured no longer matches the training rows"
    stage("prep", {}, {"prep/train.jsonl": "rows", "prep/test.jsonl": "test"})
    assert run.stage_record("train")["status"] == "stale", "a stage stale before the re-run stays stale"
