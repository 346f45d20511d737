"""BANKING77 with most labels hidden: a teacher expert, served by `expert serve`, labels the rest for a student.

    .venv/bin/python benchmarks/teacher_student.py runs/teacher-student [--share 850 --hidden 2550]

What it runs, through the `expert` CLI as a user would (each step is skipped when its output exists, so an
interrupted run continues):

1. `expert prep recipes/banking77.yaml`: the recipe's own seeded, stratified split. Its test split (gold) and
   a gold validation sample are kept fixed for every model below; from its train split a seeded sample of
   `--share` rows keeps its labels (the labelled share) and `--hidden` more rows lose them.
2. The teacher: `expert run` on the labelled share alone (prep, train, eval, push to a local MLflow store).
   It is also the "labelled share only" student: same recipe, same rows.
3. `expert serve models:/banking77-teacher/1`, and the student's `expert prep` with `data.teacher` pointed at
   it: the hidden rows are labelled over HTTP, through the frontier client.
4. The student on share + teacher labels, and the student on the same rows with their gold labels
   (`expert train`, `expert eval`).
5. On the same gold test rows: accuracy and macro-F1 of the three, paired bootstrap 95% intervals of each
   difference, training minutes, and the teacher labels' accuracy against the hidden gold labels.

Every model is the shipped recipe with only data keys changed (`--set`) and no untuned baselines (they are
in docs/RESULTS.md already and cost ~15 minutes each). Writes `<work>/results.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/banking77.yaml"
EXPERT = [str(Path(sys.executable).parent / "expert")]
TEACHER_MODEL = "banking77-teacher"
PORT = 8377
SEED = 13


def expert(*args: str, log: Path) -> None:
    """One `expert` command, its output appended to `log`; a failure stops the benchmark with that log's tail."""
    print(f"$ expert {' '.join(args)}", flush=True)
    with log.open("a") as out:
        out.write(f"\n$ expert {' '.join(args)}\n")
        out.flush()
        code = subprocess.call(EXPERT + list(args), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        sys.exit(f"expert {args[0]} failed (exit {code}); see {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))


def sets(data: Path, source: str, name: str, extra: dict[str, str] | None = None) -> list[str]:
    """`--set` overrides: the data files of this model, its name, no untuned baselines."""
    keys = {"name": name, "registry.model_name": name, "data.source": str(data / source),
            "data.validation_source": str(data / "validation.jsonl"), "data.test_source": str(data / "test.jsonl"),
            "data.fields": "{text: text, target: category, id: id}", "eval.baselines": "[]", **(extra or {})}
    return [arg for k, v in keys.items() for arg in ("--set", f"{k}={v}")]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_sources(work: Path, share: int, hidden: int, validation: int, log: Path) -> Path:
    """The fixed test/validation files and the three training sources, from the recipe's own split."""
    data = work / "data"
    if (data / "gold.jsonl").is_file():
        return data
    expert("prep", str(RECIPE), "--run-dir", str(work / "split"), log=log)
    prep = work / "split/prep"
    as_row = lambda r: {"id": r["id"], "text": r["text"], "category": r["target"]}  # noqa: E731
    train = read_jsonl(prep / "train.jsonl")
    if share + hidden > len(train):
        sys.exit(f"--share {share} + --hidden {hidden} exceeds the {len(train)} rows of the train split")
    rng = random.Random(SEED)
    rng.shuffle(train)
    labelled, unlabelled = train[:share], train[share:share + hidden]
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "test.jsonl", [as_row(r) for r in read_jsonl(prep / "test.jsonl")])
    val = read_jsonl(prep / "validation.jsonl")
    write_jsonl(data / "validation.jsonl", [as_row(r) for r in random.Random(SEED).sample(val, min(validation, len(val)))])
    write_jsonl(data / "share.jsonl", [as_row(r) for r in labelled])
    write_jsonl(data / "hidden-gold.jsonl", [as_row(r) for r in unlabelled])
    write_jsonl(data / "mixed.jsonl", [as_row(r) for r in labelled] + [{**as_row(r), "category": None} for r in unlabelled])
    write_jsonl(data / "gold.jsonl", [as_row(r) for r in labelled + unlabelled])
    return data


def wait_healthy(url: str, server: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"expert serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    sys.exit(f"expert serve did not become healthy at {url} within {seconds:.0f}s")


def teacher_key(url: str) -> dict[str, str]:
    """`data.teacher` for the student's recipe: the same value for its prep, train and eval (it is a prep key)."""
    return {"data.teacher": f"{{model: {TEACHER_MODEL}, base_url: '{url}/v1', api_key_env: SERVED_TEACHER_KEY, "
                            "max_concurrency: 8, timeout_s: 120}"}


def label_with_served_teacher(work: Path, data: Path, log: Path, env: dict[str, str]) -> float:
    """The student's prep, its hidden rows labelled by the teacher behind `expert serve`; returns the seconds."""
    student = work / "student-teacher"
    if (student / "prep/train.jsonl").is_file():
        return json.loads((work / "label_seconds.json").read_text())["seconds"]
    url = f"http://127.0.0.1:{PORT}"
    with log.open("a") as out:
        server = subprocess.Popen(EXPERT + ["serve", f"models:/{TEACHER_MODEL}/1", "--port", str(PORT), "--no-escalate"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_healthy(url, server)
        started = time.perf_counter()
        expert("prep", str(RECIPE), "--run-dir", str(student),
               *sets(data, "mixed.jsonl", "banking77-student-teacher", teacher_key(url)), log=log)
        seconds = time.perf_counter() - started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    (work / "label_seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def predictions(run: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(run / "eval/predictions/expert.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="working folder (created; keep it out of git, e.g. under runs/)")
    parser.add_argument("--share", type=int, default=850, help="train rows that keep their gold label")
    parser.add_argument("--hidden", type=int, default=2550, help="train rows whose label is hidden")
    parser.add_argument("--validation", type=int, default=150, help="gold validation rows (fixed for every model)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db"),
           "SERVED_TEACHER_KEY": "unused"}
    os.environ.update(env)

    data = make_sources(work, args.share, args.hidden, args.validation, log)
    expert("run", str(RECIPE), "--run-dir", str(work / "teacher"), *sets(data, "share.jsonl", TEACHER_MODEL), log=log)
    label_seconds = label_with_served_teacher(work, data, log, env)
    runs = {"student-teacher": ("mixed.jsonl", teacher_key(f"http://127.0.0.1:{PORT}")),
            "student-gold": ("gold.jsonl", None)}
    for name, (source, extra) in runs.items():
        steps = ("train", "eval") if name == "student-teacher" else ("prep", "train", "eval")  # labelling did its prep
        for step in steps:
            expert(step, str(RECIPE), "--run-dir", str(work / name), *sets(data, source, f"banking77-{name}", extra),
                   log=log)

    report(work, data, label_seconds, args.bootstrap)


def report(work: Path, data: Path, label_seconds: float, samples: int) -> None:
    spec = json.loads((work / "teacher/prep/spec.json").read_text(encoding="utf-8"))["spec"]
    test = read_jsonl(data / "test.jsonl")
    golds = [r["category"] for r in test]
    systems = {"teacher = labelled share only": "teacher", "student on share + teacher labels": "student-teacher",
               "student on the same rows, all gold": "student-gold"}
    preds = {label: [predictions(work / run)[r["id"]]["prediction"] for r in test] for label, run in systems.items()}
    student = preds["student on share + teacher labels"]

    hidden_gold = {r["id"]: r["category"] for r in read_jsonl(data / "hidden-gold.jsonl")}
    taught = [r for s in ("train", "validation") for r in read_jsonl(work / f"student-teacher/prep/{s}.jsonl")
              if r.get("provenance", "gold") != "gold"]
    teacher_right = sum(r["target"] == hidden_gold[r["id"]] for r in taught)

    rows = []
    for label, run in systems.items():
        train = json.loads((work / run / "train/metrics.json").read_text())
        row = {"system": label, "train_rows": train["train_examples"], "steps": train["steps"],
               "train_minutes": train["train_seconds"] / 60}
        for metric in ("accuracy", "macro_f1"):
            row[metric] = stats.metric_value(metric, golds, preds[label], spec)
            if preds[label] is not student:
                row[f"student_minus_this_{metric}"] = stats.paired_bootstrap(
                    metric, golds, student, preds[label], spec, samples, SEED)
        rows.append(row)
    result = {"test_rows": len(test), "systems": rows, "label_seconds": label_seconds,
              "teacher_labels": {"rows": len(taught), "accuracy_vs_hidden_gold": teacher_right / len(taught),
                                 "interval_95": stats.wilson_interval(teacher_right, len(taught))},
              "prep_report_teacher": json.loads((work / "student-teacher/prep/stats.json").read_text()).get("teacher")}
    (work / "results.json").write_text(json.dumps(result, indent=2))

    print(f"\nGold test rows: {len(test)}. Teacher labels: {len(taught)} rows in {label_seconds / 60:.1f} min, "
          f"{teacher_right / len(taught):.3f} agree with the hidden gold labels "
          f"(Wilson 95% {result['teacher_labels']['interval_95'][0]:.3f} to {result['teacher_labels']['interval_95'][1]:.3f}).\n")
    print("| system | train rows | steps | train min | accuracy | macro-F1 | student - system, accuracy (95% CI) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        d = row.get("student_minus_this_accuracy")
        ci = f"{d['difference']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f})" if d else ""
        print(f"| {row['system']} | {row['train_rows']:,} | {row['steps']} | {row['train_minutes']:.1f} | "
              f"{row['accuracy']:.3f} | {row['macro_f1']:.3f} | {ci} |")


if __name__ == "__main__":
    main()
