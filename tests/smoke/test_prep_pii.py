"""data.pii on real prep runs: personal data planted in known rows is redacted (or the rows rejected) before
anything is written, and is absent afterwards from every run file and from the prep run in MLflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient

from tests.smoke.test_prep_stage import good_rows, prep, read_jsonl, recipe_for

pytestmark = pytest.mark.smoke

PLANTED = {  # row index -> (kind, value)
    3: ("email", "jane.doe@example.com"),
    8: ("card", "4111 1111 1111 1111"),
    14: ("iban", "GB82 WEST 1234 5698 7654 32"),
    21: ("ip", "203.0.113.77"),
    27: ("phone", "+44 20 7946 0958"),
    33: ("us_ssn", "123-45-6789"),
}


def planted_rows() -> list[dict]:
    rows = good_rows()
    for i, (_, value) in PLANTED.items():
        rows[i]["text"] += f" contact {value} please"
    rows[40]["id"] = "max.mustermann@example.org"  # an id can be personal data too
    rows.append({"id": "bad", "text": "refund to 5500 0000 0000 0004 now", "label": "no-such-queue"})
    return rows


def everything_written(run_dir: Path, client: MlflowClient, tmp_path: Path) -> str:
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in run_dir.rglob("*") if p.is_file()
             and p.suffix in {".json", ".jsonl", ".md", ".yaml", ".txt"}]
    prep_run_id = json.loads((run_dir / "manifest.json").read_text())["stages"]["prep"]["mlflow_run_id"]
    run = client.get_run(prep_run_id)
    texts += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps([str(i) for i in run.inputs.dataset_inputs])]
    local = Path(mlflow.artifacts.download_artifacts(run_id=prep_run_id, dst_path=str(tmp_path / "artifacts")))
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in local.rglob("*") if p.is_file() and p.suffix != ".png"]
    return "\n".join(texts)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_redacted_personal_data_is_nowhere_after_prep(tiny_model_dir, tracking_env, tmp_path):
    source = write_rows(tmp_path / "rows.jsonl", planted_rows())
    run_dir = tmp_path / "run"
    recipe = recipe_for(tiny_model_dir, source, pii="redact", pii_kinds=["email", "phone", "card", "iban", "ip", "us_ssn"])
    result = prep(tmp_path, recipe, run_dir)
    assert result.exit_code == 0, result.output
    written = everything_written(run_dir, MlflowClient(tracking_env), tmp_path)
    for kind, value in PLANTED.values():
        assert value not in written, f"{kind} {value} leaked"
    assert "max.mustermann@example.org" not in written and "5500 0000 0000 0004" not in written
    rows = {r["text"]: r for s in ("train", "validation", "test") for r in read_jsonl(run_dir / f"prep/{s}.jsonl")}
    assert any(re.search(r"contact \[CARD_[a-p]{8}\] please$", text) for text in rows), \
        "the row stays, its card number replaced by its pseudonym"
    assert len(rows) == 60, "redacted rows are kept"
    found = json.loads((run_dir / "prep/stats.json").read_text())["pii"]
    assert found == {"policy": "redact", "found": {"card": 2, "email": 2, "iban": 1, "ip": 1, "phone": 1, "us_ssn": 1}}
    assert "## Personal data" in (run_dir / "prep/report.md").read_text()


def test_rows_with_personal_data_can_be_rejected_without_quoting_it(tiny_model_dir, tracking_env, tmp_path):
    source = write_rows(tmp_path / "rows.jsonl", planted_rows())
    run_dir = tmp_path / "run"
    recipe = recipe_for(tiny_model_dir, source, pii="reject", max_rejected_fraction=0.2)
    result = prep(tmp_path, recipe, run_dir)
    assert result.exit_code == 0, result.output
    rejected = read_jsonl(run_dir / "prep/rejected.jsonl")
    by_line = {r["line"]: r for r in rejected if r["reason"] == "pii"}
    # the default kinds leave national ids out: the SSN row stays, every other planted row (and the id) goes
    expected = {i + 1 for i, (kind, _) in PLANTED.items() if kind != "us_ssn"} | {41, 61}
    assert set(by_line) == expected
    assert by_line[4]["detail"] == "holds 1 email"
    written = everything_written(run_dir, MlflowClient(tracking_env), tmp_path)
    for kind, value in PLANTED.values():
        assert (value in written) == (kind == "us_ssn"), kind
