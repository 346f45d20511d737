"""Classification: the answer is exactly one label from a fixed set.

An answer counts as a label only when it is nothing but that label (`parse_answer`); a sentence that mentions
one is unparsable, wherever the answer comes from (the expert, a baseline, a routing tier, the teacher, a log).

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


# what may surround a label in an answer that is still only that label: quotes or backticks, a final period
_WRAPPERS = "\"'`\u201c\u201d\u2018\u2019"


def parse_answer(text: str, spec: list[str]) -> str | None:
    """The label an answer is, or None when it is not exactly one label.

    The answer, stripped of surrounding whitespace, quotes or backticks and one final period, must equal a label
    (Unicode NFC), exactly or else ignoring case when only one label matches that way. Anything more is not a
    label: "Technically, this is a shipping issue" and "Not billing. It is returns." are unparsable (None),
    never the label they mention, since a label found inside a sentence is as often denied as meant.
    """
    answer = unicodedata.normalize("NFC", text).strip().strip(_WRAPPERS).strip()
    candidates = dict.fromkeys([answer, answer.removesuffix(".").rstrip().strip(_WRAPPERS).strip()])
    for candidate in candidates:
        if candidate in spec:
            return candidate
    for candidate in candidates:
        matches = [label for label in spec if label.casefold() == candidate.casefold()]
        if len(matches) == 1:
            return matches[0]
    return None


def metrics(golds: list[str], preds: list[str | None], spec: list[str]) -> dict[str, Any]:
    report = f1_report(golds, preds, spec)
    return {
        "accuracy": accuracy(golds, preds),
        "macro_f1": report["macro_f1"],
        "per_class": report["per_class"],
        "unparsed": sum(p is None for p in preds),
    }
