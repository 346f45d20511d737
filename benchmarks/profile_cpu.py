"""Where the CPU time goes: one training step, one eval batch and one served request, by op family.

    .venv/bin/python benchmarks/profile_cpu.py [--batch 8] [--eval-batch 16] [--work runs/profile-cpu]

The embedded SmolLM2-135M-Instruct on a seeded BANKING77 sample (`benchmarks/bench_train.py`'s, through
`expert prep`), each phase as the pipeline runs it:

- train: `expert train`'s trainer (TRL's SFTTrainer as `pipeline/training/setup.py` builds it, the recipe's
  defaults: LoRA r16 on every linear layer, bf16 and eager attention on a CPU), steps 1-2 warm up, step 3 is
  profiled;
- eval: `answering.answer` on `--eval-batch` test prompts with the 77 labels, as eval scores them, on the runtime
  eval and serving share (`pipeline/inference/runtime.py`: adapter merged, lean forward, packed weights), and as eval ran
  before it (adapter separate, no speed-ups);
- serve: one request on that runtime with the cached system prompt, as `expert serve`'s engine calls
  `answering.answer`.

Each phase runs under `torch.profiler`; an op's self time goes to its family (matrix products, attention's
softmax, element-wise, reductions, copies and casts, indexing, the optimizer's foreach kernels). What is left
of the phase's wall time after every op's self time is the time outside torch kernels (Python, autograd's
engine, the framework around the model). Also printed: the bf16 and fp32 matrix-product rates at the model's
own shapes, measured in the same process (the rate training is held against).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# op name prefixes -> family; the first match wins, anything unmatched is "other ops"
FAMILIES = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_mkldnn",
                         "mkldnn::", "aten::mkldnn", "aten::linear", "aten::_weight_int", "aten::matmul")),
    ("attention softmax / SDPA", ("aten::_softmax", "aten::softmax", "aten::_safe_softmax", "aten::scaled_dot",
                                  "aten::_scaled_dot")),
    ("optimizer (foreach)", ("aten::_foreach", "aten::_fused_adam")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                          "aten::cat", "aten::empty", "aten::zeros", "aten::fill_", "aten::zero_", "aten::full",
                          "aten::new_", "aten::resize_", "aten::ones")),
    ("indexing", ("aten::index", "aten::embedding", "aten::gather", "aten::scatter", "aten::masked", "aten::where",
                  "aten::nonzero", "aten::_index", "aten::take", "aten::select_backward", "aten::slice_backward")),
    ("reductions", ("aten::sum", "aten::mean", "aten::max", "aten::amax", "aten::min", "aten::logsumexp",
                    "aten::argmax", "aten::norm", "aten::all", "aten::any")),
    ("element-wise", ("aten::add", "aten::sub", "aten::mul", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt",
                      "aten::sqrt", "aten::exp", "aten::log", "aten::silu", "aten::sigmoid", "aten::tanh",
                      "aten::clamp", "aten::gt", "aten::ge", "aten::lt", "aten::le", "aten::eq", "aten::ne",
                      "aten::maximum", "aten::minimum", "aten::reciprocal", "aten::lerp", "aten::addcmul",
                      "aten::addcdiv", "aten::bitwise", "aten::logical", "aten::abs", "aten::sign", "aten::cos",
                      "aten::sin", "aten::threshold", "aten::_log_softmax", "aten::log_softmax", "aten::expm1")),
)


def family(op: str) -> str:
    for name, prefixes in FAMILIES:
        if op.startswith(prefixes):
            return name
    return "other ops"


def by_family(profile, wall_s: float) -> dict:
    """Self CPU seconds per family (leaf kernel time, on the profiled thread and autograd's), the top ops, and
    what is left of the wall time outside kernels."""
    seconds: dict[str, float] = defaultdict(float)
    ops = []
    for event in profile.key_averages():
        if event.key.startswith(("autograd::", "Optimizer.", "ProfilerStep", "## ")) or not event.key.startswith(
                ("aten::", "mkldnn::", "trl", "_")):
            continue
        self_s = event.self_cpu_time_total / 1e6
        seconds[family(event.key)] += self_s
        ops.append((self_s, event.key, event.count))
    kernels = sum(seconds.values())
    ops.sort(reverse=True)
    return {"wall_s": wall_s, "families_s": dict(sorted(seconds.items(), key=lambda kv: -kv[1])),
            "outside_kernels_s": max(wall_s - kernels, 0.0),
            "top_ops": [{"op": name, "self_s": s, "calls": n} for s, name, n in ops[:12]]}


def profile_train(run_dir: Path, recipe_path: Path) -> tuple[dict, int]:
    import torch
    from transformers import TrainerCallback

    from pipeline.inference import models
    from pipeline.recipe.schema import load_recipe
    from pipeline.run.rundir import open_run
    from pipeline.training import setup as train_setup

    recipe = load_recipe(recipe_path)
    settings = train_setup.training_settings(recipe)
    config = train_setup.to_sft_config(recipe.train, run_dir / "profile-checkpoints", recipe.data.max_tokens,
                                       settings)
    config.max_steps, config.save_strategy, config.eval_strategy, config.load_best_model_at_end = 3, "no", "no", False
    base = models.resolve_base(recipe.model.base)[1]  # the record prep would have made of it
    _, tokenizer, model = train_setup.load_for_training(recipe, base, settings)
    result: dict = {}

    class ProfileThirdStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profile.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                wall = time.perf_counter() - self.started
                self.profile.__exit__(None, None, None)
                result.update(by_family(self.profile, wall))

    tokens: list[int] = []
    trainer = train_setup.build_trainer(recipe, open_run(run_dir), config, tokenizer, model, [ProfileThirdStep()])
    original = trainer.training_step

    def count_tokens(model, inputs, *args, **kwargs):
        tokens.append(int(inputs["attention_mask"].sum()))
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = count_tokens
    trainer.train()
    result["real_tokens"] = tokens[-1]
    return result, tokens[-1]


def load_expert_as(run_dir: Path, recipe_path: Path, prepared: bool):
    """The expert of the profile's own short training as eval and `expert serve` run it (`prepared`: the adapter
    merged, lean forward, packed weights; `pipeline/inference/runtime.py`), or as eval loaded it before (adapter separate,
    no speed-ups)."""
    from pipeline.evaluation.inference import load_expert
    from pipeline.inference import runtime
    from pipeline.recipe.schema import load_recipe
    from pipeline.run import contracts

    recipe = load_recipe(recipe_path)
    trained = contracts.read_record(run_dir / "train/record.json", contracts.TrainRecord)
    model, tokenizer = load_expert(recipe, trained, run_dir / "train/adapter")
    if prepared:
        model, _ = runtime.prepare(model, recipe)
    return recipe, model, tokenizer


def profile_inference(model, tokenizer, recipe, spec, prompts, prefix=None, repeats: int = 3) -> dict:
    import torch

    from pipeline.inference import answering

    for _ in range(2):
        answering.answer(model, tokenizer, prompts, recipe, spec, prefix=prefix, batch_size=len(prompts))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        started = time.perf_counter()
        for _ in range(repeats):
            answering.answer(model, tokenizer, prompts, recipe, spec, prefix=prefix, batch_size=len(prompts))
        wall = (time.perf_counter() - started) / repeats
    result = by_family(profile, wall * repeats)
    result["families_s"] = {k: v / repeats for k, v in result["families_s"].items()}
    result["outside_kernels_s"] /= repeats
    result["wall_s"] = wall
    result["top_ops"] = [{**op, "self_s": op["self_s"] / repeats, "calls": op["calls"] // repeats}
                         for op in result["top_ops"]]
    return result


def table(title: str, result: dict) -> str:
    wall = result["wall_s"]
    lines = [f"**{title}**: {wall * 1000:.1f} ms wall", "", "| where | ms | share |", "|---|---|---|"]
    for name, s in result["families_s"].items():
        lines.append(f"| {name} | {s * 1000:.1f} | {s / wall:.0%} |")
    lines.append(f"| outside torch kernels (Python, autograd, framework) | {result['outside_kernels_s'] * 1000:.1f} "
                 f"| {result['outside_kernels_s'] / wall:.0%} |")
    lines += ["", "Top ops by self time: " + "; ".join(
        f"`{op['op']}` {op['self_s'] * 1000:.1f} ms ({op['calls']})" for op in result["top_ops"][:8])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=30, help="steps of the short training eval and serve use")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "profile-cpu")
    args = parser.parse_args()

    import os

    os.environ["BENCH_TRAIN_BATCH"] = str(args.batch)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.work.resolve() / 'mlflow.db'}")
    import torch

    from benchmarks import bench_train
    from pipeline.evaluation.inference import read_split
    from pipeline.inference import answering
    from pipeline.recipe.schema import load_recipe
    from pipeline.run.contracts import StageOptions
    from pipeline.run.rundir import open_run
    from pipeline.stages import train

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    recipe_path = work / "recipe.yaml"
    if not (run_dir / "prep/train.jsonl").is_file():
        bench_train.prepare(work, 1000, args.train_steps)
    results: dict = {"threads": torch.get_num_threads()}
    results["train"], tokens = profile_train(run_dir, recipe_path)
    results["matmul_gflops"] = bench_train.matmul_rates(tokens)
    if not (run_dir / "train/record.json").is_file():
        train.run(load_recipe(recipe_path), open_run(run_dir), StageOptions(resume=False))
    spec = json.loads((run_dir / "prep/spec.json").read_text(encoding="utf-8"))["spec"]
    test = read_split(open_run(run_dir), "test")

    prompts = [row["prompt"] for row in test[:args.eval_batch]]
    recipe, model, tokenizer = load_expert_as(run_dir, recipe_path, prepared=False)
    results["eval_separate"] = profile_inference(model, tokenizer, recipe, spec, prompts)
    del model
    recipe, model, tokenizer = load_expert_as(run_dir, recipe_path, prepared=True)
    results["eval"] = profile_inference(model, tokenizer, recipe, spec, prompts)
    prefix = answering.system_prefix(model, tokenizer, test[0]["prompt"][0]["content"])
    results["serve"] = profile_inference(model, tokenizer, recipe, spec, [test[0]["prompt"]], prefix=prefix,
                                         repeats=20)

    rates = results["matmul_gflops"]
    print(f"CPU threads: {results['threads']}; matrix products at the model's shapes ({tokens} rows): "
          f"bf16 {rates['bfloat16']:.0f} GFLOP/s, fp32 {rates['float32']:.0f} GFLOP/s\n")
    print(table(f"train step (batch {args.batch}, {results['train']['real_tokens']} real tokens)", results["train"]))
    print()
    print(table(f"eval batch ({args.eval_batch} prompts, 77 labels), adapter separate, no speed-ups (eval before)",
                results["eval_separate"]))
    print()
    print(table(f"eval batch ({args.eval_batch} prompts, 77 labels), the serving runtime (eval now)", results["eval"]))
    print()
    print(table("served request (1 prompt, cached system prompt)", results["serve"]))
    (work / "profile.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
