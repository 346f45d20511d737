"""200,000 nested brackets (under 1 MiB) in a prep source: one rejected line in JSONL (exit 0), a user error naming
the file for a .json source (exit 2); never a RecursionError (exit 1)."""

from __future__ import annotations

import json

import pytest

from tests.smoke.test_prep_stage import good_rows, prep, read_jsonl, recipe_for

pytestmark = pytest.mark.smoke
DEEP = "[" * 200_000 + "]" * 200_000


def test_a_deeply_nested_line_is_one_rejected_line_and_a_deep_json_source_exits_2(tiny_model_dir, tracking_env,
                                                                                  tmp_path):
    lines = [json.dumps(r) for r in good_rows()]
    lines.insert(10, '{"id": "deep", "text": "deep", "label": ' + DEEP + "}")
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = prep(tmp_path, recipe_for(tiny_model_dir, source), tmp_path / "run")
    assert result.exit_code == 0, result.output
    rejected = read_jsonl(tmp_path / "run/prep/rejected.jsonl")
    assert [(r["source"], r["line"], r["reason"]) for r in rejected] == [("rows.jsonl", 11, "too_deep")]
    whole = tmp_path / "rows.json"
    whole.write_text("[" + ", ".join(lines[:10] + lines[11:] + ['{"id": "deep", "text": "x", "label": ' + DEEP + "}"])
                     + "]", encoding="utf-8")
    result = prep(tmp_path, recipe_for(tiny_model_dir, whole), tmp_path / "run2")
    assert result.exit_code == 2, result.output
    assert "rows.json: JSON nested deeper than 100 levels" in " ".join(result.output.split())
