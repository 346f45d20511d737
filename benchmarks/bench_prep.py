"""Benchmark the prep stage: BANKING77 wall time, and peak memory on a generated 1,000,000-row JSONL.

    .venv/bin/python benchmarks/bench_prep.py                 # both cases
    .venv/bin/python benchmarks/bench_prep.py banking77       # target: <= 30 s
    .venv/bin/python benchmarks/bench_prep.py million --rows 1000000   # target: peak RSS < 2 GB

Each case runs `expert prep` in a child process, exactly as a user would,
with the embedded SmolLM2 tokenizer and MLflow on a fresh SQLite store in a
temporary folder (its tables are created before the clock starts). The wall
time covers everything the command does: imports, reading, checks,
tokenising, splitting, writing, the report and the MLflow run; CPU time
(user + system) is reported next to it because this machine's 2 cores are
shared and wall time varies with the load. Peak RSS is the child's maximum
resident set size from the kernel (`wait4`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BANKING77_RECIPE = ROOT / "recipes" / "banking77.yaml"
# what the measured case changes in it (docs/BENCHMARKS.md, "Prep"): the 10%/20% split and a max_tokens no row
# exceeds, as tests/real/test_prep_shared_data.py preps it
BANKING77_VARIANT = {"split": {"validation": 0.1, "test": 0.2, "seed": 13, "stratify": True}, "max_tokens": 768}
WORDS = (
    "card account transfer refund payment balance charge fee limit pin atm cash top up exchange rate "
    "currency app phone verify identity address delivery arrived declined pending cancel statement "
    "bank cheque deposit salary wallet apple google virtual physical stolen lost frozen blocked why "
    "how when where can i my the a is was not still yet today yesterday week month please help"
).split()
LABELS = [f"intent_{i:02d}" for i in range(20)]


def run_prep(recipe: Path, workdir: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of `expert prep RECIPE` in a child process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", "from pipeline.run import tracking; tracking.client().search_experiments()"],
        env=env, check=True, capture_output=True, cwd=workdir,
    )
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "prep", str(recipe), "--run-dir", str(workdir / "run")],
        env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prep failed:\n{output}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def banking77_recipe(directory: Path) -> Path:
    """recipes/banking77.yaml with BANKING77_VARIANT in its `data` section, written to `directory`."""
    recipe = yaml.safe_load(BANKING77_RECIPE.read_text(encoding="utf-8"))
    recipe["data"]["source"] = str((BANKING77_RECIPE.parent / recipe["data"]["source"]).resolve())
    recipe["data"].update(BANKING77_VARIANT)
    path = directory / "banking77.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def bench_banking77() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, rss = run_prep(banking77_recipe(Path(tmp)), Path(tmp))
        stats = json.loads((Path(tmp) / "run/prep/stats.json").read_text())
    return {"case": "banking77", "rows_in": 10003, "rows_out": sum(stats["rows"].values()), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "peak_rss_mib": round(rss)}


def write_rows(path: Path, n: int) -> None:
    """n unique synthetic support messages (8-20 words) over 20 labels, one JSON object a line."""
    rng = random.Random(13)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            f.write(json.dumps({"id": f"m{i}", "text": f"{words} (ref {i})", "label": LABELS[i % len(LABELS)]}) + "\n")


def bench_million(rows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_rows(tmp / "messages.jsonl", rows)
        recipe = {
            "name": "bench-million",
            "task": {"type": "classification", "instruction": "Route the support message to one intent."},
            "data": {"source": str(tmp / "messages.jsonl"), "fields": {"id": "id", "text": "text", "target": "label"},
                     "max_tokens": 256},
            "model": {"base": "smollm2-135m-instruct"},
            "registry": {"model_name": "bench-million"},
        }
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        wall, cpu, rss = run_prep(tmp / "recipe.yaml", tmp)
        stats = json.loads((tmp / "run/prep/stats.json").read_text())
        size = (tmp / "messages.jsonl").stat().st_size
    return {"case": f"{rows:,}-row JSONL", "input_mib": round(size / 2**20), "rows_in": rows,
            "rows_out": sum(stats["rows"].values()), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mib": round(rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", choices=["banking77", "million", "all"], default="all")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated file (million case)")
    args = parser.parse_args()
    results = []
    if args.case in ("banking77", "all"):
        results.append(bench_banking77())
        print(json.dumps(results[-1]), flush=True)
    if args.case in ("million", "all"):
        results.append(bench_million(args.rows))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
