"""Eval's per-example results as MLflow traces of the eval run: what the UI's evaluation view (the run's
"Traces" tab) lists, filters and sorts.

One trace per test example: the request is the input text, the response every system's answer; assessments are
the gold target (an expectation) and, per system, whether it was right, the expert's confidence, and
`disagreement` (the expert and some baseline differ in being right), so a reviewer filters to the examples a
decision turns on, or sorts by the expert's confidence.

Why not `mlflow.start_span` and `mlflow.log_feedback`: that path writes each trace and each assessment
separately, several writes per example (docs/BENCHMARKS.md, "Eval's MLflow logging", has the times). The traces
are built as MLflow entities instead, their assessments inside the trace info, and written with one `start_trace`
call per example plus one batched `log_spans` call, through MLflow's tracing client.
"""

from __future__ import annotations

import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SOURCE_ID = "expert-eval"
TRACE_NAME = "eval example"
# the UI's traces filter (URL-encoded `ASSESSMENT::=::true::disagreement`): examples the decision turns on
DISAGREEMENT_FILTER = "ASSESSMENT%3A%3A%3D%3A%3Atrue%3A%3Adisagreement"
HTTP_WORKERS = 4  # concurrent start_trace requests against a tracking server (a local SQLite file takes one)


def disagreement(correct: dict[str, bool]) -> bool:
    """Whether the expert's rightness differs from any other system's on this example."""
    return any(right != correct["expert"] for name, right in correct.items() if name != "expert")


def example_assessments(gold: Any, answers: dict[str, Any], confidence: float | None, trace_id: str) -> list:
    from mlflow.entities import AssessmentSource, Expectation, Feedback

    source = AssessmentSource(source_type="CODE", source_id=SOURCE_ID)
    correct = {name: answer == gold for name, answer in answers.items()}
    out = [Expectation(name="target", value=gold, source=source, trace_id=trace_id)]
    out += [Feedback(name=f"{name}_correct", value=right, source=source, trace_id=trace_id)
            for name, right in correct.items()]
    if confidence is not None:
        out.append(Feedback(name="expert_confidence", value=round(float(confidence), 6), source=source,
                            trace_id=trace_id))
    if len(correct) > 1:
        out.append(Feedback(name="disagreement", value=disagreement(correct), source=source, trace_id=trace_id))
    return out


def example_trace(experiment_id: str, run_id: str, example: dict[str, Any], answers: dict[str, Any],
                  confidence: float | None, request_ms: int):
    """(TraceInfo, root Span) of one example."""
    from mlflow.entities import Span, TraceInfo, TraceLocation, TraceState

    trace_hex = os.urandom(16).hex()
    trace_id = f"tr-{trace_hex}"
    request = json.dumps({"text": example["text"]}, ensure_ascii=False)
    response = json.dumps(answers, ensure_ascii=False)
    start_ns = request_ms * 1_000_000
    span = Span.from_dict({
        "trace_id": base64.b64encode(bytes.fromhex(trace_hex)).decode(),
        "span_id": base64.b64encode(os.urandom(8)).decode(), "parent_span_id": None, "name": TRACE_NAME,
        "start_time_unix_nano": start_ns, "end_time_unix_nano": start_ns, "events": [], "links": [],
        "status": {"code": "STATUS_CODE_OK", "message": ""},
        "attributes": {"mlflow.traceRequestId": json.dumps(trace_id), "mlflow.spanType": json.dumps("UNKNOWN"),
                       "mlflow.spanInputs": request, "mlflow.spanOutputs": response},
    })
    info = TraceInfo(
        trace_id=trace_id, trace_location=TraceLocation.from_experiment_id(experiment_id), request_time=request_ms,
        state=TraceState.OK, execution_duration=0, request_preview=request[:1000], response_preview=response[:1000],
        trace_metadata={"mlflow.sourceRun": run_id, "mlflow.traceInputs": request, "mlflow.traceOutputs": response,
                        "mlflow.trace_schema.version": "3", "expert.example_id": str(example["id"])},
        tags={"mlflow.traceName": TRACE_NAME, "mlflow.trace.spansLocation": "TRACKING_STORE"},
        assessments=example_assessments(example["target"], answers, confidence, trace_id))
    return info, span


def log_examples(tracking_uri: str, experiment_id: str, run_id: str, examples: list[dict[str, Any]],
                 outputs: dict[str, list[dict[str, Any]]]) -> int:
    """One trace per example (`outputs`: system -> rows in example order, `prediction` and the expert's
    `confidence`); returns how many were logged. Request times count down from now, so the UI (newest first) lists
    the examples in split order."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient(tracking_uri)
    now_ms = int(time.time() * 1000)
    traces = [
        example_trace(experiment_id, run_id, example, {name: rows[i]["prediction"] for name, rows in outputs.items()},
                      outputs["expert"][i].get("confidence"), now_ms - i)
        for i, example in enumerate(examples)
    ]
    workers = HTTP_WORKERS if tracking_uri.startswith(("http://", "https://")) else 1
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(client.start_trace, [info for info, _ in traces]))
    client.log_spans(experiment_id, [span for _, span in traces])
    return len(traces)
