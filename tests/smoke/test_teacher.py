"""Rows without a target labelled by a teacher over real HTTP (a local OpenAI-compatible server with faults),
under a budget that stops mid-way; the re-run continues and pays for no answer twice."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import write_recipe
from tests.smoke.test_prep_stage import good_rows, read_jsonl, recipe_for
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.smoke
KEY = "sk-teacher-secret-0123456789"
UNPARSABLE = "message 7 about"


def rows_with_gaps() -> list[dict]:
    """60 rows; 40 lose their label (missing, null or empty), 20 keep it as gold."""
    rows = good_rows()
    for i, row in enumerate(rows):
        if i % 3:
            if i % 3 == 1:
                del row["label"]
            else:
                row["label"] = None if i % 2 else ""
    return rows


def teacher_answer(body: dict) -> str:
    text = body["messages"][-1]["content"]
    if text.startswith(UNPARSABLE + " "):
        return "I am not sure."
    row = next(r for r in good_rows() if r["text"] == text)
    return f"{row['label']}."


def teacher_recipe(tiny_model_dir, source, base_url: str, **teacher) -> dict:
    recipe = recipe_for(tiny_model_dir, source, name="taught", max_rejected_fraction=0.2)
    recipe["data"]["teacher"] = {"model": "teacher-1", "base_url": base_url, "api_key_env": "TEACHER_KEY",
                                 "price_per_mtok": {"input": 1000.0, "output": 1000.0}, "max_retries": 3,
                                 "max_concurrency": 2, **teacher}
    return recipe


def test_the_teacher_labels_under_a_budget_and_a_rerun_pays_nothing_twice(tiny_model_dir, tracking_env, tmp_path,
                                                                         monkeypatch, clean_secret_env):
    monkeypatch.setenv("TEACHER_KEY", KEY)
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows_with_gaps()) + "\n", encoding="utf-8")
    runner = CliRunner()
    with FakeOpenAIServer(teacher_answer, api_key=KEY) as server:
        server.faults += [("status", 429, {"Retry-After": "0"}), ("status", 500, {}), ("malformed",)]
        # each answer costs ~$0.02 here and is reserved at ~$0.24 before it is sent; the three faults stay charged
        # at their reservation (the endpoint may bill them): the budget runs out part way
        tight = write_recipe(tmp_path, teacher_recipe(tiny_model_dir, source, server.base_url, max_cost_usd=1.5))
        stopped = runner.invoke(app, ["label", str(tight)])
        said = " ".join(stopped.output.split())
        assert stopped.exit_code == 2, stopped.output
        assert "past data.teacher.max_cost_usd ($1.5000;" in said and "estimated cost $" in said
        assert "3 without an answer" in said, "the failed attempts are counted"
        assert server.billed_usd(1000.0, 1000.0) <= 1.5
        answered_first = {json.dumps(r["messages"]) for r in server.requests}
        assert 10 <= len(answered_first) < 40, "it stopped mid-way"

        roomy = teacher_recipe(tiny_model_dir, source, server.base_url, max_cost_usd=100.0)
        run_dir = tmp_path / "run"
        result = runner.invoke(app, ["prep", str(write_recipe(tmp_path, roomy)), "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
        asked_again = [json.dumps(r["messages"]) for r in server.requests[len(answered_first) + 3:]]
        assert not answered_first & set(asked_again), "an answer paid for in the first run is never asked again"

    rows = [r for s in ("train", "validation", "test") for r in read_jsonl(run_dir / f"prep/{s}.jsonl")]
    by_text = {r["text"]: r for r in rows}
    for row in good_rows():
        if row["text"] in by_text:
            assert by_text[row["text"]]["target"] == row["label"]
    assert {r.get("provenance", "gold") for r in read_jsonl(run_dir / "prep/test.jsonl")} == {"gold"}, \
        "the test split holds gold rows only"
    assert sum(r.get("provenance") == "teacher:teacher-1" for r in rows) == 39
    rejected = read_jsonl(run_dir / "prep/rejected.jsonl")
    assert [r["reason"] for r in rejected] == ["teacher_unparsable"] and rejected[0]["line"] == 8
    stats = json.loads((run_dir / "prep/stats.json").read_text())["teacher"]
    assert (stats["rows"], stats["labelled"], stats["unparsable"]) == (40, 39, 1)
    assert stats["cached_answers"] >= 16 and stats["agreement_with_gold"]["agreement"] == 1.0
    low, high = stats["agreement_with_gold"]["interval_95"]
    assert 0.8 < low < 1.0 and high == 1.0, "20 of 20 agree: a Wilson interval, not a point"
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".md", ".yaml"}:
            assert KEY not in path.read_text(), path


def test_without_its_key_the_teacher_is_refused_before_any_call(tiny_model_dir, tmp_path, clean_secret_env):
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows_with_gaps()) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path, teacher_recipe(tiny_model_dir, source, "http://127.0.0.1:9/v1"))
    result = CliRunner().invoke(app, ["label", str(recipe)])
    assert result.exit_code == 2 and "TEACHER_KEY is not set" in result.output


def test_the_teachers_confidence_comes_from_its_log_probabilities_and_its_cost_without_usage_is_estimated(
        tiny_model_dir, tracking_env, tmp_path, monkeypatch, clean_secret_env):
    monkeypatch.setenv("TEACHER_KEY", KEY)
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows_with_gaps()) + "\n", encoding="utf-8")
    with FakeOpenAIServer(teacher_answer, api_key=KEY) as server:
        server.token_logprob = -0.05
        server.send_usage = False  # and no token usage: the cost is estimated, never $0
        recipe = write_recipe(tmp_path, teacher_recipe(tiny_model_dir, source, server.base_url, logprobs=True))
        run_dir = tmp_path / "run"
        result = CliRunner().invoke(app, ["prep", str(recipe), "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
        assert all(r.get("logprobs") is True for r in server.requests)
    confidence = json.loads((run_dir / "prep/stats.json").read_text())["teacher"]["confidence"]
    # every answer is "<label>.": 1 word at -0.05
    assert confidence["rows"] == 39 and confidence["mean"] == pytest.approx(math.exp(-0.05))
    assert confidence["below_0.5"] == 0.0 and confidence["without_logprobs"] == 0
    report = (run_dir / "prep/report.md").read_text()
    assert "Teacher confidence" in report
    taught = json.loads((run_dir / "prep/stats.json").read_text())["teacher"]
    assert taught["cost_estimated_answers"] == 60 and taught["cost_usd"] >= server.billed_usd(1000.0, 1000.0) > 0
    assert "The cost is estimated in part: 60 answers came without token usage" in " ".join(report.split())
