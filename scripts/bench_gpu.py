"""GPU training throughput: LoRA and QLoRA steps on SmolLM2-135M- and Llama-3-8B-shaped models.

Speed depends on a model's shapes, not its weights, so both models are
randomly initialised from their configurations (nothing to download: a lent
GPU machine reaches no hub). Each case trains a LoRA adapter (r=16 on every
linear layer but the LM head) with AdamW in bf16 on full batches of random
tokens (no padding, so every token is a real one), after warm-up steps, and
prints real tokens/s, median step time, peak GPU memory and

    MFU = 4 x parameters x tokens/s / bf16 matmul rate

where the matmul rate is measured in the same process (8192^3 products), and
4 x parameters is a LoRA step's work per token: forward plus the backward
pass to the activations; the frozen base needs no weight gradients.

    python scripts/bench_gpu.py                       # on a GPU: the table
    python scripts/bench_gpu.py --cpu-smoke           # on a CPU: tiny shapes, checks the script itself
    python scripts/bench_gpu.py --json out.json       # also write the rows

QLoRA quantises every linear layer but the LM head to bitsandbytes nf4 with
double quantisation in place on the GPU (as `model.quantization: 4bit`
loads them), computing in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    # HuggingFaceTB/SmolLM2-1.7B-Instruct (scripts/make_random_base.py: CPU memory benchmarks)
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0),
    # Meta-Llama-3-8B
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # --cpu-smoke only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def build_model(shape: str, device: str, attention: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: an 8B model never passes through host memory
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation=attention
        )


def quantize_4bit(model, device: str) -> None:
    """Every linear layer but the LM head becomes a bitsandbytes nf4 layer (double quantisation, bf16 compute)."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name in TARGETS:
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="cpu",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                setattr(module, name, quantized.to(device))  # quantised on the move to the GPU
                del child
    if device == "cuda":
        torch.cuda.empty_cache()


def run_case(shape: str, method: str, batch: int, seq: int, steps: int, warmup: int, device: str,
             attention: str, bf16_rate: float) -> dict:
    from peft import LoraConfig, get_peft_model

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(shape, device, attention)
    parameters = sum(p.numel() for p in model.parameters())
    if method == "qlora":
        quantize_4bit(model, device)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        _sync(device)
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    tokens_per_s = batch * seq * len(times) / sum(times)
    row = {
        "model": shape,
        "method": method,
        "parameters": parameters,
        "batch": batch,
        "seq": seq,
        "tokens_per_s": tokens_per_s,
        "median_step_s": statistics.median(times),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "mfu": 4 * parameters * tokens_per_s / bf16_rate,
        "final_loss": loss.item(),
    }
    del model, optimizer
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,llama3-8b")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", default="sdpa", help="sdpa (PyTorch picks its flash kernel on Hopper), eager")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    if args.cpu_smoke:
        device, models, methods = "cpu", ["tiny"], ["lora"]  # bitsandbytes 4-bit layers need the GPU path here
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1
        rate = matmul_rate("cpu", torch.float32, 256)
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; run with --cpu-smoke to check the script on a CPU", file=sys.stderr)
        return 2
    else:
        device, models, methods = "cuda", args.models.split(","), args.methods.split(",")
        rate = matmul_rate("cuda", torch.bfloat16, 8192)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; measured {'bf16' if device == 'cuda' else 'fp32'} matmul rate {rate / 1e12:.1f} TFLOP/s",
          flush=True)
    rows = []
    for shape in models:
        for method in methods:
            row = run_case(shape, method, args.batch, args.seq, args.steps, args.warmup, device, args.attention, rate)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"| model | method | tokens/s | median step | peak GPU memory | MFU |  ({name}, batch {args.batch} x {args.seq})")
    print("|---|---|---|---|---|---|")
    for r in rows:
        memory = f"{r['peak_gpu_mb'] / 1024:.1f} GiB" if r["peak_gpu_mb"] is not None else "-"
        print(f"| {r['model']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['median_step_s'] * 1000:.0f} ms | "
              f"{memory} | {r['mfu']:.1%} |")
    by_case = {(r["model"], r["method"]): r for r in rows}
    for shape in models:
        if (shape, "lora") in by_case and (shape, "qlora") in by_case:
            ratio = by_case[(shape, "qlora")]["median_step_s"] / by_case[(shape, "lora")]["median_step_s"]
            print(f"{shape}: QLoRA step time / LoRA step time = {ratio:.2f}x (target <= 1.5x)")
    if ("llama3-8b", "lora") in by_case:
        print(f"llama3-8b LoRA MFU {by_case[('llama3-8b', 'lora')]['mfu']:.1%} (target >= 35% on an H100)")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "matmul_rate": rate, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
