"""Generation: the answer is free text (a rewrite, a summary, a reply).

The target is the answer text with surrounding whitespace stripped; there is
no label set or schema, so the spec is None and only exact match is scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.tasks.metrics import GateMetric, MeanMetric, exact, mean
from pipeline.tasks.metrics import gate_metric as gate_metric_of
from pipeline.tasks.shared import check_no_class_minimum, mean_token_probability

inference = "generation"
gate_metrics = ("exact_match",)
target_rejection = "target_invalid"  # never used: every non-empty text is a target
label_set = False


def check_section(section) -> None:
    """A free-text target: no `labels`, no `schema`, no `min_examples_per_class`."""
    check_no_class_minimum(section)
    if section.labels is not None or section.json_schema is not None:
        raise ValueError("generation tasks take a free-text target: remove `labels` and `schema`")


def check_data(section, data) -> None:
    if data.format == "table" and isinstance(data.fields.target, dict):
        raise ValueError("data -> fields -> target: a mapping builds a JSON object and applies to extraction only; "
                         "name one field")


def spec_of(section, targets: list[str]) -> None:
    return None


def labels_of(text: str) -> list[str]:
    return []


def stratum(text: str) -> str:
    return ""


def normalize_target(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"target must be text, got {type(raw).__name__}")
    text = raw.strip()
    if not text:
        raise ValueError("target is empty")
    return text


def check_target(text: str, spec: None) -> str | None:
    return None


def target_text(text: str, spec: None = None) -> str:
    return text


def system_prompt(instruction: str, spec: None) -> str:
    return instruction


def parse_answer(text: str, spec: None) -> str | None:
    return text.strip()


def decoding_schema(spec: None) -> None:
    return None


def frontier_schema(spec: None) -> None:
    return None


def answer_confidence(token_logprobs: list[float]) -> float:
    return mean_token_probability(token_logprobs)


def max_answer_tokens(spec: None) -> None:
    return None  # free text: the teacher's max_new_tokens


def metrics(golds: list[str], preds: list[str | None], spec: None) -> dict[str, Any]:
    return {
        "exact_match": mean([p is not None and p.strip() == g for g, p in zip(golds, preds)]),
        "unparsed": sum(p is None for p in preds),
    }


_GATE_METRICS = {"exact_match": MeanMetric("exact_match", exact)}


def gate_metric(name: str) -> GateMetric:
    return gate_metric_of(_GATE_METRICS, name)


def write_plots(folder: Path, golds: list[str], predictions: dict[str, list[str | None]], spec: None) -> None:
    return None


def report_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    return []
