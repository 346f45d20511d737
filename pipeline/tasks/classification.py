"""Classification: the answer is exactly one label from a fixed set.

An answer counts as a label only when it is nothing but that label (`parse_answer`); a sentence that mentions
one is unparsable, wherever the answer comes from (the expert, a baseline, a routing tier, the teacher, a log).

Labels are normalised by one rule, applied everywhere (recipe labels and data
alike): Unicode NFC, surrounding whitespace stripped, integers written as
text; then compared exactly (case and inner spaces count).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from pipeline.tasks.metrics import (
    GateMetric,
    LabelCodeMacroF1,
    MeanMetric,
    accuracy,
    exact,
    f1_report,
)
from pipeline.tasks.metrics import gate_metric as gate_metric_of

inference = "label_scoring"
gate_metrics = ("accuracy", "macro_f1")
target_rejection = "label_outside_set"
label_set = True
_GATE_METRICS = {"accuracy": MeanMetric("accuracy", exact), "macro_f1": LabelCodeMacroF1()}


def check_section(section) -> None:
    """`labels`, when given, are at least two distinct non-empty labels after normalisation; no `schema`."""
    if section.json_schema is not None:
        raise ValueError("`schema` applies to extraction tasks only; remove it")
    check_labels(section.labels)


def check_labels(labels: list[str] | None) -> None:
    if labels is None:
        return
    if len(labels) < 2:
        raise ValueError("`labels` needs at least two labels")
    normalized = [normalize_label(label) for label in labels]
    if any(not label for label in normalized):
        raise ValueError("`labels` has an empty label")
    if len(set(normalized)) != len(normalized):
        raise ValueError("`labels` has duplicates (after normalisation: stripped, Unicode NFC)")


def check_data(section, data) -> None:
    """Logged answers are parsed against the label list, so log formats need it; a label is one field."""
    if data.format != "table":
        if not section.labels:
            raise ValueError("task -> labels: logged answers are parsed against the label list; list the labels")
    elif isinstance(data.fields.target, dict):
        raise ValueError("data -> fields -> target: a mapping builds a JSON object and applies to extraction only; "
                         "name one field")


def spec_of(section, targets: list[str]) -> list[str]:
    """The label set: the recipe's (normalised), else the data's sorted labels."""
    if section.labels:
        return [normalize_label(label) for label in section.labels]
    return sorted(set(targets))


def labels_of(label: str) -> list[str]:
    return [label]


def stratum(label: str) -> str:
    return label


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


def decoding_schema(spec: list[str]) -> None:
    return None  # label scoring answers with a label by construction


def frontier_schema(spec: list[str]) -> None:
    return None


def answer_confidence(token_logprobs: list[float]) -> float:
    raise NotImplementedError("classification answers by label scoring: the label's probability over the set")


def max_answer_tokens(spec: list[str]) -> int:
    """The longest label's tokens, with room to spare (about four characters a token)."""
    return max(len(label) for label in spec) // 4 + 2


def metrics(golds: list[str], preds: list[str | None], spec: list[str]) -> dict[str, Any]:
    report = f1_report(golds, preds, spec)
    return {
        "accuracy": accuracy(golds, preds),
        "macro_f1": report["macro_f1"],
        "per_class": report["per_class"],
        "unparsed": sum(p is None for p in preds),
    }


def gate_metric(name: str) -> GateMetric:
    return gate_metric_of(_GATE_METRICS, name)


def write_plots(folder: Path, golds: list[str], predictions: dict[str, list[str | None]], spec: list[str]) -> None:
    from pipeline.evaluation import plots

    for name, preds in predictions.items():
        plots.confusion_matrix(folder / f"confusion_{name}.png", golds, preds, spec, f"{name}: confusion matrix (test)")


def report_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    return ["", "## Confusion matrices", ""] + [f"![{n}](plots/confusion_{n}.png)" for n in metrics]
