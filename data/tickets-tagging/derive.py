"""Derive the ticket-tagging sample (multi-label) from the shipped tickets, deterministically.

Each ticket of ../tickets/tickets.jsonl keeps its id and text; its `tags` are its queue plus every rule below whose
pattern occurs in the lower-cased text, sorted:

- `refund`:  "refund"
- `invoice`: "invoice" or "receipt"
- `urgent`:  "urgent", "asap", "immediately", "right now", "today" or "!"

Run from the repository root: `python data/tickets-tagging/derive.py` (standard library only); it rewrites
tickets-tagging.jsonl beside it, byte-identical on every run (one JSON object per line, keys sorted, UTF-8).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "tickets" / "tickets.jsonl"
OUT = HERE / "tickets-tagging.jsonl"
RULES = {
    "refund": re.compile(r"refund"),
    "invoice": re.compile(r"invoice|receipt"),
    "urgent": re.compile(r"urgent|asap|immediately|right now|today|!"),
}


def tags(row: dict) -> list[str]:
    text = row["text"].lower()
    return sorted({row["queue"], *(tag for tag, pattern in RULES.items() if pattern.search(text))})


def derive(source: Path = SOURCE) -> str:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "".join(json.dumps({"id": r["id"], "tags": tags(r), "text": r["text"]}, ensure_ascii=False, sort_keys=True)
                   + "\n" for r in rows)


if __name__ == "__main__":
    OUT.write_text(derive(), encoding="utf-8")
