"""The teacher's budget holds under concurrency, failures and a second run (issue 33, point 2), over real HTTP (a
local OpenAI-compatible server that bills every answer it composes) and, for the lock and the kill, real `expert
label` processes."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import write_recipe
from tests.smoke.test_teacher import (
    KEY,
    UNPARSABLE,
    rows_with_gaps,
    teacher_answer,
    teacher_recipe,
)
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.smoke
ROWS = 60  # rows_with_gaps: 40 to label, 20 gold (all of them sampled to measure agreement)


@pytest.fixture
def labelling(tmp_path, monkeypatch, clean_secret_env):
    """The rows file, and a cache of the run's own; `expert label` reads no model, so none is built."""
    monkeypatch.setenv("TEACHER_KEY", KEY)
    monkeypatch.setenv("EXPERT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows_with_gaps()) + "\n", encoding="utf-8")
    return source


def recipe_file(tmp_path: Path, source: Path, base_url: str, **teacher) -> Path:
    return write_recipe(tmp_path, teacher_recipe(tmp_path / "unused-model", source, base_url, **teacher))


def cached_answers(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "cache" / "responses.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def test_at_concurrency_64_the_spend_stays_under_the_cap_and_a_rerun_pays_only_for_the_rest(labelling, tmp_path):
    """Issue 33: `max_cost_usd: 0.1` spent $8.05 (exit 0, all rows) with max_concurrency 64."""
    cap = 1.0  # at $1,000 per million tokens a request costs ~$0.02 and is reserved at ~$0.3
    runner = CliRunner()
    with FakeOpenAIServer(teacher_answer, api_key=KEY) as server:
        stopped = runner.invoke(app, ["label", str(recipe_file(tmp_path, labelling, server.base_url,
                                                               max_concurrency=64, max_cost_usd=cap))])
        billed = server.billed_usd(1000.0, 1000.0)
        output = " ".join(stopped.output.split())
        assert stopped.exit_code == 2, output
        assert 0 < billed <= cap, f"the endpoint billed ${billed:.4f} against a ${cap} budget"
        sent = len(server.requests)
        assert 0 < sent < ROWS and cached_answers(tmp_path) == sent
        assert "were not sent: each could have taken the spend past data.teacher.max_cost_usd ($1.0000;" in output
        unlabelled, labelled = map(int, re.search(r"(\d+) of 40 rows are not labelled \((\d+) are\)", output).groups())
        unparsable = sum(r["messages"][-1]["content"].startswith(UNPARSABLE + " ") for r in server.requests)
        assert labelled + unparsable == sent and unlabelled + sent == 40, "no gold row is asked while rows wait"
        assert "after raising data.teacher.max_cost_usd" in output

        done = runner.invoke(app, ["label", str(recipe_file(tmp_path, labelling, server.base_url,
                                                            max_concurrency=64, max_cost_usd=100.0))])
        assert done.exit_code == 0, done.output
        assert len(server.requests) == ROWS, "the second run asked only for the rows the first did not pay for"
        assert len({json.dumps(r["messages"]) for r in server.requests}) == ROWS


def test_every_row_failing_is_exit_2_saying_how_many_and_why(labelling, tmp_path, monkeypatch):
    """Issue 33: `expert label` exited 0 when every row failed."""
    monkeypatch.setenv("TEACHER_KEY", "sk-not-the-right-key-42")
    with FakeOpenAIServer(teacher_answer, api_key=KEY) as server:
        result = CliRunner().invoke(app, ["label", str(recipe_file(tmp_path, labelling, server.base_url))])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "40 of 40 rows are not labelled (0 are): 40 failed after their retries (40 AuthenticationError (HTTP 401))" \
        in output and "sk-not-the-right-key-42" not in output


def label_process(recipe: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "label", str(recipe)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def label_run(recipe: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "label", str(recipe)], env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def test_one_labelling_run_per_cache_and_a_killed_one_leaves_no_lock_and_no_row_paid_twice(labelling, tmp_path):
    """Issue 33: two `expert label` runs on the same cache both paid for every row (700 requests for 350 rows)."""
    slow = threading.Event()
    slow.set()

    def answer(body: dict) -> str:
        if slow.is_set():
            time.sleep(0.25)
        return teacher_answer(body)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with FakeOpenAIServer(answer, api_key=KEY) as server:
        recipe = recipe_file(tmp_path, labelling, server.base_url)
        first = label_process(recipe, env)
        try:
            deadline = time.monotonic() + 60
            while len(server.bills) < 6:  # it holds the lock before its first request
                assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
                time.sleep(0.05)
            second = label_run(recipe, env)
            said = " ".join((second.stdout + second.stderr).split())
            assert second.returncode == 2, said
            assert "in use by another labelling run" in said and f"(pid {first.pid} " in said and " label " in said
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        time.sleep(0.5)  # the answers in flight when it died arrive to nobody
        paid_before = cached_answers(tmp_path)
        asked_before = len(server.requests)
        assert 0 < paid_before < ROWS

        slow.clear()
        third = label_run(recipe, env)
        assert third.returncode == 0, third.stdout + third.stderr
        assert len(server.requests) - asked_before == ROWS - paid_before, \
            "no stale lock, and the re-run paid only for the rows the killed run had no answer for"
