"""Benchmark: how long loading the embedded base model takes once it is converted.

    .venv/bin/python benchmarks/bench_load.py

The first call converts the GGUF file (once per cache); the timed loads read
the cached safetensors directory. The spine issue's target: under 5 s.
"""

from __future__ import annotations

import statistics
import time

from pipeline.inference import models
from pipeline.recipe.schema import ModelSection

ALIAS = "smollm2-135m-instruct"


def load_once() -> float:
    started = time.perf_counter()
    source, _ = models.resolve_base(ALIAS)
    models.load_tokenizer(source)
    models.load_base_model(ModelSection(base=ALIAS), source)
    return time.perf_counter() - started


def main() -> None:
    first = load_once()
    timings = [load_once() for _ in range(3)]
    print(f"first call (converts if the cache is empty): {first:.1f} s")
    print(f"cached load, median of 3: {statistics.median(timings):.2f} s (max {max(timings):.2f} s)")


if __name__ == "__main__":
    main()
