"""`Example`, the compact row prep keeps for every usable data row, and the records written from one.

The split and the duplicate checks need every row at once, so an Example holds
only what later steps read: its id and location, text, target and token counts.
`render` is the row a split file holds (TRL conversational prompt/completion),
`rejection` the record of a row `rejected.jsonl` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Example:
    id: str
    line: int
    text: str
    target: Any
    source: str = ""
    fixed_split: str | None = None  # "validation"/"test"/"router" when it came from that split's own source
    provenance: str = "gold"  # where the target came from: `gold` (the data's own), `log:<model>` (a logged answer)
    usage: dict[str, int] | None = None  # a logged answer's token counts, as the log reports them
    prompt_tokens: int = 0
    answer_tokens: int = 0

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"


def rejection(e: Example, reason: str, detail: str) -> dict[str, Any]:
    return {"source": e.source, "line": e.line, "id": e.id, "reason": reason, "detail": detail}


def chat_messages(system: str, text: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def render(e: Example, system: str, task, spec) -> dict[str, Any]:
    """A split file's row. `provenance` is written for targets that are not the data's own (gold rows leave it
    out, as does `usage`, a logged answer's token counts), so splits of labeled data, and the fingerprints
    promotion compares, stay as they were."""
    row = {
        "id": e.id,
        "text": e.text,
        "target": e.target,
        "prompt": chat_messages(system, e.text),
        "completion": [{"role": "assistant", "content": task.target_text(e.target, spec)}],
    }
    if e.provenance != "gold":
        row["provenance"] = e.provenance
    if e.usage is not None:
        row["usage"] = e.usage
    return row
