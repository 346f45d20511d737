"""What eval's MLflow logging costs: its share of `expert eval`'s wall time, measured in the same eval run.

    .venv/bin/python benchmarks/eval_logging.py runs/teacher-student/student-gold --work runs/eval-logging \\
        [--shipped recipes/banking77.yaml [--shipped-only]]

Copies a trained run directory (BANKING77's: 1,002 test rows) and runs `expert eval` on the copy: with the
expert and a recorded frontier (the gold label on 95% of the rows, another label elsewhere;
`benchmarks/routing_real.py` makes it), the quickest eval and so the largest share, against the default
SQLite store and against a local `mlflow server`; with `--shipped RECIPE`, also with that shipped recipe's
baselines (`recipes/banking77.yaml`: the base model zero-shot and 8-shot, ~20 min here) against the server. Eval writes
`eval/timings.json` (the stage's seconds, MLflow logging's seconds: params, datasets, metrics, artifacts, one
trace per test example, the description); the script prints both and their ratio. Each eval also runs once
with the per-example traces switched off, one after the other (on this shared machine such pairs move by tens
of seconds either way).

    .venv/bin/python benchmarks/eval_logging.py runs/teacher-student/student-gold --work runs/eval-logging \\
        --interleaved

measures the traces in one process instead (`interleaved`): the expert's inference on eval's runtime, the
upload of as many traces alone, and both at once, chunk by chunk in rotating order, against SQLite and a local
`mlflow server`.
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

EXPERT = [str(Path(sys.executable).parent / "expert")]
# the same CLI with the per-example traces switched off: the arm that measures what they add to the wall time
EXPERT_WITHOUT_TRACES = [sys.executable, "-c",
                         "import sys; from pipeline import cli; from pipeline.evaluation import traces as eval_traces; "
                         "eval_traces.log_examples = lambda *args, **kwargs: 0; sys.argv[0] = 'expert'; cli.app()"]


def eval_once(trained: Path, work: Path, store: str, env: dict[str, str], baselines: list[dict],
              traces: bool = True) -> dict:
    """One `expert eval` on a fresh copy of `trained`, with `baselines` in place of its recipe's; `traces=False`:
    without the per-example traces (everything else is logged)."""
    label = f"{store}, {' + '.join(['expert'] + [b['name'] for b in baselines])}{'' if traces else ', no traces'}"
    run = work / label.replace(", ", "-").replace(" ", "_").replace("+", "and")
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("run.lock", "push"))
    command = [*(EXPERT if traces else EXPERT_WITHOUT_TRACES), "eval", str(run / "recipe.yaml"), "--run-dir", str(run), "--set",
               f"eval.baselines={json.dumps(baselines)}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env=env, stdout=subprocess.DEVNULL)
    timings = json.loads((run / "eval/timings.json").read_text(encoding="utf-8"))
    rows = len((run / "prep/test.jsonl").read_text(encoding="utf-8").splitlines())
    return {"eval": label, "store": store, "traces": traces, "test_rows": rows,
            "command_s": time.perf_counter() - started, **timings}


def interleaved(trained: Path, uri: str, chunks: int, chunk_rows: int, http_workers: int) -> dict:
    """The expert's test inference as eval runs it (on eval's runtime) against the upload of as many traces, in
    one process, chunk by chunk, three arms in turn: the chunk's inference alone, the upload of `chunk_rows` traces
    alone (as eval uploads them, after inference), and both at once (the upload on a background thread, as an
    overlapping design would run it). The arms rotate per chunk, so the machine's drift falls on all three."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow

    from pipeline.evaluation import traces as eval_traces
    from pipeline.evaluation.inference import load_expert, read_split
    from pipeline.inference import answering, runtime
    from pipeline.recipe.schema import load_recipe
    from pipeline.run import contracts
    from pipeline.run.rundir import open_run

    recipe = load_recipe(trained / "recipe.yaml")
    record = contracts.read_record(trained / "train/record.json", contracts.TrainRecord)
    model, tokenizer = load_expert(recipe, record, trained / "train/adapter")
    model, _ = runtime.prepare(model, recipe)
    spec = json.loads((trained / "prep/spec.json").read_text(encoding="utf-8"))["spec"]
    test = read_split(open_run(trained), "test")
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(f"interleaved-{time.time_ns()}")
    run_id = client.create_run(experiment).info.run_id
    payload_rows = test[:chunk_rows]
    answers = answering.answer(model, tokenizer, [r["prompt"] for r in payload_rows], recipe, spec)  # also warms up
    payload = {"expert": answers, "frontier": [{"prediction": r["target"]} for r in payload_rows]}
    eval_traces.HTTP_WORKERS = http_workers
    seconds = {"inference": 0.0, "upload": 0.0, "inference_while_uploading": 0.0, "wait": 0.0}
    arms = ("inference", "upload", "overlapped")
    with ThreadPoolExecutor(1) as background:
        for i in range(chunks):
            start = (i * chunk_rows) % (len(test) - chunk_rows)
            prompts = [r["prompt"] for r in test[start:start + chunk_rows]]
            for arm in arms[i % 3:] + arms[:i % 3]:  # each arm first, second and third in turn
                started = time.perf_counter()
                if arm == "inference":
                    answering.answer(model, tokenizer, prompts, recipe, spec)
                    seconds["inference"] += time.perf_counter() - started
                elif arm == "upload":
                    eval_traces.log_examples(uri, experiment, run_id, payload_rows, payload)
                    seconds["upload"] += time.perf_counter() - started
                else:
                    upload = background.submit(eval_traces.log_examples, uri, experiment, run_id, payload_rows,
                                               payload)
                    answering.answer(model, tokenizer, prompts, recipe, spec)
                    seconds["inference_while_uploading"] += time.perf_counter() - started
                    started = time.perf_counter()
                    upload.result()
                    seconds["wait"] += time.perf_counter() - started
    overlapped = seconds["inference_while_uploading"] + seconds["wait"] - seconds["inference"]
    return {**seconds, "rows": chunks * chunk_rows, "http_workers": http_workers,
            "upload_share": seconds["upload"] / seconds["inference"], "overlapped_s": overlapped,
            "overlapped_share": overlapped / seconds["inference"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run directory")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shipped", type=Path, help="a shipped recipe: also eval with its baselines")
    parser.add_argument("--shipped-only", action="store_true",
                        help="with --shipped: only that eval, with its traces, against the default SQLite store")
    parser.add_argument("--interleaved", action="store_true",
                        help="measure the upload against the expert's inference in one process, chunk by chunk in "
                             "turn (instead of whole evals, whose pairs this shared machine makes too noisy)")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, default=64)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    trained = args.run.resolve()
    frontier = work / "frontier.jsonl"
    recorded_frontier(trained, 0.95, frontier)
    recorded = [{"name": "frontier", "kind": "predictions", "path": str(frontier),
                 "price_per_mtok": {"input": 2.5, "output": 10.0}}]
    measured: dict = {}
    if args.shipped_only:
        shipped = yaml.safe_load(args.shipped.read_text(encoding="utf-8"))["eval"]["baselines"]
        r = eval_once(trained, work, "sqlite", {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/shipped.db"},
                      shipped)
        print(f"| {r['eval']} | {r['test_rows']:,} | {r['stage_s']:.1f} s | MLflow logging waited for "
              f"{r['mlflow_logging_s']:.2f} s | {r['mlflow_logging_share']:.2%} |")
        (work / "shipped.json").write_text(json.dumps(r, indent=2), encoding="utf-8")
        return
    if args.interleaved:
        runs = [("sqlite", f"sqlite:///{work}/interleaved.db", 1)]
        with mlflow_server(work / "server") as uri:
            runs += [("server", uri, 4)]  # eval_traces.HTTP_WORKERS
            measured["interleaved"] = [
                {"store": store, **interleaved(trained, store_uri, args.chunks, args.chunk_rows, workers)}
                for store, store_uri, workers in runs]
        print("| store | upload threads | inference s | upload alone s | upload / inference | inference while "
              "uploading, plus the wait s | overlapped: added / inference |")
        print("|---|---|---|---|---|---|---|")
        for r in measured["interleaved"]:
            print(f"| {r['store']} | {r['http_workers']} | {r['inference']:.1f} | {r['upload']:.1f} "
                  f"| {r['upload_share']:.1%} | {r['inference_while_uploading'] + r['wait']:.1f} "
                  f"| {r['overlapped_share']:+.1%} |")
        (work / "interleaved.json").write_text(json.dumps(measured, indent=2), encoding="utf-8")
        return
    sqlite = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    results = [eval_once(trained, work, "sqlite", sqlite, recorded, traces) for traces in (False, True)]
    with mlflow_server(work / "server") as uri:
        server = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        results += [eval_once(trained, work, "server", server, recorded, traces) for traces in (False, True)]
        if args.shipped:
            shipped = yaml.safe_load(args.shipped.read_text(encoding="utf-8"))["eval"]["baselines"]
            results += [eval_once(trained, work, "server", server, shipped, traces) for traces in (False, True)]
    print("| eval | test rows | eval stage s | MLflow logging waited for, s | share of the stage |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['eval']} | {r['test_rows']:,} | {r['stage_s']:.1f} | {r['mlflow_logging_s']:.2f} | "
              f"{r['mlflow_logging_share']:.1%} |")
    print()
    print("What the traces add to the stage's wall time (the same eval without them, one pair each):")
    for without, with_ in zip(results[0::2], results[1::2], strict=True):
        added = with_["stage_s"] - without["stage_s"]
        print(f"- {with_['eval']}: {with_['stage_s']:.1f} s against {without['stage_s']:.1f} s without traces: "
              f"{added:+.1f} s ({added / without['stage_s']:+.1%})")
    (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
