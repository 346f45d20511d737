"""What eval's MLflow logging costs: its share of `expert eval`'s wall time, measured in the same eval run.

    .venv/bin/python benchmarks/eval_logging.py runs/teacher-student/student-gold --work runs/eval-logging \\
        [--shipped recipes/banking77.yaml]

Copies a trained run directory (BANKING77's: 1,002 test rows) and runs `expert eval` on the copy: with the
expert and a recorded frontier (the gold label on 95% of the rows, another label elsewhere;
`benchmarks/routing_real.py` makes it), the quickest eval and so the largest share, against the default
SQLite store and against a local `mlflow server`; with `--shipped RECIPE`, also with that shipped recipe's
baselines (`recipes/banking77.yaml`: the base model zero-shot and 8-shot, ~20 min here) against the server. Eval writes
`eval/timings.json` (the stage's seconds, MLflow logging's seconds: params, datasets, metrics, artifacts, one
trace per test example, the description); the script prints both and their ratio.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.routing_real import recorded_frontier  # noqa: E402
from tests.support.mlflow_server import mlflow_server  # noqa: E402

EXPERT = str(Path(sys.executable).parent / "expert")


def eval_once(trained: Path, work: Path, store: str, env: dict[str, str], baselines: list[dict]) -> dict:
    """One `expert eval` on a fresh copy of `trained`, with `baselines` in place of its recipe's."""
    label = f"{store}, {' + '.join(['expert'] + [b['name'] for b in baselines])}"
    run = work / label.replace(", ", "-").replace(" ", "_").replace("+", "and")
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("run.lock", "push"))
    command = [EXPERT, "eval", str(run / "recipe.yaml"), "--run-dir", str(run), "--set",
               f"eval.baselines={json.dumps(baselines)}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env=env, stdout=subprocess.DEVNULL)
    timings = json.loads((run / "eval/timings.json").read_text(encoding="utf-8"))
    rows = len((run / "prep/test.jsonl").read_text(encoding="utf-8").splitlines())
    return {"eval": label, "test_rows": rows, "command_s": time.perf_counter() - started, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run directory")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shipped", type=Path, help="a shipped recipe: also eval with its baselines")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    trained = args.run.resolve()
    frontier = work / "frontier.jsonl"
    recorded_frontier(trained, 0.95, frontier)
    recorded = [{"name": "frontier", "kind": "predictions", "path": str(frontier),
                 "price_per_mtok": {"input": 2.5, "output": 10.0}}]
    results = [eval_once(trained, work, "sqlite", {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"},
                         recorded)]
    with mlflow_server(work / "server") as uri:
        server = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        results.append(eval_once(trained, work, "server", server, recorded))
        if args.shipped:
            shipped = yaml.safe_load(args.shipped.read_text(encoding="utf-8"))["eval"]["baselines"]
            results.append(eval_once(trained, work, "server", server, shipped))
    print("| eval | test rows | eval stage s | MLflow logging s | share of the stage | per example ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['eval']} | {r['test_rows']:,} | {r['stage_s']:.1f} | {r['mlflow_logging_s']:.2f} | "
              f"{r['mlflow_logging_share']:.1%} | {1000 * r['mlflow_logging_s'] / r['test_rows']:.1f} |")
    (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
