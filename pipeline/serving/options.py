"""`expert serve`'s options, their defaults and their help: the one place they are written (`expert serve`'s flags
are built from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, get_args, get_type_hints

from pipeline.errors import UserError

FrontierDown = Literal["flag", "502"]


@dataclass(frozen=True)
class Flag:
    """How `expert serve` shows a ServeOptions field: its help, and its flag where that is not the field's name
    (`--x/--no-x` for a switch). The command line is built from these."""

    help: str
    decl: str | None = None


@dataclass(frozen=True)
class ServeOptions:
    escalate: Annotated[bool, Flag("Send answers under the cascade threshold to the frontier.",
                                   "--escalate/--no-escalate")] = True
    frontier_down: Annotated[FrontierDown, Flag("When the frontier fails: `flag` (the expert's answer, flagged) or "
                                                "`502`.")] = "flag"
    max_batch: Annotated[int, Flag("Most requests answered in one model call.")] = 16
    batch_wait_ms: Annotated[float, Flag("After the first queued request, wait this long for more (0: batch what "
                                         "queued meanwhile).")] = 0.0
    max_body_bytes: Annotated[int, Flag("Larger request bodies get 413.")] = 64 * 1024
    max_input_tokens: Annotated[int | None, Flag("Longer input texts get 413. Default: the recipe's "
                                                 "data.max_tokens.")] = None
    # fewer than eval's: an answer cannot wait
    frontier_retries: Annotated[int, Flag("Retries per escalated request.")] = 1
    frontier_timeout_s: Annotated[float, Flag("Seconds per frontier attempt: to connect, and for each read (at most "
                                              "--tier-deadline).", "--frontier-timeout")] = 10.0
    tier_deadline_s: Annotated[float, Flag("Most seconds a request spends on one tier above the expert: waiting for "
                                           "a slot, every attempt and backoff; then it goes on to the next tier, or "
                                           "is flagged/502.", "--tier-deadline")] = 15.0
    escalation_deadline_s: Annotated[float, Flag("Most seconds a request spends on all the tiers above the expert "
                                                 "together.", "--escalation-deadline")] = 30.0
    tier_queue: Annotated[int, Flag("Requests that may wait for a tier whose max_concurrency slots are all busy; more "
                                    "are shed at once (on to the next tier, or flagged/502), not queued.")] = 16
    body_timeout_s: Annotated[float, Flag("Seconds for a request body to arrive in full; a stalled one gets 408 and "
                                          "the connection is closed.", "--body-timeout")] = 10.0
    health_probe_s: Annotated[float, Flag("/health asks the model a probe question when its last one is older than "
                                          "this (or an answer since had a confidence that is no probability).",
                                          "--health-probe-interval")] = 10.0
    merge: Annotated[bool | None, Flag("Fold the adapter into the base weights at load, or keep it separate. "
                                       "Default: as the version was evaluated; the other is refused without "
                                       "--allow-unevaluated-runtime.", "--merge/--no-merge")] = None
    allow_unevaluated_runtime: Annotated[bool, Flag("Serve with --merge/--no-merge other than the version was "
                                                    "evaluated with (its answers and confidences then differ from "
                                                    "the evaluated ones in the last digits).")] = False
    pack: Annotated[bool, Flag("Keep merged bf16 weights in oneDNN's layout (same answers, faster).",
                               "--pack/--no-pack")] = True
    lean_forward: Annotated[bool, Flag("Score labels with a leaner Llama forward pass, q/k/v and gate/up fused (same "
                                       "answers, faster).", "--lean-forward/--no-lean-forward")] = True
    threads: Annotated[int | None, Flag("CPU threads for the model (default: one per core; 1 helps on a busy "
                                        "machine).")] = None

    def __post_init__(self) -> None:
        if self.frontier_down not in get_args(FrontierDown):
            raise UserError(f"{flag('frontier_down')} {self.frontier_down}: use "
                            f"{' or '.join(f'`{v}`' for v in get_args(FrontierDown))}")
        if self.max_batch < 1:
            raise UserError(f"{flag('max_batch')} must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"{flag('threads')} must be at least 1")
        if self.tier_queue < 0:
            raise UserError(f"{flag('tier_queue')} must be 0 or more")
        for name in ("frontier_timeout_s", "tier_deadline_s", "escalation_deadline_s", "body_timeout_s", "health_probe_s"):
            seconds = getattr(self, name)
            if not seconds > 0 or seconds == float("inf"):
                raise UserError(f"{flag(name)} {seconds}: use a number of seconds above 0")


def serve_flags() -> dict[str, tuple[Any, Flag, Any]]:
    """Each ServeOptions field's type, `Flag` and default, by field name."""
    hints = get_type_hints(ServeOptions, include_extras=True)
    return {f.name: (get_args(hints[f.name])[0], get_args(hints[f.name])[1], f.default) for f in fields(ServeOptions)}


def flag(name: str) -> str:
    """The command-line flag of a ServeOptions field (its `--x` side, for a switch `--x/--no-x`)."""
    declared = serve_flags()[name][1].decl
    return (declared or "--" + name.replace("_", "-")).partition("/")[0]
