"""A teacher over real HTTP that echoes its API key, a card number and an e-mail in answers that are no label, and
a gold row whose label is an e-mail: with `data.pii: redact` none of them reaches prep's files, its report or the
prep run's MLflow artifacts; the rejections still say which rows and why. An answer that only mentions a label
("Not billing. It is returns.") is unparsable, not the label it denies."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.smoke.test_prep_pii import everything_written
from tests.smoke.test_prep_stage import good_rows, prep, read_jsonl
from tests.smoke.test_teacher import rows_with_gaps, teacher_recipe
from tests.support.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.smoke
KEY = "tk-live-teacher-0123456789abcdef"  # TEACHER_KEY: no *_API_KEY name, so only the recipe says it is a key
CARD, EMAIL, LABEL_EMAIL = "4111 1111 1111 1111", "jane.doe @ example.com", "bob@example.org"
ANSWERS = {  # row index (unlabelled rows) -> the teacher's answer
    1: f"I cannot say; for the record my key is {KEY}",
    # written with non-breaking spaces, and past the 120 characters a detail shows: scrubbed whole, then cut
    2: "The customer paid twice " + "p" * 81 + " " + CARD.replace(" ", "\u00a0") + " twice",
    4: f"Ask {EMAIL} about it",
    5: "Not billing. It is returns.",
}


def teacher_answer(body: dict) -> str:
    text = body["messages"][-1]["content"]
    row = next(i for i, r in enumerate(good_rows()) if r["text"] == text)
    return ANSWERS.get(row, good_rows()[row]["label"])


@pytest.mark.parametrize("mode", ["redact", "reject"])
def test_a_teacher_echoing_secrets_and_personal_data_leaves_none_in_prep(tiny_model_dir, tracking_env, tmp_path,
                                                                       monkeypatch, clean_secret_env, mode):
    monkeypatch.setenv("TEACHER_KEY", KEY)
    rows = rows_with_gaps()
    rows[3]["label"] = LABEL_EMAIL  # a gold row (index 3 keeps its label) whose label is personal data
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    with FakeOpenAIServer(teacher_answer, api_key=KEY) as server:
        recipe = teacher_recipe(tiny_model_dir, source, server.base_url, max_cost_usd=None)
        recipe["data"]["pii"] = mode
        result = prep(tmp_path, recipe, run_dir)
        assert result.exit_code == 0, result.output
        assert server.requests, "the teacher was asked over HTTP"
    rejected = {r["line"]: r for r in read_jsonl(run_dir / "prep/rejected.jsonl")}
    assert {line: r["reason"] for line, r in rejected.items()} == {
        2: "teacher_unparsable", 3: "teacher_unparsable", 4: "pii", 5: "teacher_unparsable", 6: "teacher_unparsable"}
    assert "[REDACTED]" in rejected[2]["detail"] and "[CARD_" in rejected[3]["detail"]
    assert "[EMAIL_" in rejected[5]["detail"] and rejected[4]["detail"] == "the label holds 1 email"
    assert "Not billing. It is returns." in rejected[6]["detail"], "a denied label is no label"
    written = everything_written(run_dir, MlflowClient(tracking_env), tmp_path)
    for leaked in (KEY, CARD, "4111111111111111", "4111", EMAIL, "jane.doe", LABEL_EMAIL):
        assert leaked not in written, f"{leaked!r} reached prep's files or MLflow"
    report = (run_dir / "prep/report.md").read_text()
    assert "teacher_unparsable" in report and "[CARD_" in report
    stats = json.loads((run_dir / "prep/stats.json").read_text())
    assert stats["teacher"]["unparsable"] == 4 and stats["rejected"]["pii"] == 1
