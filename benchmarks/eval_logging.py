"""What eval's MLflow logging costs: its share of `expert eval`'s wall time, measured in the same eval run.

    .venv/bin/python benchmarks/eval_logging.py runs/teacher-student/student-gold --work runs/eval-logging

Copies a trained run directory (BANKING77's: 1,002 test rows), adds a recorded frontier baseline (the gold
label on 95% of the rows, another label elsewhere; `benchmarks/routing_real.py` makes it) so every trace carries
two systems, and runs `expert eval` twice: against the default SQLite store and against a local `mlflow
server`. Eval writes `eval/timings.json` (the stage's seconds, MLflow logging's seconds: params, datasets,
metrics, artifacts, one trace per test example, the description); the script prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.routing_real import recorded_frontier  # noqa: E402
from tests.support.mlflow_server import mlflow_server  # noqa: E402

EXPERT = str(Path(sys.executable).parent / "expert")


def eval_once(trained: Path, work: Path, store: str, env: dict[str, str]) -> dict:
    run = work / store
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("run.lock", "push"))
    frontier = work / "frontier.jsonl"
    recorded_frontier(run, 0.95, frontier)
    baselines = [{"name": "frontier", "kind": "predictions", "path": str(frontier),
                  "price_per_mtok": {"input": 2.5, "output": 10.0}}]
    command = [EXPERT, "eval", str(run / "recipe.yaml"), "--run-dir", str(run), "--set",
               f"eval.baselines={json.dumps(baselines)}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env=env, stdout=subprocess.DEVNULL)
    timings = json.loads((run / "eval/timings.json").read_text(encoding="utf-8"))
    rows = len((run / "prep/test.jsonl").read_text(encoding="utf-8").splitlines())
    return {"store": store, "test_rows": rows, "command_s": time.perf_counter() - started, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run directory")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "EXPERT_CACHE": os.environ.get("EXPERT_CACHE", str(Path.home() / ".cache/expert"))}
    results = [eval_once(args.run.resolve(), work, "sqlite", {**base_env, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"})]
    with mlflow_server(work / "server") as uri:
        results.append(eval_once(args.run.resolve(), work, "server", {**base_env, "MLFLOW_TRACKING_URI": uri}))
    print("| store | test rows | eval stage s | MLflow logging s | share of the stage | per example ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['store']} | {r['test_rows']:,} | {r['stage_s']:.1f} | {r['mlflow_logging_s']:.2f} | "
              f"{r['mlflow_logging_share']:.1%} | {1000 * r['mlflow_logging_s'] / r['test_rows']:.1f} |")
    (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
