"""Classification: the answer is exactly one label from a fixed set.

Labels are normalised by one rule, applied everywhere (recipe labels and data
alike): Unicode NFC, surrounding whitespace stripped, integers written as
text; then compared exactly (case and inner spaces count).
"""

from __future__ import annotations

import unicodedata
from typing import Any

from pipeline.tasks.metrics import accuracy, f1_report


def normalize_label(label: str) -> str:
    return unicodedata.normalize("NFC", label).strip()


def normalize_target(raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(f"label must be a string, got {type(raw).__name__}")
    label = normalize_label(str(raw))
    if not label:
        raise ValueError("label is empty")
    return label


def check_target(label: str, spec: list[str]) -> str | None:
    """Why a label is unacceptable, or None when it is fine."""
    if label not in spec:
        return f"label `{label}` is not in the label set"
    return None


def target_text(label: str, spec: list[str] | None = None) -> str:
    return label


def system_prompt(instruction: str, spec: list[str]) -> str:
    return f"{instruction}\nAnswer with exactly one of these labels and nothing else: {', '.join(spec)}."


def parse_answer(text: str, spec: list[str]) -> str | None:
    """Map a free-text answer to a label: exact, then case-insensitive, then the longest label inside the text."""
    answer = text.strip().strip(".\"'` ")
    if answer in spec:
        return answer
    by_lower = {label.lower(): label for label in spec}
    if answer.lower() in by_lower:
        return by_lower[answer.lower()]
    lowered = text.lower()
    for label in sorted(spec, key=len, reverse=True):
        if label.lower() in lowered:
            return label
    return None


def metrics(golds: list[str], preds: list[str | None], spec: list[str]) -> dict[str, Any]:
    report = f1_report(golds, preds, spec)
    return {
        "accuracy": accuracy(golds, preds),
        "macro_f1": report["macro_f1"],
        "per_class": report["per_class"],
        "unparsed": sum(p is None for p in preds),
    }
