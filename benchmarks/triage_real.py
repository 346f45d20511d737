"""Triage on real data: BANKING77 with 15 of its 77 intents held out of the expert's training.

    .venv/bin/python benchmarks/triage_real.py prepare --work runs/triage-banking77
    .venv/bin/expert prep runs/triage-banking77/recipe.yaml --run-dir runs/triage-banking77/run
    .venv/bin/expert train runs/triage-banking77/recipe.yaml --run-dir runs/triage-banking77/run

`prepare` splits `../shared/data/banking77/train.csv` (seeded, stratified by intent) into test 10%, validation
10%, router 15% and train 65%, and holds 15 intents (drawn with the seed) out of train only: they stand for traffic
the expert never saw, and appear in validation, router and test at their natural share. The expert's label list is
all 77 intents (prep checks every target against it), so an unseen-intent query gets a confident seen label, as in
production. The split files and the recipe go under `--work` (never into the project: the data stays in
../shared).

`prepare --dataset snips` does the same for SNIPS (extraction; test 4%, validation 4%, router 6%, stratified by
intent, nothing held out), its expert trained for 260 steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data"
SEED = 13
HELD_OUT_INTENTS = 15
FRACTIONS = {"banking77": {"test": 0.10, "validation": 0.10, "router": 0.15},
             "snips": {"test": 0.04, "validation": 0.04, "router": 0.06}}


def banking77_rows() -> tuple[list[dict], list[str]]:
    with (DATA / "banking77/train.csv").open(encoding="utf-8", newline="") as handle:
        rows = [{"id": f"b{i}", "text": r["text"], "intent": r["category"]} for i, r in enumerate(csv.DictReader(handle))]
    labels = json.loads((DATA / "banking77/categories.json").read_text(encoding="utf-8"))
    return rows, labels


def snips_rows() -> list[dict]:
    lines = (DATA / "snips/train.jsonl").read_text(encoding="utf-8").splitlines()
    return [{"id": f"s{i}", **json.loads(line)} for i, line in enumerate(lines) if line.strip()]


def split(rows: list[dict], fractions: dict[str, float], held_out: int,
          labels: list[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """Seeded split, stratified by intent; the held-out intents' train share is dropped (the expert never sees
    them)."""
    rng = random.Random(SEED)
    unseen = sorted(rng.sample(sorted(labels), held_out)) if held_out else []
    by_intent: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_intent[row["intent"]].append(row)
    out: dict[str, list[dict]] = {name: [] for name in ("train", *fractions)}
    for intent in sorted(by_intent):
        members = by_intent[intent]
        rng.shuffle(members)
        start = 0
        for name, fraction in fractions.items():
            count = round(len(members) * fraction)
            out[name] += members[start:start + count]
            start += count
        if intent not in unseen:
            out["train"] += members[start:]
    return out, unseen


def recipe_for(dataset: str, work: Path, labels: list[str]) -> dict:
    recipe = yaml.safe_load((ROOT / f"recipes/{dataset}.yaml").read_text(encoding="utf-8"))
    recipe["name"] = f"triage-{dataset}"
    recipe["data"].update(source=str(work / "train.jsonl"), validation_source=str(work / "validation.jsonl"),
                          test_source=str(work / "test.jsonl"))
    recipe["data"]["split"] = {"validation": 0.0, "test": 0.0, "seed": SEED, "stratify": True}
    if dataset == "banking77":
        recipe["task"]["labels"] = labels
        recipe["data"]["fields"] = {"id": "id", "text": "text", "target": "intent"}
        recipe["train"].update(epochs=1.0)
        recipe["eval"]["gate"] = {"metric": "accuracy", "max_drop_vs_best_baseline": 1.0}
    else:
        recipe["data"]["fields"] = {"id": "id", "text": "text", "target": {"intent": "intent", "slots": "slots"}}
        recipe["train"].update(max_steps=260, eval_steps=130)
        recipe["eval"]["gate"] = {"metric": "field_exact_match", "max_drop_vs_best_baseline": 1.0}
    recipe["eval"]["baselines"] = []
    recipe["registry"] = {"model_name": f"triage-{dataset}"}
    return recipe


def prepare(dataset: str, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if dataset == "banking77":
        rows, labels = banking77_rows()
    else:
        rows, labels = snips_rows(), []
    splits, unseen = split(rows, FRACTIONS[dataset], HELD_OUT_INTENTS if dataset == "banking77" else 0,
                           labels or sorted({r["intent"] for r in rows}))
    for name, members in splits.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in members), encoding="utf-8")
    (work / "unseen_intents.json").write_text(json.dumps(unseen, indent=1) + "\n", encoding="utf-8")
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe_for(dataset, work, labels), sort_keys=False),
                                      encoding="utf-8")
    counts = {name: len(members) for name, members in splits.items()}
    print(f"wrote {work}: {counts}; unseen intents: {', '.join(unseen)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="the split files and the recipe under --work")
    prepare_parser.add_argument("--work", type=Path, required=True)
    prepare_parser.add_argument("--dataset", choices=sorted(FRACTIONS), default="banking77")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dataset, args.work.resolve())


if __name__ == "__main__":
    main()
