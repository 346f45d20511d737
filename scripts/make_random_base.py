"""A randomly initialised model with a larger SmolLM2's shape, for memory benchmarks only.

    .venv/bin/python scripts/make_random_base.py --shape smollm2-1.7b --out /tmp/smollm2-1.7b-random

Why: this machine cannot download the larger SmolLM2 checkpoints, and memory
and speed do not depend on the weights' values. The directory gets the shape's
config (sizes from `benchmarks/bench_gpu.py`'s SHAPES), bf16 safetensors, and the
embedded SmolLM2-135M tokenizer (the family shares its 49,152-token
vocabulary), so `benchmarks/bench_train.py --base DIR` trains it like any base.
Its answers are noise: never evaluate or ship it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import SHAPES  # noqa: E402  (the published configs' sizes, kept in one place)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s.startswith("smollm2")], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.inference import models

    source, _ = models.resolve_base("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    models.load_tokenizer(source).save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {args.shape} shape, {params / 1e6:,.0f}M parameters, random weights (benchmarks only)")


if __name__ == "__main__":
    main()
