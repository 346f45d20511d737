"""Would int8 weights make `expert serve` fast enough, and does the expert still answer the same?

    .venv/bin/python benchmarks/check_int8.py runs/banking77 [--limit 200] [--threads 2]

An experiment, not a serving option (docs/BENCHMARKS.md, "Serve"): loads the
run's adapter on its base, merged as `expert serve` does, answers the test
split at batch 1 (the serving case) once in the evaluated precision and once
with PyTorch dynamic int8 linear layers (weights per output channel, the LM
head left in floating point), and prints each one's quality metric and median
latency, the share of identical answers and the largest confidence change.
Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import tasks  # noqa: E402
from pipeline.evaluation import inference  # noqa: E402
from pipeline.inference import answering  # noqa: E402
from pipeline.recipe.schema import load_recipe  # noqa: E402
from pipeline.run import contracts  # noqa: E402
from pipeline.run.rundir import RunDir  # noqa: E402


def quantize_int8_dynamic(model):
    """Every linear layer but the LM head in int8, in place (torch.ao dynamic quantization: fbgemm kernels that
    run ~2x the bf16 rate at the ~30-row products of one request on this CPU)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        model = model.float()
        head = model.get_output_embeddings()
        spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module is not head}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def answer_one_by_one(model, tokenizer, rows, recipe, spec) -> tuple[list[dict], float]:
    """Answers at batch 1, as single served requests, and the median seconds per request."""
    out, seconds = [], []
    for row in rows:
        started = time.perf_counter()
        out += answering.answer(model, tokenizer, [row["prompt"]], recipe, spec)
        seconds.append(time.perf_counter() - started)
    return out, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="first N test rows only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = load_recipe(args.run_dir / "recipe.yaml")
    run = RunDir(args.run_dir)
    spec = json.loads((args.run_dir / "prep/spec.json").read_text(encoding="utf-8"))["spec"]
    rows = inference.read_split(run, "test")[: args.limit]
    task = tasks.for_type(recipe.task.type)
    golds = [row["target"] for row in rows]

    trained = contracts.read_record(args.run_dir / "train/record.json", contracts.TrainRecord)
    model, tokenizer = inference.load_expert(recipe, trained, args.run_dir / "train/adapter")
    model = model.merge_and_unload().eval()
    reference, reference_s = answer_one_by_one(model, tokenizer, rows, recipe, spec)
    model = quantize_int8_dynamic(model)
    int8, int8_s = answer_one_by_one(model, tokenizer, rows, recipe, spec)

    metric = recipe.eval.gate.metric
    for name, out, seconds in (("evaluated precision", reference, reference_s), ("int8", int8, int8_s)):
        value = task.metrics(golds, [r["prediction"] for r in out], spec)[metric]
        print(f"{name:>20}: {metric} {value:.4f}, median {seconds * 1000:.1f} ms per request")
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(reference, int8))
    shift = max(abs(a["confidence"] - b["confidence"]) for a, b in zip(reference, int8))
    print(f"identical answers: {same}/{len(rows)} ({same / len(rows):.1%}); largest confidence change {shift:.4f}")


if __name__ == "__main__":
    main()
