"""What each task type means: the `TaskType` protocol, one module per type, and `for_type`.

A task type is one module in this package that implements every member of `TaskType`; the stages, eval, routing
and serving ask `for_type(recipe.task.type)` for it and call the protocol, so nothing outside this package
branches on `task.type`. docs/guides/adding-a-task-type.md says how to add one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pipeline.tasks import classification, extraction, generation, multilabel
from pipeline.tasks.metrics import GateMetric

# how the expert answers: scoring every label as a continuation (always a label, confidence over the label set);
# decoding under a JSON Schema (`decoding_schema`) when `eval.constrained_decoding` is on; free greedy decoding
Inference = Literal["label_scoring", "constrained_json", "generation"]


@runtime_checkable
class TaskType(Protocol):
    """One task type. `spec` is what the task's answers are checked against (a label list, a JSON Schema, None),
    made once by `spec_of` in prep and written to `prep/spec.json`; a target is what `normalize_target` returns.
    A `section` is the recipe's `task` section and `data` its `data` section (not imported here: the recipe
    imports the tasks to validate itself)."""

    inference: Inference
    gate_metrics: tuple[str, ...]  # the metrics eval.gate.metric and eval.cascade.target_metric may name
    target_rejection: str  # the reason code of a row whose target `check_target` refuses
    label_set: bool  # the spec is a label list and targets are made of its labels (class counts, plots, label mix)

    # recipe validation (pydantic validators call these; raise ValueError naming the key)
    def check_section(self, section: Any) -> None: ...
    def check_data(self, section: Any, data: Any) -> None: ...

    # data: targets, the spec, the split
    def normalize_target(self, raw: Any) -> Any: ...
    def spec_of(self, section: Any, targets: list[Any]) -> Any: ...
    def check_target(self, target: Any, spec: Any) -> str | None: ...
    def labels_of(self, target: Any) -> list[str]: ...
    def stratum(self, target: Any) -> str: ...

    # prompts and answers
    def system_prompt(self, instruction: str, spec: Any) -> str: ...
    def target_text(self, target: Any, spec: Any = None) -> str: ...
    def parse_answer(self, text: str, spec: Any) -> Any | None: ...
    def decoding_schema(self, spec: Any) -> dict[str, Any] | None: ...
    def frontier_schema(self, spec: Any) -> dict[str, Any] | None: ...
    def answer_confidence(self, token_logprobs: list[float]) -> float: ...
    def max_answer_tokens(self, spec: Any) -> int | None: ...

    # measuring and reporting
    def metrics(self, golds: list[Any], preds: list[Any], spec: Any) -> dict[str, Any]: ...
    def gate_metric(self, name: str) -> GateMetric: ...
    def write_plots(self, folder: Path, golds: list[Any], predictions: dict[str, list[Any]], spec: Any) -> None: ...
    def report_lines(self, metrics: dict[str, dict[str, Any]]) -> list[str]: ...


TASK_TYPES: dict[str, TaskType] = {
    "classification": classification,
    "extraction": extraction,
    "generation": generation,
    "multilabel": multilabel,
}


def for_type(task_type: str) -> TaskType:
    return TASK_TYPES[task_type]
