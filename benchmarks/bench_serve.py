"""Benchmark: `expert serve` latency and throughput for a registered classification expert, variants side by side.

    .venv/bin/python benchmarks/bench_serve.py models:/ticket-router@champion
    .venv/bin/python benchmarks/bench_serve.py models:/ticket-router@champion \\
        --variant default= --variant unpacked=--no-pack --variant before@/tmp/b36aeae=

Each variant is `LABEL=SERVE OPTIONS` (options as on the command line, may be
empty); `LABEL@DIR=...` serves from another checkout of this project (to
compare commits). Every variant runs as its own `expert serve` process on
127.0.0.1 with escalation off (the numbers are the expert's own), all started
before any timing. Then, from this process:

1. single-request latency: R rounds; in each, every variant answers N
   sequential `POST /v1/chat/completions` in turn, so the variants see the
   same machine state (this machine is shared and noisy). Reported: p50/p95
   over all rounds, and each variant's p50 as a ratio to the first variant's,
   per round (median and range);
2. throughput, one variant at a time: C concurrent clients (default 8), each
   sending its next request as soon as the last one is answered, for a fixed
   time: requests/s, p50/p95 latency, errors, and the server's mean batch size
   from /metrics.

The issue's target: single request p50 <= 50 ms for the SmolLM2-135M expert on
a 2-core CPU. Inputs are the texts of the shipped ticket data. Results go to
docs/BENCHMARKS.md by hand, with the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Variant:
    label: str
    root: Path
    options: list[str]
    url: str = ""
    process: subprocess.Popen | None = None
    single: list[float] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)


def parse_variant(spec: str) -> Variant:
    head, sep, options = spec.partition("=")
    if not sep or not head:
        raise SystemExit(f"--variant {spec!r}: write LABEL=OPTIONS or LABEL@DIR=OPTIONS (OPTIONS may be empty)")
    label, _, root = head.partition("@")
    root_dir = Path(root).resolve() if root else ROOT
    if not (root_dir / "pipeline" / "cli.py").is_file():
        raise SystemExit(f"--variant {spec!r}: {root_dir} is not a checkout of this project (no pipeline/cli.py)")
    return Variant(label, root_dir, shlex.split(options))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/tickets/tickets.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def absolute_tracking_uri() -> str:
    """The tracking URI with a relative SQLite path made absolute, so servers run from other checkouts find it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path.cwd() / uri[len(prefix):])
    return uri


def start(variant: Variant, model_uri: str) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", model_uri, "--port", str(port), "--no-escalate",
           *variant.options]
    env = {**os.environ, "MLFLOW_TRACKING_URI": absolute_tracking_uri(),
           "PYTHONPATH": str(variant.root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    variant.process = subprocess.Popen(cmd, cwd=variant.root, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    variant.url = f"http://127.0.0.1:{port}"
    while True:
        if variant.process.poll() is not None:
            sys.exit(f"[{variant.label}] expert serve exited:\n{variant.process.stdout.read()}")
        try:
            health = httpx.get(f"{variant.url}/health", timeout=2).json()
            break
        except httpx.TransportError:
            time.sleep(0.25)
    print(f"[{variant.label}] up in {time.perf_counter() - started:.1f} s from {variant.root}: "
          f"{health['model']} v{health['version']} ({health['task']}), options: {' '.join(variant.options) or '-'}")


def body(model: str, text: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def single_requests(variant: Variant, model: str, pool: list[str], n: int, offset: int) -> list[float]:
    out = []
    with httpx.Client(base_url=variant.url, timeout=60) as http:
        for t in pool[:3]:  # warm the connection and the server's caches
            http.post("/v1/chat/completions", json=body(model, t)).raise_for_status()
        for i in range(n):
            t0 = time.perf_counter()
            http.post("/v1/chat/completions", json=body(model, pool[(offset + i) % len(pool)])).raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def throughput(variant: Variant, model: str, pool: list[str], clients: int, seconds: float) -> str:
    before = httpx.get(f"{variant.url}/metrics").text
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=variant.url, timeout=60) as http:
            n = i * 37
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = http.post("/v1/chat/completions", json=body(model, pool[n % len(pool)]))
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors.append(r.status_code)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    after = httpx.get(f"{variant.url}/metrics").text
    batches = metric(after, "expert_batch_size_count") - metric(before, "expert_batch_size_count")
    answered = metric(after, "expert_batch_size_sum") - metric(before, "expert_batch_size_sum")
    return (f"{len(latencies) / elapsed:.1f} requests/s, p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p95 {pct(latencies, 0.95) * 1000:.1f} ms, errors {len(errors)}, mean batch {answered / max(batches, 1):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL[@DIR]=OPTIONS",
                        help="a server configuration to measure (repeatable; default: one with default options)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of sequential requests, variants in turn")
    parser.add_argument("--single", type=int, default=20, help="sequential requests per variant per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each concurrent phase")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["default="]]
    if len({v.label for v in variants}) != len(variants):
        raise SystemExit("--variant labels must differ")

    pool = texts()
    try:
        for variant in variants:
            start(variant, args.model_uri)
        model = httpx.get(f"{variants[0].url}/health").json()["model"]
        for r in range(args.rounds):
            for variant in variants:
                latencies = single_requests(variant, model, pool, args.single, offset=r * args.single)
                variant.single += latencies
                variant.round_p50.append(statistics.median(latencies))
        print(f"\nsingle request ({args.rounds} rounds x {args.single} sequential per variant):")
        first = variants[0]
        for variant in variants:
            ratios = [v / f for v, f in zip(variant.round_p50, first.round_p50)]
            print(f"  [{variant.label}] p50 {statistics.median(variant.single) * 1000:.1f} ms, "
                  f"p95 {pct(variant.single, 0.95) * 1000:.1f} ms; p50 / [{first.label}] per round: "
                  f"median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
        print(f"\n{args.clients} concurrent clients, {args.seconds:.0f} s each:")
        for variant in variants:
            print(f"  [{variant.label}] {throughput(variant, model, pool, args.clients, args.seconds)}")
    finally:
        for variant in variants:
            if variant.process is not None:
                variant.process.terminate()
                variant.process.communicate(timeout=30)


if __name__ == "__main__":
    main()
