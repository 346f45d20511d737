"""The seeded, deterministic train/validation/test split (stratified by the task's `stratum`) and the few-shot draw."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from pipeline import tasks
from pipeline.data.examples import Example
from pipeline.recipe.schema import Recipe

SPLITS = ("train", "validation", "test")


def split_examples(examples: list[Example], recipe: Recipe) -> dict[str, list[Example]]:
    """Seeded, deterministic split of the rows from `data.source`; stratified by `task.stratum` (the label,
    the label set; one stratum for tasks without labels).

    Rows from validation_source/test_source go to their split as they are, and
    that split is not carved from `data.source`. Each split keeps source order.
    """
    split = recipe.data.split
    fractions = {
        "test": 0.0 if recipe.data.test_source is not None else split.test,
        "validation": 0.0 if recipe.data.validation_source is not None else split.validation,
    }
    rng = random.Random(split.seed)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    # teacher labels stay out of the test split unless the recipe says so: the test measures against gold
    teacher_in_test = recipe.data.teacher is not None and recipe.data.teacher.test_labels
    groups: dict[tuple[bool, str], list[Example]] = defaultdict(list)
    task = tasks.for_type(recipe.task.type)
    for e in examples:
        out_of_test = e.provenance.startswith("teacher:") and not teacher_in_test
        if e.fixed_split:
            out[e.fixed_split].append(e)
        elif split.stratify:
            groups[(out_of_test, task.stratum(e.target))].append(e)
        else:
            groups[(out_of_test, "")].append(e)
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda e: (e.source, e.line))
        rng.shuffle(members)
        n = len(members)
        test_fraction = 0.0 if key[0] else fractions["test"]
        n_test, n_val = round(n * test_fraction), round(n * fractions["validation"])
        if n >= 3:  # every split gets each class where its count allows
            n_test = max(n_test, 1 if test_fraction else 0)
            n_val = max(n_val, 1 if fractions["validation"] else 0)
        out["test"] += members[:n_test]
        out["validation"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    for rows in out.values():
        rows.sort(key=lambda e: (e.source, e.line))
    return out


def fewshot_examples(train: list[Example], recipe: Recipe, task, spec) -> dict[str, Any]:
    """`data.fewshot` examples drawn from train (seeded by data.split.seed) for prompted baselines.

    They are taken round-robin over the task's strata (sorted; classification's are its
    classes), so k >= number of classes shows every class once before any twice.
    """
    k = min(recipe.data.fewshot, len(train))
    rng = random.Random(recipe.data.split.seed)
    pools: dict[str, list[Example]] = defaultdict(list)
    for e in train:
        pools[task.stratum(e.target)].append(e)
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: list[Example] = []
    while len(chosen) < k:
        for key in sorted(pools):
            if pools[key] and len(chosen) < k:
                chosen.append(pools[key].pop())
    return {
        "k": k,
        "seed": recipe.data.split.seed,
        "examples": [{"id": e.id, "text": e.text, "target": e.target, "completion": task.target_text(e.target, spec)}
                     for e in chosen],
    }
