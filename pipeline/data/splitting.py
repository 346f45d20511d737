"""The seeded, deterministic train/validation/test(/router) split (stratified by the task's `stratum`) and the
few-shot draw."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from pipeline import tasks
from pipeline.data.examples import Example
from pipeline.recipe.schema import Recipe

SPLITS = ("train", "validation", "test")  # every recipe's
ROUTER = "router"  # held out for the triage router: only with `data.split.router` or `data.router_source`


def split_names(recipe: Recipe) -> tuple[str, ...]:
    """The splits prep writes for this recipe: SPLITS, and the router split where the recipe has one."""
    return (*SPLITS, ROUTER) if recipe.data.has_router_split else SPLITS


def split_examples(examples: list[Example], recipe: Recipe) -> dict[str, list[Example]]:
    """Seeded, deterministic split of the rows from `data.source`; stratified by `task.stratum` (the label,
    the label set; one stratum for tasks without labels).

    Rows from validation_source/test_source/router_source go to their split as
    they are, and that split is not carved from `data.source`. Each split keeps
    source order. Within a stratum the shuffled rows go to test, then
    validation, then router, then train: the router split only ever takes rows
    that would have been train, so test and validation are the same with or
    without it. It never takes a stratum's last training row.
    """
    split = recipe.data.split
    fractions = {
        "test": 0.0 if recipe.data.test_source is not None else split.test,
        "validation": 0.0 if recipe.data.validation_source is not None else split.validation,
        ROUTER: 0.0 if recipe.data.router_source is not None else split.router,
    }
    rng = random.Random(split.seed)
    out: dict[str, list[Example]] = {s: [] for s in split_names(recipe)}
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
        n_router = round(n * fractions[ROUTER])
        if n >= 3:  # every split gets each class where its count allows
            n_test = max(n_test, 1 if test_fraction else 0)
            n_val = max(n_val, 1 if fractions["validation"] else 0)
            n_router = max(n_router, 1 if fractions[ROUTER] else 0)
        held_out = n_test + n_val
        n_router = min(n_router, max(0, n - held_out - 1))  # the expert still sees the stratum
        out["test"] += members[:n_test]
        out["validation"] += members[n_test:held_out]
        if n_router:
            out[ROUTER] += members[held_out : held_out + n_router]
        out["train"] += members[held_out + n_router :]
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
