"""`expert predict`: JSONL rows answered by a registered version, through its route or cascade (`pipeline/routing/cascade.py`).

The version answers through its pyfunc model (`ExpertModel.predict`, i.e. `predict.answer`, as eval measured
it); rows under its threshold climb its tiers (or go to its frontier), or come back marked `escalate: true`
with why not (`escalation_skipped`) or why no tier answered (`escalation_error`); `tier` says who answered.
With triage, each row says where the router started it (`triage`: router, score, start tier); a `text` router's
rows sent above the expert skip it and climb from their start tier, and the expert answers them only when no tier
does.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any, TextIO

from pipeline.console import console
from pipeline.data import json_depth
from pipeline.errors import UserError
from pipeline.routing import cascade


def _not_a_number(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def read_inputs(source: TextIO, name: str) -> Iterator[dict[str, Any]]:
    """JSONL rows with a non-empty `text`; a bad line is an error naming it. NaN and Infinity are not JSON: a line
    holding them is refused, so that every line written back is strict JSON."""
    for line_no, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            json_depth.check_depth(line)
            row = json.loads(line, parse_constant=_not_a_number)
        except json_depth.TooDeep as err:
            raise UserError(f"{name}:{line_no}: {err}; each line must be an object with a `text` field") from None
        except ValueError as err:  # JSONDecodeError included
            why = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            raise UserError(f"{name}:{line_no}: not JSON ({why}); each line must be an object with a `text` field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise UserError(f"{name}:{line_no}: each line must be a JSON object with a non-empty string `text`")
        yield row


def predict_with_cascade(model_uri: str, rows: list[dict[str, Any]], escalate: bool = True) -> list[dict[str, Any]]:
    """Expert answers; rows under the version's threshold, or whose confidence is no probability (`expert_error`),
    go to its frontier baseline when a key is set."""
    from pipeline.registry import versions

    _, expert = versions.load_version(model_uri)
    texts = [r["text"] for r in rows]
    answers = expert.predict(None, texts)
    esc = cascade.escalation(expert.recipe, expert.threshold, expert.frontier, escalate, route=expert.route)
    # the version's rows come judged by `cascade.expert_row` (`escalate`, and `expert_error` for a confidence that
    # is no probability), as serving judges them
    out = cascade.escalate([{**row, **answer} for row, answer in zip(rows, answers)], texts, esc, expert)
    late = [i for i, r in enumerate(out) if cascade.awaits_expert(r)]
    for i, answer in zip(late, expert.answer_texts([texts[i] for i in late]), strict=True):
        out[i] = cascade.with_expert_answer(out[i], answer, expert.threshold)  # triage sent it up; no tier answered
    starts = Counter(r["triage"]["start"] for r in out if cascade.sent_up(r))
    if starts:
        console.print(f"predict: triage ({expert.triage.note}) started {sum(starts.values())} row(s) above the "
                      "expert: " + ", ".join(f"{n} at `{tier}`" for tier, n in starts.items()))
    skipped = sum(1 for r in out if "escalation_skipped" in r)
    if skipped:
        console.print(f"[yellow]predict[/]: {skipped} row(s) marked `escalate` (under the threshold, or sent up by "
                      f"triage) but not sent ({esc.why_off}): the expert answered them")
    unanswered = sum(1 for r in out if "expert_error" in r and not r["escalated"])
    if unanswered:
        console.print(f"[red]predict[/]: the expert's confidence was no probability (NaN, infinite or outside [0, 1]) "
                      f"for {unanswered} row(s) that no tier answered: they are written with `answer: null` and "
                      "`expert_error`; the version's weights may be corrupted")
    return out


def write_jsonl(rows: list[dict[str, Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up at call time: stdout may have been replaced since import
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")  # strict JSON: NaN is a bug here
