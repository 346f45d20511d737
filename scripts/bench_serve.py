"""Benchmark: `expert serve` latency and throughput for a registered classification expert.

    .venv/bin/python scripts/bench_serve.py models:/ticket-router@champion
    .venv/bin/python scripts/bench_serve.py models:/ticket-router@champion --no-merge --batch-wait-ms 0

Starts `expert serve` as its own process on 127.0.0.1 (escalation off, so the
numbers are the expert's own), then measures from this process:

1. single-request latency: sequential `POST /v1/chat/completions`, one at a
   time after a warm-up, p50/p95/mean (the issue's target: p50 <= 50 ms for the
   SmolLM2-135M expert on a 2-core CPU);
2. throughput: C concurrent clients (default 8), each sending its next request
   as soon as the last one is answered, for a fixed time: requests/s,
   p50/p95 latency, and the server's mean batch size from /metrics.

Inputs are the texts of the shipped ticket data. Results go to
docs/BENCHMARKS.md by hand, with the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri")
    parser.add_argument("--single", type=int, default=100, help="sequential requests for the single-request latency")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the concurrent phase")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `expert serve` option (repeatable)")
    parser.add_argument("--no-merge", action="store_true", help="serve with the adapter unmerged")
    parser.add_argument("--batch-wait-ms", type=float, default=None)
    args = parser.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", args.model_uri, "--port", str(port), "--no-escalate",
           *args.serve_arg]
    if args.no_merge:
        cmd.append("--no-merge")
    if args.batch_wait_ms is not None:
        cmd += ["--batch-wait-ms", str(args.batch_wait_ms)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"expert serve exited:\n{server.stdout.read()}")
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.25)
        print(f"server up in {time.perf_counter() - started:.1f} s: {health['model']} v{health['version']} "
              f"({health['task']}), cmd: {' '.join(cmd[2:])}")
        pool = texts()
        body = lambda t: {"model": health["model"], "messages": [{"role": "user", "content": t}]}  # noqa: E731

        with httpx.Client(base_url=url, timeout=60) as http:
            for t in pool[:5]:  # warm-up
                http.post("/v1/chat/completions", json=body(t)).raise_for_status()
            single = []
            for i in range(args.single):
                t0 = time.perf_counter()
                http.post("/v1/chat/completions", json=body(pool[i % len(pool)])).raise_for_status()
                single.append(time.perf_counter() - t0)
        print(f"single request ({args.single} sequential): p50 {statistics.median(single) * 1000:.1f} ms, "
              f"p95 {pct(single, 0.95) * 1000:.1f} ms, mean {statistics.fmean(single) * 1000:.1f} ms")

        before = httpx.get(f"{url}/metrics").text
        latencies: list[float] = []
        errors: list[int] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                n = i * 37
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    r = http.post("/v1/chat/completions", json=body(pool[n % len(pool)]))
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if r.status_code != 200:
                            errors.append(r.status_code)
                    n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        after = httpx.get(f"{url}/metrics").text
        batches = metric(after, "expert_batch_size_count") - metric(before, "expert_batch_size_count")
        answered = metric(after, "expert_batch_size_sum") - metric(before, "expert_batch_size_sum")
        print(f"{args.clients} concurrent clients, {elapsed:.1f} s: {len(latencies) / elapsed:.1f} requests/s, "
              f"p50 {statistics.median(latencies) * 1000:.1f} ms, p95 {pct(latencies, 0.95) * 1000:.1f} ms, "
              f"errors {len(errors)}, mean batch {answered / max(batches, 1):.2f}")
    finally:
        server.terminate()
        server.communicate(timeout=30)


if __name__ == "__main__":
    main()
