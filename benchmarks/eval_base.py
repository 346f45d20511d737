"""The recipe's untuned base-model baselines on a prepped test split, with no trained adapter.

    .venv/bin/python benchmarks/eval_base.py recipes/banking77.yaml --run-dir runs/banking77-base [--limit N]

Why: `expert eval` measures the baselines in the same pass as the expert, so
it needs `train/adapter`. When the expert was evaluated elsewhere (another
machine, an earlier session), this measures the recipe's `base_model`
baselines exactly as `expert eval` would (same prompts, shots, constrained
inference, batch size) on the identical split (prep is seeded), and prints
each one's quality with a Wilson 95% interval, throughput and cost per 1,000
requests. The run directory is prepped first if it is not already.
Results go to RUN_DIR/eval-base/metrics.json and predictions/*.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `pipeline`

from pipeline import tasks
from pipeline.evaluation import (
    baselines,
    evidence,
    stats,  # noqa: E402
)
from pipeline.evaluation import inference as eval_inference
from pipeline.files import atomic_write_json, atomic_write_jsonl
from pipeline.inference import models
from pipeline.recipe.schema import dump_recipe, load_recipe  # noqa: E402
from pipeline.run.rundir import MANIFEST, init_run, open_run  # noqa: E402
from pipeline.stages import prep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test rows (a quick look)")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    if (args.run_dir / MANIFEST).is_file():
        run = open_run(args.run_dir)
    else:
        run = init_run(args.run_dir, recipe.name, dump_recipe(recipe), recipe.recipe_hash())
    prep.run(recipe, run)

    task = tasks.for_type(recipe.task.type)
    spec_doc = json.loads((run.path / "prep/spec.json").read_text(encoding="utf-8"))
    spec, baseline_system = spec_doc["spec"], spec_doc["baseline_system_prompt"]
    test = eval_inference.read_split(run, "test")[: args.limit]
    fewshot = baselines.load_fewshot(run, recipe)
    source, _ = models.resolve_base(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    model = models.load_base_model(recipe.model, source, models.resolve_precision(recipe.train.precision))
    model.eval()

    out = run.path / "eval-base"
    results = {}
    quality = recipe.eval.gate.metric
    binary = quality in ("accuracy", "exact_match")  # a Wilson interval is for a share of right/wrong examples
    for baseline in [b for b in recipe.eval.baselines if b.kind == "base_model"]:
        rows = baselines.baseline_rows(test, baseline_system, fewshot, baseline.shots)
        started = time.perf_counter()
        answers = eval_inference.infer_local(model, tokenizer, rows, recipe, spec, baseline.name)
        seconds = time.perf_counter() - started
        metrics = evidence.system_metrics(recipe, task, spec, test, answers, {}, baseline.name)
        value = metrics[quality]
        if binary:
            metrics[f"{quality}_wilson95"] = stats.wilson_interval(round(value * len(test)), len(test))
        metrics["examples_per_s"] = len(test) / seconds
        results[baseline.name] = metrics
        atomic_write_jsonl(out / "predictions" / f"{baseline.name}.jsonl", evidence.prediction_rows(test, answers))
        low, high = metrics.get(f"{quality}_wilson95", (math.nan, math.nan))
        print(f"{baseline.name}: {quality} {value:.3f} (95% Wilson {low:.3f}-{high:.3f}) on {len(test)} test rows, "
              f"{metrics['examples_per_s']:.2f} examples/s, ${metrics['cost_per_1k']:.3f} per 1k requests", flush=True)
    atomic_write_json(out / "metrics.json", {"systems": results, "test_examples": len(test), "metric": quality})


if __name__ == "__main__":
    main()
