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

`prepare --dataset snips` does the same for SNIPS (extraction; test 2.5%, validation 2.5%, router 4%, stratified
by intent, nothing held out), its expert trained for 100 steps (a weaker expert than recipes/snips.yaml's, which
leaves triage something to do and fits the session's CPU time).

    .venv/bin/python benchmarks/triage_real.py route --work runs/triage-banking77

`route` (after training) gives the run its router split (`data.router_source`), two recorded tiers (no frontier
API is reachable here; made up by the rule in `TIERS`, labelled as recorded in every table) and `eval.routing`
with triage (both router kinds), runs `expert prep` and `expert eval`, and prints the three routings side by side
at the same target, where each sent the unseen-intent requests, and the text router's own time per request measured
alone (one request at a time). `results.json` under `--work` keeps the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data"
SEED = 13
HELD_OUT_INTENTS = 15
FRACTIONS = {"banking77": {"test": 0.10, "validation": 0.10, "router": 0.15},
             "snips": {"test": 0.025, "validation": 0.025, "router": 0.04}}  # generated answers: 1.3/s here


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
        recipe["eval"]["gate"] = {"metric": "accuracy", "max_drop_vs_best_baseline": 0.02}
    else:
        recipe["data"]["fields"] = {"id": "id", "text": "text", "target": {"intent": "intent", "slots": "slots"}}
        recipe["train"].update(max_steps=100, eval_steps=100)
        recipe["eval"]["gate"] = {"metric": "field_exact_match", "max_drop_vs_best_baseline": 0.02}
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


@dataclass(frozen=True)
class RecordedTier:
    """A tier answered by rule: right with probability `accuracy` on every request (seen intents or not); a
    wrong answer another label (BANKING77) or the gold object with one field wrong (SNIPS); confidence Beta(12,
    1.5) when right and Beta(3, 2) when wrong (they overlap); tokens: the prompt's characters / 4 (its label list
    or schema included); latency normal around `latency_ms` (sd a fifth of it); list prices per million tokens."""

    name: str
    accuracy: float
    latency_ms: float
    price: dict
    seed: int


TIERS = (RecordedTier("mid", 0.85, 300, {"input": 0.15, "output": 0.6}, 1402),  # gpt-4o-mini's list price
         RecordedTier("frontier", 0.95, 900, {"input": 2.5, "output": 10.0}, 1401))  # gpt-4o's list price
TARGET_BELOW_FRONTIER = 0.02


def recorded_answers(tier: RecordedTier, run: Path, out: Path) -> None:
    from routing_real import wrong_label, wrong_object

    spec_doc = json.loads((run / "prep/spec.json").read_text(encoding="utf-8"))
    spec, system = spec_doc["spec"], spec_doc["baseline_system_prompt"]
    rng = random.Random(tier.seed)
    lines = []
    for split in ("router", "validation", "test"):
        for row in (json.loads(line) for line in (run / f"prep/{split}.jsonl").read_text(encoding="utf-8").splitlines()):
            gold = row["target"]
            right = rng.random() < tier.accuracy
            answer = gold if right else (wrong_label(gold, spec, rng) if isinstance(spec, list)
                                         else wrong_object(gold, spec, rng))
            text = answer if isinstance(answer, str) else json.dumps(answer)
            lines.append({"id": row["id"], "output": answer,
                          "confidence": round(rng.betavariate(12, 1.5) if right else rng.betavariate(3, 2), 4),
                          "input_tokens": (len(system) + len(row["text"])) // 4 + 8, "output_tokens": len(text) // 4 + 1,
                          "latency_ms": max(tier.latency_ms / 4, rng.gauss(tier.latency_ms, tier.latency_ms / 5))})
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def route(work: Path) -> None:
    recipe = yaml.safe_load((work / "recipe.yaml").read_text(encoding="utf-8"))
    metric = recipe["eval"]["gate"]["metric"]
    recipe["data"]["router_source"] = str(work / "router.jsonl")
    recipe["eval"]["baselines"] = [{"name": t.name, "kind": "predictions", "path": str(work / f"recorded-{t.name}.jsonl"),
                                    "price_per_mtok": t.price} for t in TIERS]
    recipe["eval"]["routing"] = {"tiers": ["expert", *(t.name for t in TIERS)],
                                 "target": {"metric": metric, "below_last": TARGET_BELOW_FRONTIER},
                                 "triage": {"routers": ["text", "probe"]}}
    routed = work / "recipe-triage.yaml"
    routed.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    run = work / "run"
    expert(["prep", str(routed), "--run-dir", str(run)])
    for tier in TIERS:
        recorded_answers(tier, run, work / f"recorded-{tier.name}.jsonl")
    expert(["eval", str(routed), "--run-dir", str(run)])
    report(work, run)


def expert(args: list[str]) -> None:
    command = [str(Path(sys.executable).parent / "expert"), *args]
    print("$ " + " ".join(command), flush=True)
    if subprocess.call(command, cwd=ROOT) != 0:
        sys.exit(f"expert {args[0]} failed")


NAMES = {"confidence_only": "confidence only", "triage_only": "triage only",
         "triage_then_confidence": "triage then confidence"}


def report(work: Path, run: Path) -> None:
    from pipeline.routing import triage

    route_doc = json.loads((run / "eval/route.json").read_text(encoding="utf-8"))
    compared = route_doc["triage"]
    if "routers" not in compared:
        sys.exit(f"no triage: {compared['reason']}")
    unseen = set(json.loads((work / "unseen_intents.json").read_text(encoding="utf-8")))
    test = [json.loads(line) for line in (run / "prep/test.jsonl").read_text(encoding="utf-8").splitlines()]
    intent = {r["id"]: (r["target"] if isinstance(r["target"], str) else r["target"]["intent"]) for r in test}
    rows = [("confidence_only", "", compared["confidence_only"])]
    rows += [(how, kind, r) for kind, entry in compared["routers"].items() for how, r in entry.get("routings", {}).items()]
    results = {"target": route_doc["target"], "target_rule": route_doc["target_rule"], "routings": []}
    print(f"\ntarget: {route_doc['target_rule']}; tiers recorded by rule: "
          + "; ".join(f"{t.name} right {t.accuracy:.0%}, {t.latency_ms:.0f} ms" for t in TIERS) + "\n")
    print(f"| routing | router | test {route_doc['target_metric']} (95% CI) | cost / 1k | saving vs frontier alone "
          "(95% CI) | quality vs frontier alone (95% CI) | p95 ms | starts | answers | unseen past the expert | "
          "seen escalated |")
    print("|---" * 11 + "|")
    for how, kind, option in rows:
        if option is None or "test" not in option:
            print(f"| {NAMES[how]} | {kind} | {(option or {}).get('reason', 'no route met the target')} |" + " |" * 8)
            continue
        m = option["test"]
        vs, q = m["vs_last_tier"], m["vs_last_tier"]["quality_difference"]
        name = "confidence_only" if how == "confidence_only" else f"{kind}.{how}"
        per_row = [json.loads(line) for line in (run / f"eval/triage/test.{name}.jsonl").read_text().splitlines()]
        unseen_rows = [r for r in per_row if intent[r["id"]] in unseen]
        seen_rows = [r for r in per_row if intent[r["id"]] not in unseen]
        past = sum(r["tier"] != "expert" for r in unseen_rows) / max(len(unseen_rows), 1)
        escalated = sum(r["tier"] != "expert" for r in seen_rows) / max(len(seen_rows), 1)
        results["routings"].append({"routing": how, "router": kind, "test": m, "unseen_rows": len(unseen_rows),
                                    "unseen_past_expert": past, "seen_escalated": escalated})
        print(f"| {NAMES[how]} | {kind} | {m['metric']:.3f} ({m['metric_interval_95'][0]:.3f} to "
              f"{m['metric_interval_95'][1]:.3f}) | ${m['cost_per_1k']:.3f} | {vs['cost_saving']:.1%} "
              f"({vs['cost_saving_interval_95'][0]:.1%} to {vs['cost_saving_interval_95'][1]:.1%}) | "
              f"{q['difference']:+.3f} ({q['ci_low']:+.3f} to {q['ci_high']:+.3f}) | {m['latency_ms_p95']:.0f} | "
              + ", ".join(f"{n} {v:.0%}" for n, v in m.get("starts", {"expert": 1.0}).items()) + " | "
              + ", ".join(f"{n} {v:.0%}" for n, v in m["shares"].items()) +
              (f" | {past:.1%} of {len(unseen_rows)} | {escalated:.1%} |" if unseen else " | n/a | n/a |"))
    for kind, entry in compared["routers"].items():
        if "routings" in entry:
            q = entry["routings"]["triage_then_confidence"].get("router_on_test")
            print(f"\n`{kind}` router ({entry['runs']}): test ROC AUC {entry['test_roc_auc']:.3f} (expert confidence "
                  f"{compared['expert_confidence_test_roc_auc']:.3f})" + (
                      f"; caught {q['caught']:.1%} of the expert's wrong answers, {q['needless']:.1%} of those "
                      "sent up needlessly" if q else ""))
    router = triage.load(run / "eval/triage/text")
    timings = []
    for r in test[:500]:
        started = time.perf_counter()
        router.score([r["text"]])
        timings.append(time.perf_counter() - started)
    results["text_router_ms"] = {"p50": 1000 * statistics.median(timings),
                                 "p95": 1000 * sorted(timings)[int(0.95 * len(timings))]}
    expert_ms = json.loads((run / "eval/metrics.json").read_text(encoding="utf-8"))["systems"]["expert"]["latency_ms_p50"]
    results["expert_latency_ms_p50"] = expert_ms
    results["kept"], results["why"] = compared["kept"], compared["why"]
    print(f"\ntext router alone, one request at a time: p50 {results['text_router_ms']['p50']:.2f} ms, p95 "
          f"{results['text_router_ms']['p95']:.2f} ms (target 5 ms), {results['text_router_ms']['p50'] / expert_ms:.1%} "
          f"of the expert's p50 latency in eval ({expert_ms:.1f} ms; target 5%); triage "
          f"{'kept' if compared['kept'] else 'not kept'}: {compared['why']}")
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="the split files and the recipe under --work")
    prepare_parser.add_argument("--work", type=Path, required=True)
    prepare_parser.add_argument("--dataset", choices=sorted(FRACTIONS), default="banking77")
    route_parser = commands.add_parser("route", help="router split, recorded tiers, triage: expert prep + eval")
    route_parser.add_argument("--work", type=Path, required=True)
    report_parser = commands.add_parser("report", help="the tables again, from a finished route")
    report_parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dataset, args.work.resolve())
    elif args.command == "route":
        route(args.work.resolve())
    else:
        report(args.work.resolve(), args.work.resolve() / "run")


if __name__ == "__main__":
    main()
