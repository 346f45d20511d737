"""Benchmark: `expert train` vs a plain TRL script, and QLoRA vs LoRA memory, on SmolLM2-135M.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--examples 1000] [--batch 8]
    .venv/bin/python benchmarks/bench_train.py --only expert expert_dropout expert_sdpa    # ablations
    .venv/bin/python scripts/make_random_base.py --shape smollm2-1.7b --out /tmp/smollm2-1.7b-random
    .venv/bin/python benchmarks/bench_train.py --base /tmp/smollm2-1.7b-random --steps 3 \
        --only expert expert_qlora expert_checkpointing expert_qlora_checkpointing    # QLoRA memory

One run, same machine: a seeded sample of BANKING77 (from ../shared/data) goes
through `expert prep` once (about --examples training rows), then each system
trains in its own child process (so peak RSS is its own) for --steps optimizer
steps at batch size 8:

  (a) plain TRL: `SFTTrainer` with TRL's default `SFTConfig` (bf16 autocast,
      gradient checkpointing, no length grouping) and a LoRA config from the
      TRL docs, on the same prompt/completion rows;
  (b) `expert train` with its defaults (LoRA r=16, all linear layers, no dropout;
      on this CPU bf16 and eager attention, chosen by `auto`);
  (c) `expert train` with `model.quantization: 4bit` (QLoRA), the base loaded
      from the 4-bit cache that a child fills first, as in every run after a
      user's first.

Every child counts each training step's real (non-padding) and padded tokens
and its wall time, and after training measures, in the same process, the bf16
and fp32 matmul rates at the model's own shapes (its projections and LM head,
at the run's mean rows per step, weighted by their share of a forward pass)
and a float32 rate at 1024 x 1024. Reported: real tokens/s, padding fraction,
median step time, peak RSS, peak anonymous memory (sampled; leaves out the
memory-mapped weight file), and efficiency = 4 x parameters x real tokens/s /
the bf16 rate at the model's shapes (LoRA training costs about 4 FLOPs per
parameter per token: 2 forward, 2 for activation gradients; the answer-only
LM head skips most of its share, so this counts work it no longer does);
the same against the fp32 1024 rate, as it was reported before. The first
step (warm-up) is left out of the rates. `--only expert expert_full_head
expert_input_casts` compares the answer-only LM head with TRL's
every-position one, and skipping the LoRA layers' fp32 input casts under
autocast with PEFT's default.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `pipeline`, not another installed copy
BANKING77 = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
# the base every system trains: the embedded SmolLM2-135M, or a model directory (--base, e.g. from
# scripts/make_random_base.py) to see how memory scales with model size
BASE = os.environ.get("BENCH_TRAIN_BASE", "smollm2-135m-instruct")
BATCH = int(os.environ.get("BENCH_TRAIN_BATCH", "8"))  # set by --batch, read by the children too


def matmul_flops(n: int = 1024, repeats: int = 20) -> float:
    """Float32 matmul FLOP/s of this process (all its threads), best of a few timed runs."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def track_peak_anonymous_memory() -> dict:
    """Sample the process's anonymous resident memory (RssAnon) every 10 ms in a thread; the dict's
    `peak_kb` holds the largest value seen.

    Why besides ru_maxrss: peak RSS also counts the pages of the memory-mapped safetensors file while the
    base loads (file-backed, reclaimable, and the same for LoRA and QLoRA); anonymous memory is what the
    run itself allocates: weights, activations, optimizer state.
    """
    import threading

    peak = {"peak_kb": 0}

    def sample() -> None:
        while True:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak["peak_kb"] = max(peak["peak_kb"], int(line.split()[1]))
                        break
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def matmul_rates(tokens: int) -> dict[str, float]:
    """bf16 and fp32 GFLOP/s of `torch.mm` at the model's shapes for `tokens` rows (SmolLM2-135M: hidden 576,
    k/v 192, MLP 1536, vocabulary 49152), weighted by each product's share of a forward pass's work."""
    import torch

    hidden, kv, mlp, vocab = 576, 192, 1536, 49152
    # (in, out, count per forward): q, k, v, o, gate, up, down per layer x 30 layers, then the LM head
    shapes = [(hidden, hidden, 60), (hidden, kv, 60), (hidden, mlp, 60), (mlp, hidden, 30), (hidden, vocab, 1)]
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        total_flops = total_s = 0.0
        for k, n, count in shapes:
            a, w = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            torch.mm(a, w.t())
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(10):
                    torch.mm(a, w.t())
                best = min(best, (time.perf_counter() - started) / 10)
            total_flops += 2 * tokens * k * n * count
            total_s += best * count
        rates[str(dtype).removeprefix("torch.")] = total_flops / total_s / 1e9
    return rates


def base_parameters() -> int:
    """The base model's parameter count, read from safetensors headers (loading it would skew peak RSS)."""
    from math import prod

    from safetensors import safe_open

    from pipeline.inference import models

    source, _ = models.resolve_base(BASE)
    total = 0
    for file in Path(source).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def count_steps() -> list[dict]:
    """Wrap Trainer.training_step to record each step's real and padded tokens and its start time."""
    from transformers import Trainer

    steps: list[dict] = []
    original = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        total = inputs["input_ids"].numel()
        steps.append({"start": time.perf_counter(), "real": int(mask.sum()) if mask is not None else total, "total": total})
        return original(self, model, inputs, *args, **kwargs)

    Trainer.training_step = training_step
    return steps


def summarize(steps: list[dict], ended: float, params: int, flops: float, anonymous: dict) -> dict:
    """`flops`: the float32 rate at 1024 x 1024 (kept for the record); efficiency is against the bf16 rate at the
    model's shapes for this run's mean rows per step, measured here, in the same process."""
    measured = steps[1:]  # the first step warms up kernels and allocators
    seconds = ended - measured[0]["start"]
    real = sum(s["real"] for s in measured)
    total = sum(s["total"] for s in measured)
    starts = [s["start"] for s in measured] + [ended]
    tokens_per_s = real / seconds
    rates = matmul_rates(round(total / len(measured)))
    return {
        "steps_measured": len(measured),
        "real_tokens_per_s": tokens_per_s,
        "padding_fraction": 1 - real / total,
        "median_step_s": statistics.median(b - a for a, b in zip(starts, starts[1:])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anonymous_mb": anonymous["peak_kb"] / 1024,
        "matmul_gflops": flops / 1e9,
        "bf16_shapes_gflops": rates["bfloat16"],
        "fp32_shapes_gflops": rates["float32"],
        "efficiency": 4 * params * tokens_per_s / (rates["bfloat16"] * 1e9),
        "efficiency_vs_fp32": 4 * params * tokens_per_s / flops,
        "parameters": params,
    }


def child_plain_trl(run_dir: Path, steps: int) -> dict:
    """What a user writes from the TRL docs: default SFTConfig, a LoRA config, the same rows."""
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.inference import models

    anonymous = track_peak_anonymous_memory()
    flops = matmul_flops()
    source, _ = models.resolve_base(BASE)
    dataset = load_dataset("json", data_files=str(run_dir / "prep/train.jsonl"), split="train")
    dataset = dataset.select_columns(["prompt", "completion"])
    record = count_steps()
    trainer = SFTTrainer(
        model=str(source),
        train_dataset=dataset,
        args=SFTConfig(output_dir=str(run_dir / "plain-trl"), max_steps=steps, per_device_train_batch_size=BATCH,
                       report_to="none", save_strategy="no", disable_tqdm=True,
                       use_cpu=True),  # the one change TRL's defaults demand on a CPU (they assume bf16 on a GPU)
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    params = base_parameters()
    trainer.train()
    return summarize(record, time.perf_counter(), params, flops, anonymous)


# `expert train` variants: the recipe's model/train keys each one changes
EXPERT_VARIANTS = {
    "expert": {},
    "expert_qlora": {"model": {"quantization": "4bit"}},
    "expert_dropout": {"model": {"adapter": {"dropout": 0.05}}},  # ablation: the LoRA dropout default before
    "expert_sdpa": {"train": {"attention": "sdpa"}},  # ablation: PyTorch's SDPA kernel instead of eager
    "expert_full_head": {},  # ablation: TRL's CPU default, the LM head over every position (child_expert)
    "expert_input_casts": {},  # ablation: PEFT's fp32 round trip of every LoRA input under autocast (child_expert)
    "expert_as_before": {},  # both of the above: `expert train` before the two speed-ups (child_expert)
    # memory: with activations recomputed, the stored weights are most of the peak, which is where 4-bit helps
    "expert_checkpointing": {"train": {"gradient_checkpointing": True}},
    "expert_qlora_checkpointing": {"model": {"quantization": "4bit"}, "train": {"gradient_checkpointing": True}},
}


def child_expert(run_dir: Path, recipe_path: Path, variant: str) -> dict:
    from pipeline.recipe.schema import Recipe, load_recipe
    from pipeline.run.contracts import StageOptions
    from pipeline.run.rundir import open_run
    from pipeline.stages import train

    anonymous = track_peak_anonymous_memory()
    flops = matmul_flops()
    raw = load_recipe(recipe_path).model_dump(mode="json", by_alias=True)
    for section, changes in EXPERT_VARIANTS[variant].items():
        for key, value in changes.items():
            current = raw[section].get(key)
            raw[section][key] = {**current, **value} if isinstance(value, dict) else value
    recipe = Recipe.model_validate(raw)
    if variant in ("expert_full_head", "expert_as_before"):
        from pipeline.training import speedups

        speedups.compact_lm_head_on_cpu = lambda: "the every-position ablation"
    if variant in ("expert_input_casts", "expert_as_before"):
        from pipeline.training import speedups

        speedups.skip_lora_input_casts = lambda model: 0
    record = count_steps()
    ended = {}
    from transformers import Trainer

    original_evaluate = Trainer.evaluate

    def evaluate(self, *args, **kwargs):  # the final validation is not training time
        ended.setdefault("t", time.perf_counter())
        return original_evaluate(self, *args, **kwargs)

    Trainer.evaluate = evaluate
    params = base_parameters()
    train.run(recipe, open_run(run_dir), StageOptions(resume=False, redo=frozenset({"train"})))  # each system trains
    return summarize(record, ended["t"], params, flops, anonymous)


def child_warm_quantized_cache() -> dict:
    """Quantize the base once into the 4-bit cache (`models.quantized_cache_dir`), so every QLoRA system is
    measured as a user's second and later runs load it: packed, without mapping the full-precision file."""
    from pipeline.inference import models
    from pipeline.recipe.schema import ModelSection

    source, _ = models.resolve_base(BASE)
    started = time.perf_counter()
    models.load_base_model(ModelSection(base=BASE, quantization="4bit"), source, models.resolve_precision("auto"))
    return {"seconds": time.perf_counter() - started}


def prepare(workdir: Path, examples: int, steps: int) -> Path:
    """A seeded BANKING77 sample through `expert prep`: about `examples` training rows."""
    import yaml

    from pipeline.recipe.schema import load_recipe
    from pipeline.run.rundir import init_run
    from pipeline.stages import prep

    with BANKING77.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(13).shuffle(rows)
    sample = rows[: round(examples / 0.9)]
    data = workdir / "banking77-sample.csv"
    with data.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(sample)
    recipe = {
        "name": "bench-banking77",
        "task": {"type": "classification", "instruction": "Classify the banking customer's message by intent.",
                 "min_examples_per_class": 1},  # a 1,000-row sample leaves rare intents with 1-2 rows
        "data": {"source": str(data), "fields": {"text": "text", "target": "category"},
                 "split": {"validation": 0.05, "test": 0.05, "seed": 13, "stratify": False}, "max_tokens": 256},
        # the expert's defaults otherwise: LoRA r=16, alpha 32, no dropout, every linear layer
        "model": {"base": BASE, "adapter": {"method": "lora", "r": 16, "alpha": 32}},
        "train": {"max_steps": steps, "batch_size": BATCH, "learning_rate": 2.0e-4, "logging_steps": 1, "eval_steps": 1000},
        "registry": {"model_name": "bench"},
    }
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(recipe_path)
    from pipeline.recipe.schema import dump_recipe

    prep.run(loaded, init_run(workdir / "run", loaded.name, dump_recipe(loaded), loaded.recipe_hash()))
    return recipe_path


def run_child(kind: str, workdir: Path, steps: int) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict], train_rows: int, steps: int) -> str:
    names = {"plain_trl": "(a) plain TRL SFTTrainer, default SFTConfig", "expert": "(b) expert train (LoRA)",
             "expert_qlora": "(c) expert train, QLoRA 4-bit",
             "expert_dropout": "(b) with LoRA dropout 0.05", "expert_sdpa": "(b) with SDPA attention",
             "expert_checkpointing": "(b) with gradient checkpointing",
             "expert_qlora_checkpointing": "(c) with gradient checkpointing",
             "expert_full_head": "(b) with TRL's every-position LM head",
             "expert_input_casts": "(b) with PEFT's LoRA input casts",
             "expert_as_before": "(b) as before: every-position LM head and PEFT's casts"}
    lines = [
        f"{BASE} ({next(iter(results.values()))['parameters'] / 1e6:,.0f}M parameters), {train_rows} BANKING77 "
        f"training rows, batch {BATCH}, {steps} steps (first left out), CPU threads: {os.cpu_count()}",
        "",
        "| system | real tokens/s | padding | median step | peak RSS | peak anonymous | bf16 GFLOP/s at the model's "
        "shapes | efficiency (bf16) | fp32 GFLOP/s 1024² | efficiency (fp32, as before) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        lines.append(
            f"| {names[key]} | {r['real_tokens_per_s']:.0f} | {r['padding_fraction']:.1%} | {r['median_step_s']:.2f} s "
            f"| {r['peak_rss_mb']:.0f} MB | {r['peak_anonymous_mb']:.0f} MB | {r['bf16_shapes_gflops']:.0f} "
            f"| {r['efficiency']:.1%} | {r['matmul_gflops']:.0f} | {r['efficiency_vs_fp32']:.1%} |"
        )
    a, b, c = results.get("plain_trl"), results.get("expert"), results.get("expert_qlora")
    lines.append("")
    if a and b:
        lines.append(f"- (b)/(a) real tokens/s: {b['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x")
    if b:
        lines.append(f"- (b) efficiency: {b['efficiency']:.1%} of the bf16 matmul rate at the model's shapes "
                     "(target >= 40%)")
    ablations = {  # variant: what (b) has that it lacks
        "expert_as_before": "(b) / (b) as before (target on an AMX machine >= 3x; on this AVX512-BF16 one: no slower)",
        "expert_full_head": "answer-only LM head: (b) / every-position head",
        "expert_input_casts": "LoRA input casts skipped: (b) / with PEFT's casts",
    }
    for key, label in ablations.items():
        if b and key in results:
            lines.append(f"- {label}, real tokens/s: {b['real_tokens_per_s'] / results[key]['real_tokens_per_s']:.2f}x")
    pairs = [("", b, c), (" with gradient checkpointing", results.get("expert_checkpointing"),
                          results.get("expert_qlora_checkpointing"))]
    for label, lora, qlora in pairs:
        if lora and qlora:
            lines.append(f"- QLoRA peak RSS / LoRA peak RSS{label}: {qlora['peak_rss_mb'] / lora['peak_rss_mb']:.0%} "
                         f"(target <= 60%); peak anonymous memory: "
                         f"{qlora['peak_anonymous_mb'] / lora['peak_anonymous_mb']:.0%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="per-step batch size of every system")
    parser.add_argument("--only", nargs="*", default=["plain_trl", "expert", "expert_qlora"],
                        choices=["plain_trl", *EXPERT_VARIANTS],
                        help="systems to run (ablations: expert_dropout, expert_sdpa; memory: expert_checkpointing, "
                             "expert_qlora_checkpointing)")
    parser.add_argument("--base", help="model directory to train instead of the embedded SmolLM2-135M")
    parser.add_argument("--child")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.child:
        run_dir = args.workdir / "run"
        if args.child == "plain_trl":
            result = child_plain_trl(run_dir, args.steps)
        elif args.child == "warm_quantized_cache":
            result = child_warm_quantized_cache()
        else:
            result = child_expert(run_dir, args.workdir / "recipe.yaml", args.child)
        print(json.dumps(result))
        return
    os.environ["BENCH_TRAIN_BATCH"] = str(args.batch)
    global BATCH, BASE
    BATCH = args.batch
    if args.base:
        BASE = os.environ["BENCH_TRAIN_BASE"] = str(Path(args.base).resolve())
    if not BANKING77.is_file():
        raise SystemExit(f"{BANKING77} is missing: this benchmark needs ../shared/data/banking77")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.examples, args.steps)
        train_rows = len((workdir / "run/prep/train.jsonl").read_text().splitlines())
        if any("quantization" in EXPERT_VARIANTS.get(kind, {}).get("model", {}) for kind in args.only):
            run_child("warm_quantized_cache", workdir, args.steps)
        results = {kind: run_child(kind, workdir, args.steps) for kind in args.only}
    print(table(results, train_rows, args.steps))


if __name__ == "__main__":
    main()
