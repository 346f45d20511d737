"""GPU training throughput through `expert train`'s own path: LoRA and QLoRA, with and without gradient
checkpointing, on a Llama-3-8B-width model with a few layers and on a SmolLM2-135M-shaped model.

Speed depends on a model's shapes, not its weights, so each base is written with random bf16 weights to local
disk first (a lent GPU machine reaches no hub) with a small offline tokenizer (`tests/support/tiny_model.py`;
the model's own vocabulary size, e.g. Llama-3's 128,256, sets the LM head's cost). Each case then runs what
`expert train` runs: `setup.training_settings` (precision, attention, padding-free),
`setup.to_sft_config`, `setup.load_for_training` (4-bit quantized onto the GPU for QLoRA),
`setup.build_trainer` (TRL's SFTTrainer on prep-shaped prompt/completion rows of `--seq` tokens, loss on
the answer) and `trainer.train()`, with validation and checkpoints off. Reported per case, after `--warmup` steps:

- real (non-padding) tokens/s over the measured steps, and the median step time;
- peak allocated and reserved GPU memory, the counters reset after the model and trainer are built;
- MFU = model FLOPs per token x tokens/s / rate, where model FLOPs per token = 4 x matmul parameters (every
  linear layer and the LM head: forward, plus the backward pass to the activations; the frozen base needs no
  weight gradients) + 6 x layers x hidden x sequence (causal attention's two products, forward and backward,
  halved for the causal mask). Gradient checkpointing's recomputation is not counted (it is not model work).
  The rate is the card's dense bf16 spec (H100/H200 SXM: 989 TFLOP/s) and, beside it, a bf16 matmul rate
  measured in the same process (8192^3 products).

    python benchmarks/bench_gpu.py                     # on a GPU: the table; exit 1 on a missed target (below)
    python benchmarks/bench_gpu.py --cpu-smoke         # on a CPU: tiny shapes through the same path, checks the script
    python benchmarks/bench_gpu.py --json out.json     # also write the rows
    python benchmarks/bench_gpu.py --eval-only --cpu   # eval's label scoring alone, on this CPU (the ratio's other side)

Eval's label scoring is measured on the SmolLM2-135M-shaped model in bf16: `answering.classify` (the code eval
and serving use) on `--eval-examples` ticket texts from data/ with 77 two-word labels (BANKING77's count),
batch 32, after one warm-up batch; examples/s. Random weights make every label about equally likely, so
first-token pruning keeps most labels: a worst case for the scorer, on both devices alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    # HuggingFaceTB/SmolLM2-1.7B-Instruct (scripts/make_random_base.py: CPU memory benchmarks)
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0),
    # Meta-Llama-3-8B (the GPU table uses its width with --layers layers)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # --cpu-smoke only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}
# dense bf16 tensor-core FLOP/s from the vendors' data sheets (SXM parts), by a name fragment of the device
BF16_SPEC = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def matmul_rate(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n product, the mean of `repeats` after three warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bf16_spec(name: str) -> float | None:
    return next((rate for fragment, rate in BF16_SPEC.items() if fragment in name), None)


def write_tokenizer(out: Path) -> Path:
    from tests.support.tiny_model import build_tiny_model

    texts = [json.loads(line)["text"] for line in (ROOT / "data/tickets/tickets.jsonl").read_text().splitlines()]
    return build_tiny_model(out, texts)


def write_base(shape: str, layers: int, tokenizer_dir: Path, out: Path, device: str) -> Path:
    """A random-weight base of `shape` with `layers` layers, in bf16 safetensors, plus the offline tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    vocab = max(SHAPES[shape]["vocab_size"], len(AutoTokenizer.from_pretrained(tokenizer_dir)))  # every id embeds
    sizes = {**SHAPES[shape], "num_hidden_layers": layers, "vocab_size": vocab}
    config = LlamaConfig(**sizes, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast; 2 GB of bf16 never passes through Python lists
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(item, out / item.name)
    return out


def write_rows(run_dir: Path, tokenizer_dir: Path, seq: int, rows: int) -> None:
    """prep/train.jsonl and validation.jsonl: prompt/completion rows whose rendered chat is `seq` tokens or a
    few under, so batches carry (almost) no padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = "order invoice parcel refund password account charge delivery address broken screen login".split()
    lines = []
    for i in range(rows):
        answer = [{"role": "assistant", "content": words[i % len(words)]}]
        text, n = "", 0
        while True:
            longer = text + " " + words[(i + n) % len(words)]
            chat = [{"role": "user", "content": longer}] + answer
            if len(tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]) > seq:
                break
            text, n = longer, n + 1
        lines.append(json.dumps({"prompt": [{"role": "user", "content": text}], "completion": answer}))
    (run_dir / "prep").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        (run_dir / f"prep/{split}.jsonl").write_text("\n".join(lines) + "\n")


def recipe_for(base: Path, method: str, checkpointing: bool, batch: int, seq: int, steps: int):
    import yaml

    from pipeline.recipe.schema import Recipe

    raw = yaml.safe_load((ROOT / "recipes/ticket-classification.yaml").read_text())
    raw["data"]["source"] = str((ROOT / "recipes" / raw["data"]["source"]).resolve())
    raw["data"]["max_tokens"] = seq + 16  # rows are rendered to `seq` tokens or a few under
    raw["model"].update(base=str(base), quantization="4bit" if method == "qlora" else "none")
    raw["train"] = {**raw.get("train", {}), "max_steps": steps, "batch_size": batch, "gradient_accumulation": 1,
                    "gradient_checkpointing": checkpointing, "logging_steps": 1, "eval_steps": steps}
    return Recipe.model_validate(raw)


def step_clock(device: str):
    """A Trainer callback recording (wall time, real tokens seen) at the end of every step, device synchronised."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.ends.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepClock()


def model_flops_per_token(model, seq: int) -> tuple[int, float]:
    """(matmul parameters, model FLOPs per token) of a LoRA step, as the module docstring counts them: every
    linear layer of the base (4-bit ones included) and the LM head; the rank-16 LoRA products are left out."""
    config = model.config
    matmul = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    attention = 6 * config.num_hidden_layers * config.hidden_size * seq
    return matmul, 4 * matmul + attention


def run_case(base: Path, run_dir: Path, shape: str, method: str, checkpointing: bool, batch: int, seq: int,
             steps: int, warmup: int, device: str, spec: float | None, measured: float) -> dict:
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    from pipeline.inference import models
    from pipeline.run.rundir import RunDir
    from pipeline.training import setup

    recipe = recipe_for(base, method, checkpointing, batch, seq, warmup + steps)
    settings = setup.training_settings(recipe)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        config = setup.to_sft_config(recipe.train, Path(tmp), recipe.data.max_tokens, settings)
        config.eval_strategy, config.save_strategy, config.load_best_model_at_end = (
            IntervalStrategy.NO, SaveStrategy.NO, False)
        _, base_record = models.resolve_base(str(base))  # what prep records and training loads by
        _, tokenizer, model = setup.load_for_training(recipe, base_record, settings, "single", config.device)
        clock = step_clock(device)
        trainer = setup.build_trainer(recipe, RunDir(run_dir), config, tokenizer, model, [clock])
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
        matmul, flops = model_flops_per_token(model, seq)
    measured_ends = clock.ends[warmup - 1:]  # from the end of the last warm-up step
    (t0, n0), (t1, n1) = measured_ends[0], measured_ends[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    step_times = [b[0] - a[0] for a, b in zip(measured_ends, measured_ends[1:])]
    row = {
        "model": shape, "method": method, "checkpointing": checkpointing, "batch": batch, "seq": seq,
        "precision": settings["precision"], "attention": settings["attention"], "padding_free": settings["padding_free"],
        "matmul_parameters": matmul, "tokens_per_s": tokens_per_s, "median_step_s": statistics.median(step_times),
        "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if device == "cuda" else None,
        "mfu_spec": flops * tokens_per_s / spec if spec else None,
        "mfu_measured": flops * tokens_per_s / measured,
        "train_loss": result.training_loss,
    }
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


INTENTS = [f"{a}_{b}" for a in ("card", "transfer", "account", "payment", "refund", "cash", "pin")
           for b in ("arrival", "declined", "limit", "fee", "lost", "pending", "reversed", "verify", "cancel",
                     "change", "request")]  # 77 labels, BANKING77's count, sharing first words as its intents do


def eval_case(base: Path, device: str, examples: int, batch: int) -> dict:
    """examples/s of `answering.classify` (eval's and serving's label scorer) on the base in bf16."""
    from transformers import AutoModelForCausalLM

    from pipeline.inference import answering, models

    tokenizer = models.load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16, attn_implementation="sdpa",
        device_map=models.inference_device_map() if device == "cuda" else None).eval()
    texts = [json.loads(line)["text"] for line in (ROOT / "data/tickets/tickets.jsonl").read_text().splitlines()]
    texts = (texts * (examples // len(texts) + 1))[:examples]
    prompts = [[{"role": "system", "content": "Classify the banking query into one intent."},
                {"role": "user", "content": t}] for t in texts]
    answering.classify(model, tokenizer, prompts[:batch], INTENTS, batch)  # warm-up: kernels, caches
    _sync(device)
    started = time.perf_counter()
    rows = answering.classify(model, tokenizer, prompts, INTENTS, batch)
    _sync(device)
    seconds = time.perf_counter() - started
    assert all(r["prediction"] in INTENTS for r in rows)
    return {"case": "eval label scoring", "device": device, "examples": examples, "labels": len(INTENTS),
            "batch": batch, "examples_per_s": examples / seconds, "threads": torch.get_num_threads()}


def print_table(rows: list[dict], name: str, spec: float | None, measured: float) -> None:
    print(f"\n{name}: bf16 spec {spec / 1e12 if spec else float('nan'):.0f} TFLOP/s, measured matmul "
          f"{measured / 1e12:.1f} TFLOP/s")
    print("| model | method | checkpointing | tokens/s | median step | peak allocated | peak reserved | MFU (spec) "
          "| MFU (measured) |")
    print("|---|---|---|---|---|---|---|---|---|")

    def gib(mb: float | None) -> str:
        return f"{mb / 1024:.1f} GiB" if mb is not None else "-"

    for r in rows:
        spec_mfu = f"{r['mfu_spec']:.1%}" if r["mfu_spec"] is not None else "-"
        print(f"| {r['model']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['tokens_per_s']:,.0f} | "
              f"{r['median_step_s'] * 1000:.0f} ms | {gib(r['peak_allocated_mb'])} | {gib(r['peak_reserved_mb'])} | "
              f"{spec_mfu} | {r['mfu_measured']:.1%} |")
    by_case = {(r["model"], r["method"], r["checkpointing"]): r for r in rows}
    for (model, method, checkpointing), r in by_case.items():
        if method == "qlora" and (model, "lora", checkpointing) in by_case:
            ratio = r["median_step_s"] / by_case[(model, "lora", checkpointing)]["median_step_s"]
            print(f"{model} (checkpointing {'on' if checkpointing else 'off'}): QLoRA step / LoRA step = {ratio:.2f}x "
                  "(target <= 1.5x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama3-8b,smollm2-135m")
    parser.add_argument("--layers", type=int, default=4, help="layers of the llama3-8b-width model")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates (at least 1)")
    parser.add_argument("--eval-examples", type=int, default=512)
    parser.add_argument("--cpu-eval-examples", type=int, default=64, help="the CPU side of the eval ratio, on a GPU")
    parser.add_argument("--eval-only", action="store_true", help="only eval's label scoring on the 135M shape")
    parser.add_argument("--cpu", action="store_true", help="with --eval-only: on this CPU")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step's end is where the clock starts")

    if args.cpu_smoke:
        device, shapes = "cpu", ["tiny"]
        args.batch, args.seq, args.steps, args.warmup, args.eval_examples = 2, 48, 2, 1, 16
        measured, name = matmul_rate("cpu", torch.bfloat16, 512), "CPU"
    elif args.eval_only and args.cpu:
        device, shapes, measured, name = "cpu", [], 0.0, "CPU"
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here, nothing measured (--cpu-smoke runs tiny shapes through the same path)",
              file=sys.stderr)
        return 3
    else:
        device, shapes = "cuda", args.models.split(",")
        measured, name = matmul_rate("cuda", torch.bfloat16, 8192), torch.cuda.get_device_name()
    spec = bf16_spec(name) if device == "cuda" else None
    print(f"device: {name}; measured bf16 matmul rate {measured / 1e12:.2f} TFLOP/s", flush=True)
    rows, evals = [], []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-bases-") as tmp:
        tokenizer_dir = write_tokenizer(Path(tmp) / "tokenizer")
        run_dir = Path(tmp) / "run"
        write_rows(run_dir, tokenizer_dir, args.seq, args.batch * 4)
        for shape in [] if args.eval_only else shapes:
            layers = args.layers if shape == "llama3-8b" else SHAPES[shape]["num_hidden_layers"]
            started = time.perf_counter()
            base = write_base(shape, layers, tokenizer_dir, Path(tmp) / shape, device)
            print(f"{shape} ({layers} layers) written in {time.perf_counter() - started:.0f}s", flush=True)
            for method in args.methods.split(","):
                for checkpointing in (c == "on" for c in args.checkpointing.split(",")):
                    row = run_case(base, run_dir, f"{shape}x{layers}", method, checkpointing, args.batch, args.seq,
                                   args.steps, args.warmup, device, spec, measured)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            shutil.rmtree(base)
        eval_shape = "tiny" if args.cpu_smoke else "smollm2-135m"
        base = write_base(eval_shape, SHAPES[eval_shape]["num_hidden_layers"], tokenizer_dir, Path(tmp) / "eval", device)
        evals.append(eval_case(base, device, args.eval_examples, 32))
        print(json.dumps(evals[-1]), flush=True)
        if device == "cuda":  # the ratio's other side, on this machine's CPU
            evals.append(eval_case(base, "cpu", args.cpu_eval_examples, 32))
            print(json.dumps(evals[-1]), flush=True)
    if rows:
        print_table(rows, name, spec, measured)
    for e in evals:
        print(f"\neval label scoring ({eval_shape}, {e['labels']} labels, batch {e['batch']}) on {e['device']}: "
              f"{e['examples_per_s']:,.1f} examples/s")
    missed = missed_targets(rows, evals) if device == "cuda" and not args.eval_only else []
    for line in missed:
        print(f"bench_gpu: target missed: {line}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "bf16_spec": spec, "matmul_rate": measured, "rows": rows,
                                         "eval": evals, "missed_targets": missed}, indent=1))
    return 1 if missed else 0


LORA_MFU_TARGET = 0.35  # LoRA on the Llama-3-8B-width model, of the card's bf16 spec
QLORA_STEP_RATIO_TARGET = 1.5  # QLoRA's median step within this multiple of LoRA's, same model and checkpointing
EVAL_SPEEDUP_TARGET = 20.0  # eval's label scoring on the GPU against the same machine's CPU, examples/s


def missed_targets(rows: list[dict], evals: list[dict]) -> list[str]:
    """The targets a GPU run missed, one line each; a target whose measurement is absent counts as missed."""
    missed = []
    lora_8b = [r for r in rows if r["model"].startswith("llama3-8b") and r["method"] == "lora"]
    if not lora_8b:
        missed.append("no LoRA row on the llama3-8b-width model")
    for r in lora_8b:
        if r["mfu_spec"] is None or r["mfu_spec"] < LORA_MFU_TARGET:
            got = "no bf16 spec for this card" if r["mfu_spec"] is None else f"{r['mfu_spec']:.1%}"
            missed.append(f"LoRA {r['model']} checkpointing {'on' if r['checkpointing'] else 'off'}: MFU {got} "
                          f"< {LORA_MFU_TARGET:.0%} of the bf16 spec")
    by_case = {(r["model"], r["method"], r["checkpointing"]): r for r in rows}
    for (model, method, checkpointing), r in by_case.items():
        lora = by_case.get((model, "lora", checkpointing))
        if method == "qlora" and lora and r["median_step_s"] > QLORA_STEP_RATIO_TARGET * lora["median_step_s"]:
            missed.append(f"QLoRA {model} checkpointing {'on' if checkpointing else 'off'}: step "
                          f"{r['median_step_s'] / lora['median_step_s']:.2f}x LoRA's > {QLORA_STEP_RATIO_TARGET}x")
    gpu = [e for e in evals if e["device"] == "cuda"]
    cpu = [e for e in evals if e["device"] == "cpu"]
    if not (gpu and cpu):
        missed.append("eval label scoring was not measured on both the GPU and the CPU")
    elif gpu[0]["examples_per_s"] < EVAL_SPEEDUP_TARGET * cpu[0]["examples_per_s"]:
        missed.append(f"eval label scoring: GPU {gpu[0]['examples_per_s']:,.1f} examples/s is "
                      f"{gpu[0]['examples_per_s'] / cpu[0]['examples_per_s']:.1f}x the CPU's < {EVAL_SPEEDUP_TARGET:.0f}x")
    return missed


if __name__ == "__main__":
    sys.exit(main())
