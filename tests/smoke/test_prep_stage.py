"""The prep stage end to end on the tiny model's tokenizer and a real MLflow server.

A bad-input fixture plants every defect the stage checks at a known row; the
tests assert each is rejected with its reason code and location, that the good
rows all come through, and that over the threshold the stage exits 2 with a
summary by reason and leaves earlier runs alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import write_recipe

pytestmark = pytest.mark.smoke
LABELS = ["billing", "shipping", "returns"]
SCHEMA = {
    "type": "object",
    "properties": {"product": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
    "required": ["product", "quantity"],
    "additionalProperties": False,
}


def good_rows(n: int = 60) -> list[dict]:
    words = ["parcel", "invoice", "refund", "label", "courier", "receipt", "box", "charge", "order", "card"]
    return [
        {"id": f"g{i}", "text": f"message {i} about my {words[i % 10]} and {words[(i // 10) % 10]}", "label": LABELS[i % 3]}
        for i in range(n)
    ]


def recipe_for(tiny_model_dir: Path, source: Path, name: str = "prep-test", **data) -> dict:
    return {
        "name": name,
        "task": {"type": "classification", "instruction": "Route the message.", "labels": LABELS},
        "data": {"source": str(source), "fields": {"id": "id", "text": "text", "target": "label"},
                 "max_tokens": 96, **data},
        "model": {"base": str(tiny_model_dir)},
        "registry": {"model_name": name},
    }


def prep(tmp_path: Path, recipe: dict, run_dir: Path | None = None):
    path = write_recipe(tmp_path, recipe)
    args = ["prep", str(path)] + (["--run-dir", str(run_dir)] if run_dir else ["--runs-root", str(tmp_path / "runs")])
    return CliRunner().invoke(app, args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def planted_file(path: Path) -> tuple[dict[int, str], int]:
    """60 good rows, then one row per defect; returns {line: expected reason} and the good-row count."""
    lines = [json.dumps(r) for r in good_rows()]
    defects = [
        ('{"id": "m1", "label": "billing"}', "missing_field"),
        ('{"id": "e1", "text": "", "label": "billing"}', "empty_text"),
        ('{"id": "e2", "text": " \\t\\n ", "label": "billing"}', "empty_text"),
        ('{"id": "n1", "text": 42, "label": "billing"}', "non_text"),
        (b'{"id": "u1", "text": "caf\xe9 order", "label": "billing"}', "undecodable"),
        ('{"id": "p1", "text": "broken", ', "unparsable"),
        ('["a list", "not an object"]', "unparsable"),
        ('{"id": "l1", "text": "my horoscope please", "label": "astrology"}', "label_outside_set"),
        ('{"id": "t1", "text": "a label that is a list", "label": ["billing"]}', "bad_target"),
        ('{"id": "d1", "text": "message 0 about my parcel and parcel", "label": "billing"}', "duplicate_exact"),
        ('{"id": "d2", "text": "MESSAGE 1 about  my invoice and parcel", "label": "shipping"}', "duplicate_normalized"),
        ('{"id": "c1", "text": "Where is my money", "label": "billing"}', "conflicting_target"),
        ('{"id": "c2", "text": "where is my money", "label": "returns"}', "conflicting_target"),
        ('{"id": "g5", "text": "a new text reusing an id", "label": "billing"}', "duplicate_id"),
        (json.dumps({"id": "x1", "text": "too long " * 200, "label": "billing"}), "too_long"),
    ]
    expected = {}
    raw = [line.encode() for line in lines]
    for content, reason in defects:
        raw.append(content if isinstance(content, bytes) else content.encode())
        expected[len(raw)] = reason
    path.write_bytes(b"\n".join(raw) + b"\n")
    return expected, len(lines)


def test_every_planted_defect_is_rejected_with_reason_and_line(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "planted.jsonl"
    expected, n_good = planted_file(source)
    result = prep(tmp_path, recipe_for(tiny_model_dir, source, max_rejected_fraction=0.5))
    assert result.exit_code == 0, result.output
    out = next((tmp_path / "runs" / "prep-test").iterdir()) / "prep"
    rejected = read_jsonl(out / "rejected.jsonl")
    assert {r["line"]: r["reason"] for r in rejected} == expected
    assert all(r["source"] == "planted.jsonl" for r in rejected)
    by_line = {r["line"]: r for r in rejected}
    assert "`text` is int" in by_line[64]["detail"]
    assert "same text at planted.jsonl:72" in by_line[73]["detail"]
    assert "g5" in by_line[74]["detail"] and "planted.jsonl:6" in by_line[74]["detail"]
    kept_ids = {r["id"] for split in ("train", "validation", "test") for r in read_jsonl(out / f"{split}.jsonl")}
    assert kept_ids == {f"g{i}" for i in range(n_good)}, "every good row, and only those, reaches the splits"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejected"]["conflicting_target"] == 2 and stats["duplicates_removed"] == 2
    assert stats["rejected_total"] == len(expected)
    report = (out / "report.md").read_text()
    assert "**too_long**: 1" in report and "planted.jsonl:75" in report


def test_over_the_threshold_exits_2_with_counts_and_leaves_earlier_runs(tiny_model_dir, tracking_env, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in good_rows()))
    assert prep(tmp_path, recipe_for(tiny_model_dir, good)).exit_code == 0
    earlier = next((tmp_path / "runs" / "prep-test").iterdir())
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}

    source = tmp_path / "planted.jsonl"
    planted_file(source)
    result = prep(tmp_path, recipe_for(tiny_model_dir, source))
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "15 of 75 rows rejected" in message and "max_rejected_fraction=0.05" in message
    for reason, n in {"empty_text": 2, "unparsable": 2, "conflicting_target": 2, "too_long": 1, "undecodable": 1}.items():
        assert f"{reason}: {n}" in message
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before, "an earlier run was modified"
    failed = [p for p in (tmp_path / "runs" / "prep-test").iterdir() if p != earlier]
    manifest = json.loads((failed[0] / "manifest.json").read_text())
    assert manifest["stages"]["prep"]["status"] == "failed"
    assert not (failed[0] / "prep/train.jsonl").exists()


def test_same_input_twice_is_byte_identical(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "planted.jsonl"
    planted_file(source)
    recipe = recipe_for(tiny_model_dir, source, max_rejected_fraction=0.5)
    for name in ("a", "b"):
        assert prep(tmp_path, recipe, tmp_path / name).exit_code == 0
    for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "fewshot.json", "rejected.jsonl", "stats.json",
              "report.md", "class_distribution.png"):
        assert (tmp_path / "a/prep" / f).read_bytes() == (tmp_path / "b/prep" / f).read_bytes(), f
    fingerprints = [json.loads((tmp_path / n / "manifest.json").read_text())["stages"]["prep"]["fingerprint"] for n in "ab"]
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 64

    other_seed = {**recipe, "data": {**recipe["data"], "split": {"seed": 99}}}
    assert prep(tmp_path, other_seed, tmp_path / "c").exit_code == 0
    assert (tmp_path / "c/prep/test.jsonl").read_bytes() != (tmp_path / "a/prep/test.jsonl").read_bytes()


def test_all_file_formats_give_the_same_splits(tiny_model_dir, tracking_env, tmp_path):
    rows = [{"id": r["id"], "subject": f"Re: {r['label']}", "body": r["text"], "label": r["label"]} for r in good_rows()]
    files = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "csv": tmp_path / "d.csv",
             "tsv": tmp_path / "d.tsv", "parquet": tmp_path / "d.parquet"}
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["json"].write_text(json.dumps(rows))
    for kind, delimiter in (("csv", ","), ("tsv", "\t")):
        with files[kind].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"])
    outputs = {}
    for kind, path in files.items():
        recipe = recipe_for(tiny_model_dir, path, fields={"id": "id", "text": ["subject", "body"], "target": "label"})
        result = prep(tmp_path, recipe, tmp_path / kind)
        assert result.exit_code == 0, f"{kind}: {result.output}"
        outputs[kind] = [(tmp_path / kind / "prep" / f"{s}.jsonl").read_bytes() for s in ("train", "validation", "test")]
    assert all(o == outputs["jsonl"] for o in outputs.values())
    first = json.loads(outputs["csv"][0].splitlines()[0])
    row = next(r for r in rows if r["id"] == first["id"])
    assert first["text"] == f"{row['subject']}\n\n{row['body']}"
    assert first["prompt"][1] == {"role": "user", "content": first["text"]}


def test_csv_defects_have_line_numbers_and_wrong_mapping_is_named(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "d.csv"
    body = "id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in good_rows())
    body += 'q1,"a quoted\nmulti-line text",billing\nw1,too,many,fields\n'
    source.write_bytes(body.encode() + b"b1,caf\xe9,billing\n")
    result = prep(tmp_path, recipe_for(tiny_model_dir, source, max_rejected_fraction=0.5))
    assert result.exit_code == 0, result.output
    rejected = read_jsonl(next((tmp_path / "runs/prep-test").iterdir()) / "prep/rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [(64, "unparsable"), (65, "undecodable")]
    assert "4 fields, the header has 3" in rejected[0]["detail"]

    wrong = recipe_for(tiny_model_dir, source, fields={"text": "text", "target": "category"})
    result = prep(tmp_path, wrong)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "field `category` is in no row of data.source (d.csv)" in message and "id, label, text" in message


def test_extraction_schema_errors_name_the_json_path(tiny_model_dir, tracking_env, tmp_path):
    rows = [{"text": f"send {i + 1} units of item {i}", "meta": {"product": f"item {i}", "qty": i + 1}} for i in range(30)]
    rows[4]["meta"]["qty"] = 0
    rows[7]["meta"]["qty"] = "three"
    source = tmp_path / "orders.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for(tiny_model_dir, source, max_rejected_fraction=0.2, max_tokens=256,
                        fields={"text": "text", "target": {"product": "meta.product", "quantity": "meta.qty"}})
    recipe["task"] = {"type": "extraction", "instruction": "Extract.", "schema": SCHEMA}
    recipe["eval"] = {"gate": {"metric": "exact_match"}}
    result = prep(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    out = next((tmp_path / "runs/prep-test").iterdir()) / "prep"
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [(5, "schema_invalid"), (8, "schema_invalid")]
    assert all("$.quantity" in r["detail"] for r in rejected)
    train = read_jsonl(out / "train.jsonl")
    assert train[0]["completion"][0]["content"] == json.dumps(train[0]["target"])
    assert set(train[0]["target"]) == {"product", "quantity"}


def test_fixed_test_source_removes_leaked_texts_from_train(tiny_model_dir, tracking_env, tmp_path):
    rows = good_rows()
    source, test_source = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fixed = [{"id": "t1", "text": rows[3]["text"].upper(), "label": rows[3]["label"]},
             {"id": "t2", "text": "a brand new test message", "label": "returns"},
             {"id": "t3", "text": "another fresh test message", "label": "billing"},
             {"id": "t4", "text": "one more shipping question", "label": "shipping"}]
    test_source.write_text("".join(json.dumps(r) + "\n" for r in fixed))
    result = prep(tmp_path, recipe_for(tiny_model_dir, source, test_source=str(test_source)))
    assert result.exit_code == 0, result.output
    out = next((tmp_path / "runs/prep-test").iterdir()) / "prep"
    assert [r["id"] for r in read_jsonl(out / "test.jsonl")] == ["t1", "t2", "t3", "t4"]
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["source"], r["line"], r["reason"]) for r in rejected] == [("train.jsonl", 4, "leakage")]
    train_texts = {r["text"] for r in read_jsonl(out / "train.jsonl") + read_jsonl(out / "validation.jsonl")}
    assert rows[3]["text"] not in train_texts
    stats = json.loads((out / "stats.json").read_text())
    assert stats["leakage_removed"] == 1
    assert stats["rows"]["test"] == 4 and stats["rows"]["train"] + stats["rows"]["validation"] == 59


def test_truncate_policy_cuts_the_input_and_reports_it(tiny_model_dir, tracking_env, tmp_path):
    rows = good_rows()
    rows[10]["text"] = "please look at my parcel " * 60
    source = tmp_path / "long.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prep(tmp_path, recipe_for(tiny_model_dir, source, max_tokens_policy="truncate"), tmp_path / "t").exit_code == 0
    truncated = read_jsonl(tmp_path / "t/prep/truncated.jsonl")
    assert [(t["id"], t["line"]) for t in truncated] == [("g10", 11)]
    assert truncated[0]["tokens_before"] > 96 >= truncated[0]["tokens_after"]
    kept = {r["id"]: r for s in ("train", "validation", "test") for r in read_jsonl(tmp_path / f"t/prep/{s}.jsonl")}
    assert rows[10]["text"].startswith(kept["g10"]["text"]) and len(kept["g10"]["text"]) < len(rows[10]["text"])
    stats = json.loads((tmp_path / "t/prep/stats.json").read_text())
    assert stats["truncated"] == 1 and stats["max_tokens_policy"] == "truncate"

    result = prep(tmp_path, recipe_for(tiny_model_dir, source), tmp_path / "r")
    assert result.exit_code == 0
    assert [r["reason"] for r in read_jsonl(tmp_path / "r/prep/rejected.jsonl")] == ["too_long"]


def test_a_class_below_the_minimum_is_named(tiny_model_dir, tracking_env, tmp_path):
    rows = [r for r in good_rows() if r["label"] != "returns"] + [
        {"id": "r1", "text": "I want to send this back", "label": "returns"},
        {"id": "r2", "text": "how do I return a jumper", "label": "returns"},
    ]
    source = tmp_path / "few.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = prep(tmp_path, recipe_for(tiny_model_dir, source))
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "task.min_examples_per_class=3" in message and "`returns` has 2" in message


def test_prep_is_logged_to_mlflow_with_fingerprint_and_dataset_inputs(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "good.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good_rows()))
    recipe = recipe_for(tiny_model_dir, source, name="prep-mlflow", fewshot=4)
    assert prep(tmp_path, recipe, tmp_path / "run").exit_code == 0
    record = json.loads((tmp_path / "run/manifest.json").read_text())["stages"]["prep"]
    client = MlflowClient(tracking_env)
    logged = client.get_run(record["mlflow_run_id"])
    assert logged.data.tags["expert.data_fingerprint"] == record["fingerprint"]
    assert logged.data.tags["expert.stage"] == "prep"
    stats = json.loads((tmp_path / "run/prep/stats.json").read_text())
    assert logged.data.metrics["rows.train"] == stats["rows"]["train"]
    assert logged.data.metrics["tokens.prompt.p95"] == stats["tokens"]["all"]["prompt"]["p95"]
    assert logged.data.params["data.max_tokens"] == "96"
    inputs = {d.tags[0].value: d.dataset for d in logged.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for split, dataset in inputs.items():  # each split is its own dataset: its file's hash, as the manifest has it
        assert dataset.name == f"prep-mlflow.{split}"
        assert dataset.digest == record["outputs"][f"prep/{split}.jsonl"][:12]
        assert json.loads(dataset.profile)["num_rows"] == stats["rows"][split]
    artifacts = {a.path for a in client.list_artifacts(record["mlflow_run_id"], "prep")}
    assert {"prep/report.md", "prep/stats.json", "prep/class_distribution.png", "prep/fewshot.json"} <= artifacts

    fewshot = json.loads((tmp_path / "run/prep/fewshot.json").read_text())["examples"]
    train_ids = {r["id"] for r in read_jsonl(tmp_path / "run/prep/train.jsonl")}
    assert len(fewshot) == 4 and {e["id"] for e in fewshot} <= train_ids
    assert {e["target"] for e in fewshot[:3]} == set(LABELS), "few-shot examples cover the classes round-robin"
    assert all(e["completion"] == e["target"] for e in fewshot)


def test_hf_sources_and_generation_targets(tiny_model_dir, tracking_env, tmp_path, monkeypatch):
    """`hf:<id>` goes through `datasets.load_dataset` (a local dataset folder here: no hub on this machine)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "replies"
    folder.mkdir()
    rows = [{"id": f"r{i}", "text": f"customer message {i}", "reply": f"Thanks, we fixed case {i}."} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:34]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[34:]))
    recipe = recipe_for(tiny_model_dir, Path("unused.jsonl"), fields={"id": "id", "text": "text", "target": "reply"})
    recipe["data"] |= {"source": f"hf:{folder}", "test_source": f"hf:{folder}", "split": {"validation": 0.1}}
    recipe["task"] = {"type": "generation", "instruction": "Reply to the customer."}
    recipe["eval"] = {"gate": {"metric": "exact_match"}}
    result = prep(tmp_path, recipe, tmp_path / "run")
    assert result.exit_code == 0, result.output
    test = read_jsonl(tmp_path / "run/prep/test.jsonl")
    assert [r["id"] for r in test] == [f"r{i}" for i in range(34, 40)]
    assert test[0]["completion"] == [{"role": "assistant", "content": "Thanks, we fixed case 34."}]
    spec = json.loads((tmp_path / "run/prep/spec.json").read_text())
    assert spec["task"] == "generation" and spec["system_prompt"] == "Reply to the customer."

    recipe["data"]["validation_source"] = f"hf:{folder}"
    result = prep(tmp_path, recipe, tmp_path / "missing-split")
    assert result.exit_code == 2
    assert "cannot load split `validation`" in " ".join(result.output.split())


def test_expert_prompt_is_the_instruction_and_baselines_get_the_labels(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "good.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good_rows()))
    recipe = recipe_for(tiny_model_dir, source)
    assert prep(tmp_path, recipe, tmp_path / "short").exit_code == 0
    spec = json.loads((tmp_path / "short/prep/spec.json").read_text())
    assert spec["system_prompt"] == "Route the message."
    assert all(label in spec["baseline_system_prompt"] for label in LABELS)
    train = read_jsonl(tmp_path / "short/prep/train.jsonl")
    assert {r["prompt"][0]["content"] for r in train} == {"Route the message."}

    recipe["task"]["spec_in_expert_prompt"] = True
    assert prep(tmp_path, recipe, tmp_path / "full").exit_code == 0
    spec = json.loads((tmp_path / "full/prep/spec.json").read_text())
    assert spec["system_prompt"] == spec["baseline_system_prompt"]
    assert read_jsonl(tmp_path / "full/prep/train.jsonl")[0]["prompt"][0]["content"] == spec["baseline_system_prompt"]


def test_a_test_split_mixed_unlike_train_is_reported(tiny_model_dir, tracking_env, tmp_path):
    """A fixed test source that is almost all one class: prep warns that what is chosen on the other splits may
    not hold on test, and stats.json/report.md carry the comparison."""
    source, test_source = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good_rows(90)))
    fixed = [{"id": f"t{i}", "text": f"test question number {i} about a refund", "label": "returns" if i else "billing"}
             for i in range(30)]
    test_source.write_text("".join(json.dumps(r) + "\n" for r in fixed))
    result = prep(tmp_path, recipe_for(tiny_model_dir, source, test_source=str(test_source)), tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "label mix: train vs test differ" in " ".join(result.output.split())
    mix = json.loads((tmp_path / "run/prep/stats.json").read_text())["label_mix"]
    assert mix["train_vs_test"]["p_value"] < 0.01 and mix["train_vs_test"]["tvd"] > 0.5
    assert mix["train_vs_test"]["moved"][0]["label"] == "returns"
    assert "(**differs**)" in (tmp_path / "run/prep/report.md").read_text()
