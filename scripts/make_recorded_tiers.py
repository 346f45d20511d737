#!/usr/bin/env python3
"""Write the recorded answers that stand in for the demo's two hosted tiers when their keys are not set.

Why this exists
---------------
`make demo` compares the expert with a frontier model and routes between the expert, a mid tier and the
frontier. Without `OPENAI_API_KEY` (or the mid tier's key) nothing could be asked, so a new user would see no
comparison, no route and no saving. The recipe's `stand_in` files give those tiers recorded answers for every
ticket of `data/tickets/tickets.jsonl`. They are made up by this script from a stated rule, not recorded from the
real models, and every report labels them as recorded stand-ins with that rule.

The rule (per tier, seeded; one line per ticket, in the tickets' order)
----------------------------------------------------------------------
* right with probability `accuracy` (frontier 0.97, mid 0.90); a wrong answer is another queue drawn uniformly;
* `confidence`: right answers Beta(12, 1.5) (mean ~0.89), wrong ones Beta(3, 2) (mean 0.6): they overlap, so
  a threshold trades quality for cost, as real confidences do; rounded to 4 decimals;
* `input_tokens`: the characters of the messages the baseline is sent (the baseline system prompt the recipe's
  instruction and labels make, and the ticket) / 4, rounded up, plus 4 per message; `output_tokens`: the
  label's characters / 4, rounded up, plus 1;
* `latency_ms`: normal around `latency_ms` (frontier 700 ms, sd 150; mid 250 ms, sd 60), at least a quarter of
  the mean, rounded to the millisecond.

How to re-run
-------------
From the repository root (the output is byte-identical on every run)::

    .venv/bin/python scripts/make_recorded_tiers.py            # writes data/tickets/recorded-{frontier,mid}.jsonl
    .venv/bin/python scripts/make_recorded_tiers.py --out DIR  # the same files under DIR, to compare
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TICKETS = ROOT / "data/tickets/tickets.jsonl"
RECIPE = ROOT / "recipes/ticket-classification.yaml"
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # the chat format's role and separators


@dataclass(frozen=True)
class Tier:
    name: str
    accuracy: float
    latency_ms: float
    latency_sd_ms: float
    seed: int


TIERS = (Tier("frontier", 0.97, 700, 150, 1301), Tier("mid", 0.90, 250, 60, 1302))


def baseline_system_prompt(instruction: str, labels: list[str]) -> str:
    """The prompt eval sends an `openai` baseline for classification (`pipeline.tasks.classification.system_prompt`)."""
    from pipeline.tasks.classification import system_prompt

    return system_prompt(instruction, labels)


def tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def recorded(tier: Tier, tickets: list[dict], system: str, labels: list[str]) -> list[dict]:
    rng = random.Random(tier.seed)
    out = []
    for ticket in tickets:
        right = rng.random() < tier.accuracy
        answer = ticket["queue"] if right else rng.choice([q for q in labels if q != ticket["queue"]])
        confidence = rng.betavariate(12, 1.5) if right else rng.betavariate(3, 2)
        latency = max(tier.latency_ms / 4, rng.gauss(tier.latency_ms, tier.latency_sd_ms))
        out.append({"id": ticket["id"], "output": answer, "confidence": round(confidence, 4),
                    "input_tokens": tokens(system) + tokens(ticket["text"]) + 2 * TOKENS_PER_MESSAGE,
                    "output_tokens": tokens(answer) + 1, "latency_ms": round(latency)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data/tickets", help="folder to write the files to")
    args = parser.parse_args()
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    labels = recipe["task"]["labels"]
    system = baseline_system_prompt(recipe["task"]["instruction"], labels)
    tickets = [json.loads(line) for line in TICKETS.read_text(encoding="utf-8").splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    for tier in TIERS:
        rows = recorded(tier, tickets, system, labels)
        path = args.out / f"recorded-{tier.name}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        right = sum(r["output"] == t["queue"] for r, t in zip(rows, tickets))
        print(f"{path}: {len(rows)} rows, {right / len(rows):.3f} right")


if __name__ == "__main__":
    main()
