"""Three tiers on a finished run: its expert, a second expert as the mid tier, a recorded frontier of stated accuracy.

    .venv/bin/python benchmarks/routing_real.py runs/teacher-student/student-gold \\
        --mid runs/teacher-student/student-teacher --work runs/routing-banking77 [--frontier-accuracy 0.95]
    .venv/bin/python benchmarks/routing_real.py runs/snips-route/expert --mid runs/snips-route/mid \\
        --work runs/routing-snips --metric field_exact_match

No frontier API is reachable here, so the frontier tier is recorded predictions made up for the run's
validation and test rows: the gold answer with probability `--frontier-accuracy` (seeded), else a wrong one
(classification: another label drawn uniformly; extraction: the gold object with its intent or one slot
wrong), with token counts of the prompt a frontier baseline is sent (the instruction with the label list or
schema, ~4 characters per token) and a price (`--price-in`/`--price-out`, dollars per million tokens; GPT-4o's
list price by default). The run directory is copied to `<work>/routed` and `expert eval` runs there with
`eval.routing` (tiers expert -> mid -> frontier, target: the frontier's validation `--metric` minus
`--below-last`), so the original run is untouched. Prints the route's table from `eval/route.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERT = [str(Path(sys.executable).parent / "expert")]
SEED = 13


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def recorded_frontier(run: Path, accuracy: float, out: Path) -> None:
    """Made-up frontier answers for every validation and test row of `run`, right with probability `accuracy`
    (the whole answer: label, or extracted object); a wrong one is `wrong_label` or `wrong_object`."""
    spec_doc = json.loads((run / "prep/spec.json").read_text(encoding="utf-8"))
    spec, system = spec_doc["spec"], spec_doc["baseline_system_prompt"]
    rng = random.Random(SEED)
    lines = []
    for split in ("validation", "test"):
        for row in read_jsonl(run / f"prep/{split}.jsonl"):
            gold = row["target"]
            right = rng.random() < accuracy
            if right:
                answer = gold
            else:
                answer = wrong_label(gold, spec, rng) if isinstance(spec, list) else wrong_object(gold, spec, rng)
            text = answer if isinstance(answer, str) else json.dumps(answer)
            lines.append({"id": row["id"], "output": answer, "input_tokens": (len(system) + len(row["text"])) // 4 + 8,
                          "output_tokens": len(text) // 4 + 1})
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def wrong_label(gold: str, labels: list[str], rng: random.Random) -> str:
    """Another label, drawn uniformly."""
    return rng.choice([x for x in labels if x != gold])


def wrong_object(gold: dict, schema: dict, rng: random.Random) -> dict:
    """The gold {intent, slots} with one field wrong, each as likely: another intent (uniformly), or the slots
    with one slot dropped (a made-up `extra` slot added when there is none), as a frontier's typical miss."""
    wrong = json.loads(json.dumps(gold))
    if rng.random() < 0.5:
        wrong["intent"] = rng.choice([x for x in schema["properties"]["intent"]["enum"] if x != gold["intent"]])
    elif wrong["slots"]:
        del wrong["slots"][rng.choice(sorted(wrong["slots"]))]
    else:
        wrong["slots"] = {"extra": "it"}
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with a finished eval (its expert is tier 1)")
    parser.add_argument("--mid", type=Path, required=True, help="another trained run directory of the same task")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--frontier-accuracy", type=float, default=0.95)
    parser.add_argument("--price-in", type=float, default=2.5)
    parser.add_argument("--price-out", type=float, default=10.0)
    parser.add_argument("--below-last", type=float, default=0.01)
    parser.add_argument("--choose", choices=["point", "margin"], default="point")
    parser.add_argument("--metric", default="accuracy", help="the routing target's metric (field_exact_match for "
                        "SNIPS)")
    args = parser.parse_args()
    work = args.work.resolve()
    routed = work / "routed"
    if not routed.is_dir():
        shutil.copytree(args.run.resolve(), routed, ignore=shutil.ignore_patterns("run.lock"))
    frontier = work / "frontier.jsonl"
    recorded_frontier(routed, args.frontier_accuracy, frontier)
    baselines = [{"name": "mid-expert", "kind": "expert", "run_dir": str(args.mid.resolve())},
                 {"name": "frontier", "kind": "predictions", "path": str(frontier),
                  "price_per_mtok": {"input": args.price_in, "output": args.price_out}}]
    routing = {"tiers": ["expert", "mid-expert", "frontier"], "choose": args.choose,
               "target": {"metric": args.metric, "below_last": args.below_last}}
    command = EXPERT + ["eval", str(routed / "recipe.yaml"), "--run-dir", str(routed),
                        "--set", f"eval.baselines={json.dumps(baselines)}", "--set", f"eval.routing={json.dumps(routing)}"]
    print("$ " + " ".join(command), flush=True)
    if subprocess.call(command, cwd=ROOT) != 0:
        sys.exit("expert eval failed")
    report(routed)


def report(routed: Path) -> None:
    route = json.loads((routed / "eval/route.json").read_text(encoding="utf-8"))
    metrics = json.loads((routed / "eval/metrics.json").read_text(encoding="utf-8"))["systems"]
    print(f"\ntarget: {route['target_rule']}; search: {route['search']}\n")
    metric = route["target_metric"]
    print(f"| system | split | {metric} (95% CI) | target held on resamples | cost / 1k | p50 / p95 ms | shares | "
          f"saving vs frontier alone (95% CI) | {metric} vs frontier alone (95% CI) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for how, option in route["options"].items():
        for split in ("validation", "test"):
            m = option[split]
            vs = m["vs_last_tier"]
            q = vs["quality_difference"]
            thresholds = ", ".join(f"{t:.4g}" for t in option["thresholds"])
            print(f"| route, {how} ({thresholds}) | {split} | {m['metric']:.3f} ({m['metric_interval_95'][0]:.3f} to "
                  f"{m['metric_interval_95'][1]:.3f}) | {m['target_held_on_resamples']:.0%} | ${m['cost_per_1k']:.4f} | "
                  f"{m['latency_ms_p50']:.0f} / {m['latency_ms_p95']:.0f} | "
                  + ", ".join(f"{n} {s:.1%}" for n, s in m["shares"].items()) +
                  f" | {vs['cost_saving']:.1%} ({vs['cost_saving_interval_95'][0]:.1%} to "
                  f"{vs['cost_saving_interval_95'][1]:.1%}) | {q['difference']:+.3f} ({q['ci_low']:+.3f} to "
                  f"{q['ci_high']:+.3f}) |")
    for name, single in route["singles"].items():
        m = metrics[name]
        latency = ("not recorded" if m["latency_ms_p50"] is None else
                   f"{m['latency_ms_p50']:.0f} / {m['latency_ms_p95']:.0f}")
        print(f"| {name} alone | test | {single['metric']:.3f} | | ${single['cost_per_1k']:.4f} | {latency} | | | |")
    print(f"\nroute holds on test: {route.get('holds_on_test')}; label mix validation vs test: "
          f"{route.get('label_mix')}")


if __name__ == "__main__":
    main()
