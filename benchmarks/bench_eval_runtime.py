"""Eval's classification speed on the runtime it now shares with serving, against how it ran before, side by side.

    .venv/bin/python benchmarks/bench_eval_runtime.py runs/teacher-student/student-gold [--rows 128] [--rounds 3]

One trained run directory's expert (BANKING77's, 77 labels), loaded twice in one process: as eval ran it before
(the adapter separate, no speed-ups) and as eval and `expert serve` run it now (`pipeline/inference/runtime.py`: the
adapter merged, the lean forward pass, packed bf16 weights). The first `--rows` test prompts go through
`answering.answer` at the recipe's `eval.batch_size`, the two in turn for `--rounds` rounds (this machine is
shared and noisy). Reported: examples/s of each, the ratio per round, and how far the answers move (labels that
differ, the largest confidence difference): merging rounds bf16 weights differently, which is why eval runs the
runtime serving serves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run directory")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from pipeline.evaluation.inference import load_expert, read_split
    from pipeline.inference import answering, runtime
    from pipeline.recipe.schema import load_recipe
    from pipeline.run import contracts
    from pipeline.run.rundir import open_run

    run = args.run.resolve()
    recipe = load_recipe(run / "recipe.yaml")
    trained = contracts.read_record(run / "train/record.json", contracts.TrainRecord)
    spec = json.loads((run / "prep/spec.json").read_text(encoding="utf-8"))["spec"]
    prompts = [row["prompt"] for row in read_split(open_run(run), "test")[:args.rows]]
    before, tokenizer = load_expert(recipe, trained, run / "train/adapter")
    now, _ = load_expert(recipe, trained, run / "train/adapter")
    now, ran_as = runtime.prepare(now, recipe)
    systems = {"before (adapter separate)": before, f"now (adapter {ran_as.adapter}, speed-ups)": now}
    seconds = {name: [] for name in systems}
    answers = {}
    for name, model in systems.items():  # warm-up, and the answers compared
        answers[name] = answering.answer(model, tokenizer, prompts[:recipe.eval.batch_size], recipe, spec)
    for i in range(args.rounds):
        for name in (list(systems) if i % 2 == 0 else list(systems)[::-1]):
            started = time.perf_counter()
            answers[name] = answering.answer(systems[name], tokenizer, prompts, recipe, spec)
            seconds[name].append(time.perf_counter() - started)
    (b, n) = systems
    print(f"{len(prompts)} BANKING77 test prompts ({len(spec)} labels), eval.batch_size {recipe.eval.batch_size}, "
          f"{args.rounds} rounds in turn; notes: {'; '.join(ran_as.speedups)}\n")
    print("| runtime | examples/s (median round) | rounds s |")
    print("|---|---|---|")
    for name in systems:
        print(f"| {name} | {len(prompts) / statistics.median(seconds[name]):.1f} | "
              f"{', '.join(f'{s:.1f}' for s in seconds[name])} |")
    ratios = [sb / sn for sb, sn in zip(seconds[b], seconds[n])]
    differ = sum(x["prediction"] != y["prediction"] for x, y in zip(answers[b], answers[n]))
    moved = max(abs(x["confidence"] - y["confidence"]) for x, y in zip(answers[b], answers[n]))
    print(f"\n- speed-up per round: median {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    print(f"- answers that differ: {differ} of {len(prompts)}; largest confidence difference {moved:.4f}")


if __name__ == "__main__":
    main()
