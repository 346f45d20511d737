"""Frontier logs as prep sources: chat fine-tuning JSONL and gateway request/response logs, each with planted
bad lines that must be rejected with their line and reason, and every good line kept with its provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.smoke.test_prep_stage import LABELS, good_rows, prep, read_jsonl

pytestmark = pytest.mark.smoke


def chat_line(text: str, answer: str, model: str = "gpt-4o-mini") -> dict:
    return {"model": model, "messages": [{"role": "system", "content": "You route tickets."},
                                         {"role": "user", "content": text}, {"role": "assistant", "content": answer}]}


def gateway_line(text: str, answer: str, model: str = "gpt-4o-2024-08-06") -> dict:
    return {"request": {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
            "response": {"model": model, "choices": [{"message": {"role": "assistant", "content": answer}}],
                         "usage": {"prompt_tokens": 31, "completion_tokens": 2}}}


# planted defects: (kind, expected reason)
BAD = {
    "no_answer": "no_answer",
    "unparsable_answer": "unparsable_answer",
    "bad_shape": "bad_log_shape",
    "not_json": "unparsable",
    "image": "non_text",
}


def write_log(path: Path, fmt: str) -> dict[int, str]:
    """60 good lines with BAD's defects planted at known lines; returns line -> expected reason."""
    make = chat_line if fmt == "chat" else gateway_line
    lines, planted = [], {}
    for i, row in enumerate(good_rows()):
        # the frontier answers with the label in its own case and punctuation; the label parser maps it as for a
        # frontier baseline
        lines.append(json.dumps(make(row["text"], f"`{row['label'].upper()}`.")))
        if i % 12 == 5:
            kind = list(BAD)[len(planted)]
            bad = make(f"bad line {i}", "billing")
            if kind == "no_answer":
                bad = {"messages": bad["messages"][:-1]} if fmt == "chat" else {**bad, "response": {"choices": []}}
            elif kind == "unparsable_answer":
                bad = make(f"bad line {i}", "I cannot help with that.")
            elif kind == "bad_shape":
                bad = {"prompt": "x", "completion": "billing"}
            elif kind == "image":
                msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                bad = ({"messages": [msg, {"role": "assistant", "content": "billing"}]} if fmt == "chat"
                       else {**bad, "request": {"messages": [msg]}})
            lines.append("{not json" if kind == "not_json" else json.dumps(bad))
            planted[len(lines)] = BAD[kind]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return planted


def log_recipe(tiny_model_dir: Path, source: Path, fmt: str, **data) -> dict:
    return {
        "name": f"logs-{fmt}",
        "task": {"type": "classification", "instruction": "Route the message.", "labels": LABELS},
        "data": {"source": str(source), "format": fmt, "max_tokens": 96, "max_rejected_fraction": 0.2, **data},
        "model": {"base": str(tiny_model_dir)},
        "registry": {"model_name": f"logs-{fmt}"},
    }


@pytest.mark.parametrize("fmt", ["chat", "gateway"])
def test_logs_become_examples_and_bad_lines_are_named(fmt, tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / f"{fmt}.jsonl"
    planted = write_log(source, fmt)
    run_dir = tmp_path / "run"
    result = prep(tmp_path, log_recipe(tiny_model_dir, source, fmt), run_dir)
    assert result.exit_code == 0, result.output
    rejected = {r["line"]: r["reason"] for r in read_jsonl(run_dir / "prep/rejected.jsonl")}
    assert rejected == planted
    rows = [r for s in ("train", "validation", "test") for r in read_jsonl(run_dir / f"prep/{s}.jsonl")]
    assert len(rows) == 60
    by_text = {r["text"]: r for r in rows}
    for row in good_rows():
        kept = by_text[row["text"]]  # the input is the user's message alone, not the system prompt
        assert kept["target"] == row["label"], "`BILLING`. parses to billing, as a frontier answer would"
    model = "gpt-4o-mini" if fmt == "chat" else "gpt-4o-2024-08-06"  # the answering model, from the response
    assert {r["provenance"] for r in rows} == {f"log:{model}"}
    if fmt == "gateway":  # the response's token counts are kept with the row
        assert all(r["usage"] == {"prompt_tokens": 31, "completion_tokens": 2} for r in rows)
    stats = json.loads((run_dir / "prep/stats.json").read_text())
    assert sum(stats["provenance"][s][f"log:{model}"] for s in ("train", "validation", "test")) == 60
    assert f"log:{model}" in (run_dir / "prep/report.md").read_text()


def test_the_whole_conversation_can_be_the_input(tiny_model_dir, tracking_env, tmp_path):
    source = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "You route tickets."}, {"role": "user", "content": "hello"},
             {"role": "assistant", "content": "How can I help?"}]
    rows = good_rows()
    lines = [{"messages": [*turns, {"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]}
             for r in rows]
    source.write_text("\n".join(map(json.dumps, lines)) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    result = prep(tmp_path, log_recipe(tiny_model_dir, source, "chat", input="conversation"), run_dir)
    assert result.exit_code == 0, result.output
    first = read_jsonl(run_dir / "prep/train.jsonl")[0]
    assert first["text"].startswith("user: hello\n\nassistant: How can I help?\n\nuser: message ")
    assert "You route tickets" not in first["text"], "the system prompt is the expert's own"
    assert first["provenance"] == "log:unknown", "a chat line without `model` says it does not know"


def test_log_recipes_need_the_labels_and_no_field_mapping(tiny_model_dir, tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text("", encoding="utf-8")
    recipe = log_recipe(tiny_model_dir, source, "chat")
    del recipe["task"]["labels"]
    result = prep(tmp_path, recipe)
    assert result.exit_code == 2 and "task -> labels" in result.output
    recipe = log_recipe(tiny_model_dir, source, "gateway", fields={"text": "a", "target": "b"})
    result = prep(tmp_path, recipe)
    assert result.exit_code == 2 and "remove `fields`" in result.output


def test_openai_batch_results_are_matched_to_their_requests_and_failures_reported(tiny_model_dir, tracking_env, tmp_path):
    requests, results = [], []
    rows = good_rows()
    for i, row in enumerate(rows):
        custom_id = f"req-{i}"
        requests.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": row["text"]}]}})
        body = {"model": "gpt-4o-mini-2024-07-18", "usage": {"prompt_tokens": 20, "completion_tokens": 1},
                "choices": [{"message": {"role": "assistant", "content": row["label"]}}]}
        results.append({"id": f"batch_req_{i}", "custom_id": custom_id,
                        "response": {"status_code": 200, "body": body}, "error": None})
    requests.append({"custom_id": "req-extra", "body": {"messages": [{"role": "user", "content": "never answered"}]}})
    requests.append({"custom_id": "req-0", "body": {"messages": []}})  # a repeated custom_id
    results.reverse()  # the Batch API returns results in any order
    results.insert(3, {"custom_id": "req-failed", "response": None, "error": {"code": "rate_limit", "message": "x"}})
    results.insert(7, {"custom_id": "req-ghost", "response": {"status_code": 200, "body": {
        "choices": [{"message": {"role": "assistant", "content": "billing"}}]}}})
    results.insert(9, {"custom_id": "req-500", "response": {"status_code": 500, "body": {}}, "error": None})
    (tmp_path / "input.jsonl").write_text("\n".join(map(json.dumps, requests)) + "\n", encoding="utf-8")
    (tmp_path / "output.jsonl").write_text("\n".join(map(json.dumps, results)) + "\n", encoding="utf-8")
    recipe = log_recipe(tiny_model_dir, tmp_path / "output.jsonl", "openai_batch",
                        batch_requests=str(tmp_path / "input.jsonl"))
    run_dir = tmp_path / "run"
    result = prep(tmp_path, recipe, run_dir)
    assert result.exit_code == 0, result.output
    rejected = {(r["source"], r["line"]): r["reason"] for r in read_jsonl(run_dir / "prep/rejected.jsonl")}
    assert rejected == {
        ("output.jsonl", 4): "batch_failed", ("output.jsonl", 8): "unmatched", ("output.jsonl", 10): "batch_failed",
        ("input.jsonl", 61): "no_result", ("input.jsonl", 62): "duplicate_id",
    }
    kept = [r for s in ("train", "validation", "test") for r in read_jsonl(run_dir / f"prep/{s}.jsonl")]
    by_text = {r["text"]: r["target"] for r in kept}
    assert by_text == {row["text"]: row["label"] for row in rows}, "each answer is matched to its own request"
    assert {r["provenance"] for r in kept} == {"log:gpt-4o-mini-2024-07-18"}


def test_mlflow_traces_of_an_app_become_examples(tiny_model_dir, tracking_env, tmp_path):
    """An LLM app traced into a real MLflow server: each trace's inputs and outputs are a logged call."""
    import mlflow

    mlflow.set_tracking_uri(tracking_env)
    mlflow.config.enable_async_logging(False)
    experiment = f"router-app-{tmp_path.name}"
    mlflow.set_experiment(experiment)
    rows = good_rows()
    for i, row in enumerate(rows):
        with mlflow.start_span(name="route") as span:
            span.set_inputs({"model": "gpt-4o", "messages": [{"role": "user", "content": row["text"]}]})
            if i == 10:  # an app that returns plain text is traced with a string output
                span.set_outputs(row["label"])
            elif i == 20:
                span.set_outputs({"choices": [{"message": {"role": "assistant", "content": "no idea"}}]})
            else:
                span.set_outputs({"model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 9, "completion_tokens": 1},
                                  "choices": [{"message": {"role": "assistant", "content": row["label"]}}]})
    mlflow.flush_trace_async_logging()
    run_dir = tmp_path / "run"
    recipe = log_recipe(tiny_model_dir, tmp_path / "unused.jsonl", "mlflow_traces")
    recipe["data"]["source"] = f"mlflow-traces:{experiment}"
    result = prep(tmp_path, recipe, run_dir)
    assert result.exit_code == 0, result.output
    (rejected,) = read_jsonl(run_dir / "prep/rejected.jsonl")
    assert rejected["reason"] == "unparsable_answer" and rejected["detail"].startswith("trace tr-")
    assert "'no idea'" in rejected["detail"]
    kept = {r["text"]: r for s in ("train", "validation", "test") for r in read_jsonl(run_dir / f"prep/{s}.jsonl")}
    assert len(kept) == 59 and all(kept[r["text"]]["target"] == r["label"] for r in rows if r["text"] in kept)
    assert kept[rows[10]["text"]]["provenance"] == "log:gpt-4o", "a text output: the model from the request"
    again = prep(tmp_path, recipe, run_dir)
    assert "up to date" in again.output, "unchanged traces: prep is skipped"
    with mlflow.start_span(name="route") as span:
        span.set_inputs({"messages": [{"role": "user", "content": "one more parcel question"}]})
        span.set_outputs("shipping")
    mlflow.flush_trace_async_logging()
    assert "up to date" not in prep(tmp_path, recipe, run_dir).output, "a new trace is new data"
