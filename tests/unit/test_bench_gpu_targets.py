"""benchmarks/bench_gpu.py fails a GPU run on a missed target: each target at its edge."""

from __future__ import annotations

from benchmarks.bench_gpu import missed_targets


def row(method: str, checkpointing: bool, mfu: float | None, step_s: float, model: str = "llama3-8bx4") -> dict:
    return {"model": model, "method": method, "checkpointing": checkpointing, "mfu_spec": mfu, "median_step_s": step_s}


EVALS = [{"device": "cuda", "examples_per_s": 64.0}, {"device": "cpu", "examples_per_s": 3.2}]


def test_a_run_at_every_targets_edge_passes():
    rows = [row("lora", False, 0.35, 1.0), row("qlora", False, None, 1.5), row("lora", False, None, 0.1, "smollm2-135mx30")]
    assert missed_targets(rows, EVALS) == []


def test_each_missed_target_is_named():
    rows = [row("lora", True, 0.349, 1.0), row("qlora", True, None, 1.51)]
    missed = missed_targets(rows, [{"device": "cuda", "examples_per_s": 63.9}, EVALS[1]])
    assert len(missed) == 3 and "MFU 34.9%" in missed[0] and "1.51x" in missed[1] and "20x" in missed[2], missed


def test_a_measurement_left_out_is_a_miss():
    assert len(missed_targets([], EVALS[:1])) == 2  # no 8B LoRA row, no CPU side of the eval ratio
    assert "no bf16 spec" in missed_targets([row("lora", False, None, 1.0)], EVALS)[0]
