"""Typed readers of the JSON documents later commands read: prep's `spec.json`, eval's `metrics.json` and
`verdict.json` (in a run directory, or their copies in a registered version's bundle).

Why a module of its own beside `contracts.py`: those records are written from the models (extra keys forbidden);
these documents are written by their stage as plain JSON and read by many (push, compare, audit, `expert run`'s
summary, the registered model), including versions registered by older code. So the models here allow keys they
do not name, and every key added after the first release has the default an older file implies (a verdict
before routing has no `route`; a spec before the baseline prompt had one prompt for both). A file that does not
parse, or lacks a key every release wrote, is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.errors import UserError


class Document(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class SpecDocument(Document):
    """prep/spec.json: the label set, JSON Schema or None (generation), and the two system prompts."""

    task: str | None = None
    spec: Any
    system_prompt: str
    baseline_system_prompt: str = ""  # the frontier's prompt; versions pushed before it had one prompt for both

    @model_validator(mode="after")
    def _one_prompt_before(self) -> SpecDocument:
        if not self.baseline_system_prompt:
            object.__setattr__(self, "baseline_system_prompt", self.system_prompt)
        return self


class MetricsDocument(Document):
    """eval/metrics.json: per-system metrics (the task's, cost, latency, failures), the skipped baselines, the
    expert's paired comparisons with each baseline and its calibration."""

    systems: dict[str, dict[str, Any]]
    skipped: dict[str, str] = {}
    test_examples: int
    comparisons: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None


class TriageChoice(Document):
    """The triage a route keeps: the router (eval/triage/<router>/) and its cut-offs, one per tier above the
    expert (a request starts at the highest tier whose cut-off its score reaches)."""

    router: Literal["text", "probe"]
    cutoffs: list[float]
    before_expert: bool


class RouteChoice(Document):
    """The route a verdict carries (`evidence.gate_verdict`): the chain and its thresholds, chosen on validation,
    and its triage when one was kept."""

    chain: list[str]
    thresholds: list[float]
    target: float
    target_metric: str
    holds_on_test: bool
    triage: TriageChoice | None = None


class VerdictDocument(Document):
    """eval/verdict.json: the gate, the decision and why (`evidence.gate_verdict` writes it)."""

    passed: bool
    decision: str | None = None  # before eval decided replace/route/cascade/keep_frontier there was only the gate
    metric: str
    expert: float
    best_baseline: str | None = None
    best_baseline_value: float | None = None
    max_drop_vs_best_baseline: float | None = None
    min_value: float | None = None
    difference_vs_best_baseline: dict[str, Any] | None = None
    threshold: float | None = None  # the cascade's threshold, when there is one
    route: RouteChoice | None = None
    skipped_baselines: dict[str, str] = {}
    incomplete_baselines: dict[str, dict[str, int]] = {}
    failed_rows: dict[str, int] = {}  # by every system that ran, the expert included
    reasons: list[str] = []
    # the frontier-kind baselines compared (live, recorded stand-ins or recorded predictions; `baseline_kinds`
    # FRONTIER); None in a verdict written before eval recorded them
    frontier_baselines: list[str] | None = None

    def no_frontier_note(self) -> str | None:
        """What the decision was compared with when no frontier-kind baseline ran (None when one did, or when the
        verdict predates the record): a `replace` that beat only the untuned base model says nothing about the
        frontier, so every place that shows the decision says so."""
        if self.frontier_baselines is None or self.frontier_baselines:
            return None
        others = [f"`{name}`" for name in self.failed_rows if name != "expert"]
        compared = f"compared with {', '.join(others)} only" if others else "compared with no baseline"
        return f"{compared}: no frontier baseline ran"

    def decision_text(self) -> str:
        """The decision word, with `no_frontier_note` in brackets when there is one."""
        note = self.no_frontier_note()
        return (self.decision or "?") + (f" ({note})" if note else "")


def read_document(path: Path, model: type[Document], fix: str = "redo the stage that writes it") -> Any:
    """`path` read as `model`; a missing or malformed file is an error naming it and what to do."""
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {fix}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UserError(f"{path}: not a {path.name} ({err.error_count()} problem(s), first at `{where}`: "
                        f"{first['msg']}); {fix}") from None


def read_spec(path: Path) -> SpecDocument:
    return read_document(path, SpecDocument, "redo prep (`expert run --force prep`)")


def read_metrics(path: Path) -> MetricsDocument:
    return read_document(path, MetricsDocument, "redo eval (`expert eval`)")


def read_verdict(path: Path) -> VerdictDocument:
    return read_document(path, VerdictDocument, "redo eval (`expert eval`)")
