"""What one stage hands the next: typed records of its decisions, and which recipe keys it read.

A stage decides things that depend on the machine it ran on (the base's revision, precision, attention
kernel). It writes them to `<stage>/record.json`; later stages and the registered model read that record
instead of deciding again elsewhere, so eval and serving load the base exactly as training did.

Each stage also names the recipe keys it reads (`RECIPE_KEYS` in its module). The manifest keeps a hash of
each leaf value under those keys, so a later command can say which keys changed since a stage ran, and refuse
to build on it (exit 2) rather than mix two recipes in one run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import UserError
from pipeline.files import atomic_write_text
from pipeline.recipe.keys import changed_keys, keys_hash, recipe_keys
from pipeline.recipe.schema import Recipe
from pipeline.run.rundir import STAGES, RunDir

RECORD = "record.json"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseRecord(Record):
    """Which base weights an adapter was trained on: enough to load the same bytes again, or to refuse."""

    kind: Literal["builtin", "local", "hub"]
    name: str  # `model.base` as the recipe wrote it
    location: str  # the builtin's GGUF file name, the local directory, or the hub id
    revision: str | None  # hub: the commit the weights came from; builtin: the shipping package's version
    content_hash: str  # sha256 over the weight files (builtin: of the GGUF file)


class PrepRecord(Record):
    """The base prep resolved (and measured the data with its tokenizer): training loads these weights, never
    `model.base` resolved again (a hub push between the stages would change them)."""

    base: BaseRecord


class TrainRecord(Record):
    base: BaseRecord
    precision: Literal["fp32", "bf16", "fp16"]
    attention: str
    attention_reason: str = ""  # why that kernel (records before it: not said)
    padding_free: bool
    padding_free_reason: str
    lm_head: str = "every position"  # which positions the loss's LM head scored (records before it: every one)
    launch: str
    processes: int
    adapter_hash: str  # tree hash of train/adapter


class Runtime(Record):
    """How the expert ran when it answered (`pipeline/inference/runtime.py` prepares it): what decides the numbers
    (`adapter`), and the bit-identical speed-ups that were installed, as their notes."""

    adapter: Literal["merged", "separate"]
    speedups: list[str] = []


# versions evaluated before eval recorded its runtime ran the adapter separate
BEFORE_RECORDED = Runtime(adapter="separate")


class EvalRecord(Record):
    """What eval loaded to produce its numbers: the registered version carries it, and serving matches it."""

    base: BaseRecord
    precision: Literal["fp32", "bf16", "fp16"]
    adapter_hash: str
    device: str
    runtime: Runtime = BEFORE_RECORDED  # how the expert ran (adapter merged or not, speed-ups); serving matches it


def evaluated_runtime(path: Path) -> Runtime | None:
    """The runtime an eval record (`eval/record.json`, a version's `eval_record.json`) says the expert ran on; None
    where there is no record."""
    return read_record(path, EvalRecord).runtime if path.is_file() else None


def read_record(path: Path, model: type[Record]) -> Any:
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; redo the stage that writes it (`expert run --force "
                        f"{path.parent.name}`)") from None
    except ValidationError as err:
        raise UserError(f"{path}: not a {model.__name__} ({err.error_count()} problem(s): "
                        f"{err.errors()[0]['msg']}); redo the stage that writes it") from None


def write_record(path: Path, record: Record) -> None:
    atomic_write_text(path, record.model_dump_json(indent=2) + "\n")


# -- which recipe keys a stage read ------------------------------------------------------------------------------


def stale_upstream(run: RunDir, stage: str, recipe: Recipe) -> dict[str, list[str]]:
    """For each completed stage before `stage`: the recipe keys it read that have changed since it ran."""
    stale: dict[str, list[str]] = {}
    for earlier in STAGES[: STAGES.index(stage)]:
        rec = run.stage_record(earlier)
        if rec.get("status") == "complete" and "reads" in rec:
            changed = changed_keys(rec["recipe_keys"], recipe_keys(recipe, tuple(rec["reads"])))
            if changed:
                stale[earlier] = changed
    return stale


def why_stale(run: RunDir, stage: str, recipe: Recipe, inputs: Callable[[], dict[str, str]],
              options: StageOptions) -> str | None:
    """Why `stage` runs (None: it is up to date): the one rule, for the stage itself and for `expert run --dry-run`.
    It runs when asked to (`--force`), when it has not completed (a stage that runs makes every later one stale:
    `RunDir.start_stage`), when a recipe key it read changed, or when its declared inputs (`inputs_of` in its
    module; asked for last, as they read upstream outputs) or outputs changed since it ran."""
    forced = [s for s in STAGES[: STAGES.index(stage) + 1] if s in options.redo]
    if forced:  # `--force STAGE` redoes it and what depends on it, even where its outputs came out the same
        return "--force" if forced[-1] == stage else f"--force {forced[-1]}"
    rec = run.stage_record(stage)
    if rec.get("status") != "complete":
        return "not run yet" if not rec else f"its status is {rec['status']}"
    if "reads" in rec:
        changed = changed_keys(rec["recipe_keys"], recipe_keys(recipe, tuple(rec["reads"])))
        if changed:
            return f"recipe keys changed: {', '.join(changed)}"
    return run.why_stale(stage, inputs())


def recipe_inputs(run: RunDir, stage: str, recipe: Recipe, reads: tuple[str, ...]) -> dict[str, str]:
    """The recipe part of a stage's input hashes: the keys it reads. Refuses (exit 2, naming the keys) when the
    recipe changed under an earlier stage this one builds on: its outputs would mix two recipes."""
    stale = stale_upstream(run, stage, recipe)
    if stale:
        first = next(iter(stale))
        listed = "; ".join(f"{s}: {', '.join(keys)}" for s, keys in stale.items())
        raise UserError(
            f"{run.path}: the recipe changed since earlier stages ran ({listed}); `expert {stage}` would build on "
            f"outputs made with the old values. Redo them with `expert run RECIPE --run-dir {run.path}` (it "
            f"redoes {first} and what follows), start a new run with `expert run RECIPE --new`, or put the old "
            "values back"
        )
    return reads_entry(recipe, reads)


def reads_entry(recipe: Recipe, reads: tuple[str, ...]) -> dict[str, str]:
    """The input-hash entry of the recipe keys a stage reads."""
    return {"recipe:" + (",".join(reads) or "*"): keys_hash(recipe_keys(recipe, reads))}


@dataclass(frozen=True)
class PushOptions:
    force: bool = False  # move @champion regardless of the gate
    reason: str | None = None  # why force was needed (a version tag)
    dry_run: bool = False  # say what would happen; register nothing
    include_base: bool = False  # copy the base weights into the version


@dataclass(frozen=True)
class StageOptions:
    """What one invocation asks of the stages. Every stage takes the same options and reads what concerns it."""

    redo: frozenset[str] = frozenset()  # stages to run again even when up to date
    resume: bool | None = True  # train: continue an interrupted training (True), start over (False), or ask (None)
    push: PushOptions = PushOptions()

    def __post_init__(self) -> None:
        if self.push.force:  # forcing the promotion registers a new version: push runs, up to date or not
            object.__setattr__(self, "redo", self.redo | {"push"})
