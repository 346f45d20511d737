"""Baseline kinds: each `kind:` of `eval.baselines` is one module here, registered in `KINDS`, implementing
`BaselineKind`. Eval asks a kind how its baseline answers the splits, what that costs, what extra inputs make
eval stale; routing asks it for latency and for the source of its confidence; serving and `expert predict` ask
whether it can be asked live as a tier. Nothing outside this package branches on `baseline.kind`.

Why a package of its own (and not inside `baselines.py`): a kind is then one file a contributor adds and one
line here, like a task type in `pipeline/tasks/`; `baselines.py` keeps what all kinds share (the context, the
baseline prompt, recorded-answer parsing). The kind's recipe keys stay in `pipeline/recipe/schema.py` (its section
class, `SECTION` here), because the recipe is one typed model whose keys are documented from there and checked
before anything runs. How to add a kind: `docs/guides/adding-a-baseline-kind.md`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pipeline.baseline_kinds import base_model, expert, openai, predictions

if TYPE_CHECKING:
    from pipeline.evaluation.baselines import BaselineContext, BaselineResult, Rows
    from pipeline.recipe.schema import BaselineSection, Recipe


@runtime_checkable
class BaselineKind(Protocol):
    """What a baseline kind module provides (module-level names)."""

    KIND: str  # the `kind:` value in the recipe
    SECTION: type  # its recipe section class in pipeline/recipe/schema.py (its keys, checked at validation)
    # whether it is frontier-kind (a hosted model's answers, live or recorded): a decision reached without any
    # such baseline says so, since beating only local baselines is no evidence against the frontier
    FRONTIER: bool

    def load(self, baseline: BaselineSection, splits: dict[str, Rows], task: Any, spec: Any) -> Any:
        """What the kind reads before any model loads or any call is paid for (so bad inputs fail first), handed
        back to `answer` as `ctx.loaded[baseline.name]`; None when it reads nothing."""

    def answer(self, baseline: BaselineSection, splits: dict[str, Rows], ctx: BaselineContext) -> BaselineResult:
        """The baseline's rows (`prediction`, `latency_s`, optional `confidence`, token counts, `error`) per split,
        in split order, or why it was skipped."""

    def cost_per_1k(self, baseline: BaselineSection, test_rows: Rows, recipe: Recipe) -> float | None:
        """Dollars per 1,000 requests from its test rows (token prices, or machine time); None when unknown."""

    def latency_s(self, rows: Rows) -> list[float]:
        """Seconds each request took (0 where not measured or recorded): what a route's latency adds up."""

    def confidence_source(self, baseline: BaselineSection) -> str | None:
        """Where its confidence for routing comes from, in words (log-probabilities, k samples, the answer
        probability, a recorded number); None when its answers carry none (it can only be a route's last tier)."""

    def staleness_inputs(self, baseline: BaselineSection, run_path: Path) -> dict[str, str]:
        """Files it reads beyond the run's own, by name -> content hash: when one changes, eval is stale."""


KINDS: dict[str, ModuleType] = {m.KIND: m for m in (openai, base_model, predictions, expert)}


def of(baseline: BaselineSection) -> BaselineKind:
    """The kind module of a baseline (the recipe has checked its `kind` against the registered ones)."""
    return KINDS[baseline.kind]
