"""Counters and histograms of `expert serve` in Prometheus text format (exposition 0.0.4), kept by hand: five
series do not justify `prometheus_client`."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TRIAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)  # a `text` router takes about 1 ms


class Metrics:
    """Counters and histograms in Prometheus text format (exposition 0.0.4), kept by hand: no new dependency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.escalations: dict[str, int] = {}  # outcome -> count
        self.tiers: dict[tuple[str, str], int] = {}  # (tier, outcome) -> count
        self.tier_latency: dict[str, list[float]] = {}  # tier -> [bucket counts..., sum, count]
        self.latency: dict[str, list[float]] = {}  # endpoint -> [bucket counts..., sum, count]
        self.batches: list[float] = [0.0] * (len(BATCH_BUCKETS) + 2)
        self.queue_depth = 0
        self.model_errors = 0
        self.triage_starts: dict[tuple[str, str], int] = {}  # (router, start tier) -> count
        self.triage_latency: dict[str, list[float]] = {}  # router -> [bucket counts..., sum, count]

    @staticmethod
    def _observe(hist: list[float], buckets, value: float) -> None:
        for i, bound in enumerate(buckets):
            if value <= bound:
                hist[i] += 1
        hist[-2] += value
        hist[-1] += 1

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 400:
                self.errors[key] = self.errors.get(key, 0) + 1
            hist = self.latency.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS) + 2))
            self._observe(hist, LATENCY_BUCKETS, seconds)

    def escalation(self, outcome: str) -> None:
        with self._lock:
            self.escalations[outcome] = self.escalations.get(outcome, 0) + 1

    def model_error(self) -> None:
        with self._lock:
            self.model_errors += 1

    def tier(self, name: str, outcome: str, seconds: float | None) -> None:
        """A tier's outcome for one request (`answered`, `passed` on, `failed`, `timed_out`, `shed`) and the wall
        time the request spent on it."""
        with self._lock:
            self.tiers[(name, outcome)] = self.tiers.get((name, outcome), 0) + 1
            if seconds is not None:
                hist = self.tier_latency.setdefault(name, [0.0] * (len(LATENCY_BUCKETS) + 2))
                self._observe(hist, LATENCY_BUCKETS, seconds)

    def triage(self, router: str, start: str, seconds: float) -> None:
        """A triage decision (the tier the router started the request at) and the seconds the router took."""
        with self._lock:
            self.triage_starts[(router, start)] = self.triage_starts.get((router, start), 0) + 1
            hist = self.triage_latency.setdefault(router, [0.0] * (len(TRIAGE_BUCKETS) + 2))
            self._observe(hist, TRIAGE_BUCKETS, seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self._observe(self.batches, BATCH_BUCKETS, size)

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP expert_requests_total HTTP requests by endpoint and status code.",
                "# TYPE expert_requests_total counter",
            ]
            out += [f'expert_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP expert_errors_total Requests answered with a 4xx or 5xx status.",
                    "# TYPE expert_errors_total counter"]
            out += [f'expert_errors_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.errors.items())]
            out += ["# HELP expert_escalations_total Answers under the cascade threshold, by outcome: "
                    "frontier (answered by the last tier), <tier> (answered by that middle tier), failed (no tier "
                    "answered; expert answer flagged or 502), "
                    "not_sent (no frontier configured or escalation off).",
                    "# TYPE expert_escalations_total counter"]
            out += [f'expert_escalations_total{{outcome="{o}"}} {n}' for o, n in sorted(self.escalations.items())]
            out += ["# HELP expert_tier_requests_total Requests each tier saw, by outcome: answered, passed (unsure: "
                    "on to the next tier), failed (an error or an unparsable answer: passed on), timed_out (no answer by the "
                    "deadline: passed on), shed (its slots and queue were full: passed on at once).",
                    "# TYPE expert_tier_requests_total counter"]
            out += [f'expert_tier_requests_total{{tier="{t}",outcome="{o}"}} {n}' for (t, o), n in sorted(self.tiers.items())]
            out += ["# HELP expert_tier_duration_seconds Wall time each request spent on each tier (the expert: "
                    "queue and model; an API tier: waiting for a slot, every attempt and backoff).",
                    "# TYPE expert_tier_duration_seconds histogram"]
            for name, hist in sorted(self.tier_latency.items()):
                out += _histogram_lines("expert_tier_duration_seconds", f'tier="{name}"', LATENCY_BUCKETS, hist)
            out += ["# HELP expert_triage_decisions_total Requests the triage router started at each tier (expert: the "
                    "usual path; a tier above: the tiers below it skipped), by router.",
                    "# TYPE expert_triage_decisions_total counter"]
            out += [f'expert_triage_decisions_total{{router="{r}",start="{t}"}} {n}'
                    for (r, t), n in sorted(self.triage_starts.items())]
            out += ["# HELP expert_triage_duration_seconds Time the triage router took per request (text: its "
                    "features and score; probe: the expert's extra pass and the score).",
                    "# TYPE expert_triage_duration_seconds histogram"]
            for router, hist in sorted(self.triage_latency.items()):
                out += _histogram_lines("expert_triage_duration_seconds", f'router="{router}"', TRIAGE_BUCKETS, hist)
            out += ["# HELP expert_request_duration_seconds Request latency, from body read to response.",
                    "# TYPE expert_request_duration_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                out += _histogram_lines("expert_request_duration_seconds", f'endpoint="{endpoint}"', LATENCY_BUCKETS, hist)
            out += ["# HELP expert_batch_size Requests answered per model call (micro-batching).",
                    "# TYPE expert_batch_size histogram"]
            out += _histogram_lines("expert_batch_size", "", BATCH_BUCKETS, self.batches)
            out += ["# HELP expert_model_errors_total Answers whose confidence was no probability (NaN, infinite "
                    "or outside [0, 1]): not used, escalated or flagged.", "# TYPE expert_model_errors_total counter",
                    f"expert_model_errors_total {self.model_errors}"]
            out += ["# HELP expert_queue_depth Requests waiting for the model.", "# TYPE expert_queue_depth gauge",
                    f"expert_queue_depth {self.queue_depth}"]
            return "\n".join(out) + "\n"


def _histogram_lines(name: str, labels: str, buckets, hist: list[float]) -> list[str]:
    sep = "," if labels else ""
    lines = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {int(hist[i])}' for i, b in enumerate(buckets)]
    lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {int(hist[-1])}')
    braces = f"{{{labels}}}" if labels else ""
    lines += [f"{name}_sum{braces} {hist[-2]:.6f}", f"{name}_count{braces} {int(hist[-1])}"]
    return lines
