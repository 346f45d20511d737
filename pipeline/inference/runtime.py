"""How the expert's model runs when it answers, prepared in one place: eval measures it, serving serves it.

A loaded expert answers faster on a CPU after three changes: the LoRA adapter merged into the base weights (two
fewer small products per layer), the lean Llama forward pass for label scoring, and bf16 weights packed for
oneDNN (`pipeline/inference/speedups.py`). The last two are kept only when a probe shows them bit-identical; merging is
not bit-identical (in bf16 the merged weight rounds W + BA once, where the separate adapter adds two products).
So what eval reports is the served model's only if eval runs the same runtime: eval prepares the expert here
and records the runtime in `eval/record.json`; push puts that record in the version; `expert serve` and
`expert predict` prepare the runtime the version was evaluated with, and serving refuses another one (asking
for `--no-merge` on a version evaluated merged, or `--merge` on one evaluated separate) unless it is told to
(`--allow-unevaluated-runtime`).
"""

from __future__ import annotations

from typing import Any

from pipeline import tasks
from pipeline.errors import UserError
from pipeline.inference import speedups
from pipeline.recipe.schema import Recipe
from pipeline.run.contracts import Runtime

MERGED = "merged"
SEPARATE = "separate"


def can_merge(model, recipe: Recipe) -> bool:
    """A full-precision base with a PEFT adapter on it; a quantized base cannot take merged weights."""
    return recipe.model.quantization == "none" and hasattr(model, "merge_and_unload")


def adapter_for(model, recipe: Recipe, merge: bool | None, evaluated: Runtime | None,
                allow_unevaluated: bool = False) -> str:
    """Merged or separate: as asked (`merge`), else as evaluated, else merged where it can be. Refuses, unless
    allowed, an adapter other than the one the version was evaluated with."""
    if merge is None:
        merge = evaluated.adapter == MERGED if evaluated is not None else True
    adapter = MERGED if merge and can_merge(model, recipe) else SEPARATE
    if evaluated is not None and adapter != evaluated.adapter and not allow_unevaluated:
        asked = "--merge" if merge else "--no-merge"
        raise UserError(
            f"this version was evaluated with its adapter {evaluated.adapter}; {asked} would run it {adapter}, "
            f"whose answers and confidences differ from the evaluated ones in the last digits. Drop {asked} to "
            "serve what was evaluated, or pass --allow-unevaluated-runtime to serve it anyway")
    return adapter


def prepare(model, recipe: Recipe, adapter: str | None = None, lean: bool = True,
            pack: bool = True) -> tuple[Any, Runtime]:
    """The model made ready to answer with `adapter` (`adapter_for`; default: merged where it can be, as eval runs
    it) and the speed-ups asked for; the runtime it got. Packing needs merged weights (a PEFT layer is not a plain
    linear layer)."""
    adapter = adapter or adapter_for(model, recipe, None, None)
    if adapter == MERGED:
        model = model.merge_and_unload()
    model.eval()
    notes = speedups.install(model, tasks.for_type(recipe.task.type).inference, lean=lean, pack=adapter == MERGED and pack)
    return model, Runtime(adapter=adapter, speedups=notes)


def prepare_expert(expert, merge: bool | None = None, lean: bool = True, pack: bool = True,
                   allow_unevaluated: bool = False) -> list[str]:
    """A loaded version (`expert.model`, `.recipe`, `.evaluated_runtime`) made ready to answer as it was evaluated,
    or as asked where allowed; sets `expert.runtime` and returns the speed-ups' notes."""
    evaluated = getattr(expert, "evaluated_runtime", None)
    adapter = adapter_for(expert.model, expert.recipe, merge, evaluated, allow_unevaluated)
    expert.model, expert.runtime = prepare(expert.model, expert.recipe, adapter, lean, pack)
    return expert.runtime.speedups
