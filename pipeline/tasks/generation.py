"""Generation: the answer is free text (a rewrite, a summary, a reply).

The target is the answer text with surrounding whitespace stripped; there is
no label set or schema, so the spec is None and only exact match is scored.
"""

from __future__ import annotations

from typing import Any

from pipeline.tasks.metrics import mean


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


def metrics(golds: list[str], preds: list[str | None], spec: None) -> dict[str, Any]:
    return {
        "exact_match": mean([p is not None and p.strip() == g for g, p in zip(golds, preds)]),
        "unparsed": sum(p is None for p in preds),
    }
