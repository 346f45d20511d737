"""`expert serve`'s options and their defaults: the one place they are written (the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from pipeline.errors import UserError

FrontierDown = Literal["flag", "502"]


@dataclass(frozen=True)
class ServeOptions:
    escalate: bool = True  # send answers under the threshold to the frontier
    frontier_down: FrontierDown = "flag"  # when the frontier fails: flagged expert answer, or 502
    max_batch: int = 16  # most requests in one model call
    batch_wait_ms: float = 0.0  # after the first queued request, wait this long for more (a lone request pays it)
    max_body_bytes: int = 64 * 1024  # larger request bodies get 413
    max_input_tokens: int | None = None  # longer texts get 413; default: the recipe's data.max_tokens
    frontier_retries: int = 1  # retries per escalated request (serving cannot wait like eval)
    frontier_timeout_s: float = 10.0  # per attempt: connect, and each read (capped at tier_deadline_s)
    tier_deadline_s: float = 15.0  # most a request spends on one tier: waiting for a slot, every attempt and backoff
    escalation_deadline_s: float = 30.0  # most a request spends on all the tiers above the expert together
    tier_queue: int = 16  # requests that may wait for a busy tier's slot; beyond that they are shed, not queued
    body_timeout_s: float = 10.0  # a request body not all read by then gets 408 and the connection is closed
    health_probe_s: float = 10.0  # /health asks the model a probe question when its last one is older than this
    merge: bool | None = None  # fold the LoRA weights into the base at load, or not; None: as eval ran the version
    allow_unevaluated_runtime: bool = False  # serve a merge choice the version was not evaluated with
    pack: bool = True  # after merging, keep bf16 weights in oneDNN's layout: bit-identical answers, faster
    lean_forward: bool = True  # Llama label scoring: fused projections, no transformers plumbing; bit-identical, faster
    threads: int | None = None  # torch CPU threads for the model; default: torch's (one per core)

    def __post_init__(self) -> None:
        if self.frontier_down not in get_args(FrontierDown):
            raise UserError(f"--frontier-down {self.frontier_down}: use {' or '.join(f'`{v}`' for v in get_args(FrontierDown))}")
        if self.max_batch < 1:
            raise UserError("--max-batch must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")
        if self.tier_queue < 0:
            raise UserError("--tier-queue must be 0 or more")
        for flag, seconds in (("--frontier-timeout", self.frontier_timeout_s), ("--tier-deadline", self.tier_deadline_s),
                              ("--escalation-deadline", self.escalation_deadline_s),
                              ("--body-timeout", self.body_timeout_s), ("--health-probe-interval", self.health_probe_s)):
            if not seconds > 0 or seconds == float("inf"):
                raise UserError(f"{flag} {seconds}: use a number of seconds above 0")


def default(name: str) -> Any:
    """A ServeOptions field's default, for the command line's options."""
    return next(f.default for f in fields(ServeOptions) if f.name == name)
