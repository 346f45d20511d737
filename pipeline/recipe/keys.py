"""Which recipe keys a stage read, as hashes of their leaf values: what lets a later command name the keys that
changed since a stage ran. It reads a `Recipe` and imports nothing else of the pipeline, so the run directory
(which records these hashes) and the stage contracts (which compare them) both build on it."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted paths to the leaf values under `prefix`; lists of mappings are indexed (`eval.baselines[0].model`)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_leaves(inner, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, inner in enumerate(value):
            out.update(_leaves(inner, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def recipe_keys(recipe: Recipe, roots: tuple[str, ...]) -> dict[str, str]:
    """A short hash of every leaf under the dotted `roots` (`("task", "data.max_tokens")`; `()` for the whole
    recipe), keyed by its dotted path."""
    doc = recipe.model_dump(mode="json", by_alias=True)
    picked: dict[str, Any] = {}
    for root in roots or ("",):
        node: Any = doc
        for part in filter(None, root.split(".")):
            node = node[part]
        picked.update(_leaves(node, root))
    return {key: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for key, v in picked.items()}


def keys_hash(keys: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def changed_keys(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Dotted keys added, removed or changed between two `recipe_keys` results."""
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
