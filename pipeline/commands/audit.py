"""`expert audit`: what a logged workload costs today, and what it would cost with the expert in front.

From gateway logs or a Batch API output file (both report the answering model and its token usage) and a price
table (dollars per million input and output tokens per model; a model matches its longest listed prefix, so
`gpt-4o-mini` prices `gpt-4o-mini-2024-07-18`): requests, tokens and cost per model, and cost per 1,000
requests. Lines without usage or without a price are counted and reported, never priced as zero. A number that
cannot be a bill (a negative, fractional, non-finite or absurdly large token count; a negative or non-finite
price; a model priced twice in the prices file) stops the audit with exit 2 naming the line or the key, since
any total it went into would be wrong. Given a run
directory whose eval finished, the same workload with the expert: the expert's own cost per 1,000 requests plus
the share the eval's decision escalates (none for `replace`, the test escalation rate at the cascade threshold
for `cascade`) at today's frontier price.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from pipeline.data.log_records import LogRowError, answering_model, batch_response
from pipeline.data.readers import read_rows
from pipeline.errors import UserError
from pipeline.recipe.schema import Price, UniqueKeyLoader
from pipeline.run.stage_documents import MetricsDocument, read_metrics, read_verdict

FORMATS = ("gateway", "openai_batch")
# the most tokens one logged call can report: 2^53 is where floats stop counting whole tokens, and no call comes
# near it (the longest contexts are ~10^7), so a count above it is a corrupted log, not a workload
MAX_TOKENS_PER_CALL = 2**53
USAGE_FIELDS = ("prompt_tokens", "completion_tokens")


class BadNumber(ValueError):
    """A token count a bill cannot be made of; the audit stops on it (`audit_logs`)."""


def token_count(usage: dict[str, Any], field: str) -> int:
    value = usage[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadNumber(f"usage.{field} is {value!r}, not a whole number of tokens")
    if not 0 <= value <= MAX_TOKENS_PER_CALL:
        shown = f"a {len(str(abs(value)))}-digit number" if abs(value) > 10**18 else f"{value:,}"
        raise BadNumber(f"usage.{field} is {shown}, outside 0 to 2^53 tokens")
    return value


def usage_of(row: dict[str, Any], fmt: str) -> tuple[str, dict[str, int]]:
    """The answering model and token usage of one logged call (the shapes `log_records` reads). A line without
    usage raises `LogRowError` (counted as unusable); one whose counts cannot be tokens raises `BadNumber`."""
    if fmt == "openai_batch":
        _, body = batch_response(row)
        request, response = None, body
    else:
        request, response = row.get("request"), row.get("response")
    model = answering_model(request, response)
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(model, str):
        raise LogRowError("no_model", "the line names no model")
    if not isinstance(usage, dict) or not all(usage.get(k) is not None for k in USAGE_FIELDS):
        raise LogRowError("no_usage", "the line reports no prompt_tokens/completion_tokens")
    return model, {"input": token_count(usage, "prompt_tokens"), "output": token_count(usage, "completion_tokens")}


def read_prices(path: Path) -> dict[str, Price]:
    """The prices file: `MODEL: {input, output}` in $/Mtok, each finite and not negative, each model once (YAML
    would keep the last of two silently)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise UserError(f"--prices {path}: file not found") from None
    except yaml.YAMLError as err:
        raise UserError(f"--prices {path}: not valid YAML: {err}") from None
    try:
        return TypeAdapter(dict[str, Price]).validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = " -> ".join(map(str, first["loc"]))
        raise UserError(f"--prices {path}: {where}: {first['msg']}; write `MODEL: {{input: $/Mtok, output: $/Mtok}}` "
                        "per model") from None


def price_for(model: str, prices: dict[str, Price]) -> Price | None:
    matching = [name for name in prices if model == name or model.startswith(name)]
    return prices[max(matching, key=len)] if matching else None


@dataclass
class ModelCost:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0


@dataclass
class Audit:
    by_model: dict[str, ModelCost] = field(default_factory=lambda: defaultdict(ModelCost))
    unpriced: list[str] = field(default_factory=list)
    bad_lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.by_model.values())

    @property
    def cost_usd(self) -> float | None:
        costs = [m.cost_usd for m in self.by_model.values()]
        return None if any(c is None for c in costs) else sum(costs)


def audit_logs(source: Path, fmt: str, prices: dict[str, Price]) -> Audit:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: audit reads logs with token usage: {', '.join(FORMATS)}")
    if not source.is_file():
        raise UserError(f"{source}: file not found")
    result = Audit()
    bad_numbers: list[str] = []
    for line, row, problem in read_rows(source):
        if row is None:
            result.bad_lines.append({"line": line, "reason": problem.split(":")[0], "detail": problem})
            continue
        try:
            model, usage = usage_of(row, fmt)
        except LogRowError as err:
            result.bad_lines.append({"line": line, "reason": err.reason, "detail": str(err)})
            continue
        except BadNumber as err:
            bad_numbers.append(f"line {line}: {err}")
            continue
        cost = result.by_model[model]
        cost.requests += 1
        cost.input_tokens += usage["input"]
        cost.output_tokens += usage["output"]
        price = price_for(model, prices)
        if price is None:
            cost.cost_usd = None
            if model not in result.unpriced:
                result.unpriced.append(model)
        elif cost.cost_usd is not None:
            cost.cost_usd += (usage["input"] * price.input + usage["output"] * price.output) / 1e6
            if not math.isfinite(cost.cost_usd):
                bad_numbers.append(f"line {line}: the cost of {model} overflows (its price times its tokens)")
    if bad_numbers:
        raise UserError(f"{source}: {len(bad_numbers)} line(s) report token counts no bill can be made of; "
                        + "; ".join(bad_numbers[:5]) + ("; ..." if len(bad_numbers) > 5 else "")
                        + ". Fix or remove those lines (a log with them is corrupted) and audit again")
    if not result.by_model:
        raise UserError(f"{source}: no line with a model and token usage ({len(result.bad_lines)} unusable); "
                        f"is it a `{fmt}` file?")
    return result


def with_expert(today_per_1k: float, run_dir: Path) -> dict[str, Any]:
    """The workload's cost per 1,000 requests with the expert in front, from a finished eval's decision."""
    missing = [name for name in ("verdict.json", "metrics.json", "cascade.json") if not (run_dir / "eval" / name).is_file()]
    if missing:
        raise UserError(f"--run-dir {run_dir}: {missing[0]} is missing; run `expert eval` first")
    verdict = read_verdict(run_dir / "eval/verdict.json")
    metrics = read_metrics(run_dir / "eval/metrics.json")
    cascade = json.loads((run_dir / "eval/cascade.json").read_text(encoding="utf-8"))
    decision = verdict.decision
    expert_per_1k = metrics.systems["expert"]["cost_per_1k"]
    if decision == "route":
        return routed_cost(today_per_1k, run_dir, metrics)
    if decision == "replace":
        rate = 0.0
    elif decision == "cascade":
        rate = cascade["test"]["escalation_rate"]
    else:
        return {"decision": decision, "cost_per_1k": None,
                "why": f"the eval's decision is `{decision}`: the expert does not take this traffic"}
    per_1k = expert_per_1k + rate * today_per_1k
    return {"decision": decision, "escalation_rate": rate, "threshold": cascade.get("threshold"),
            "expert_cost_per_1k": expert_per_1k, "cost_per_1k": per_1k,
            "saving": 1 - per_1k / today_per_1k if today_per_1k else None}


def routed_cost(today_per_1k: float, run_dir: Path, metrics: MetricsDocument) -> dict[str, Any]:
    """A route's cost per 1,000 of this workload's requests: each tier's eval cost times the share of test
    requests that reached it, except the last tier, which costs what these logs say the traffic costs today."""
    route = json.loads((run_dir / "eval/route.json").read_text(encoding="utf-8"))
    shares = route["options"][route["choose"]]["test"]["shares"]
    chain = route["chain"]
    reach = [sum(shares[name] for name in chain[k:]) for k in range(len(chain))]
    tier_costs = [metrics.systems[name]["cost_per_1k"] for name in chain[:-1]] + [today_per_1k]
    per_1k = sum(r * c for r, c in zip(reach, tier_costs))
    return {"decision": "route", "chain": chain, "thresholds": route["thresholds"],
            "escalation_rate": 1 - shares[chain[0]], "shares": shares,
            "expert_cost_per_1k": metrics.systems["expert"]["cost_per_1k"], "cost_per_1k": per_1k,
            "saving": 1 - per_1k / today_per_1k if today_per_1k else None}


def report(result: Audit, expert: dict[str, Any] | None) -> dict[str, Any]:
    requests, cost = result.requests, result.cost_usd
    out: dict[str, Any] = {
        "requests": requests,
        "cost_usd": cost,
        "cost_per_1k": None if cost is None else 1000 * cost / requests,
        "by_model": {name: {**vars(m), "cost_per_1k": None if m.cost_usd is None else 1000 * m.cost_usd / m.requests}
                     for name, m in sorted(result.by_model.items())},
        "unpriced_models": result.unpriced,
        "unusable_lines": len(result.bad_lines),
        "unusable_by_reason": dict(sorted(Counter(r["reason"] for r in result.bad_lines).items())),
    }
    if expert is not None:
        out["with_expert"] = expert
    return out


def print_report(doc: dict[str, Any], result: Audit) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.console import console
    from pipeline.routing.frontier import scrub  # a logged error body may echo a key

    table = Table(title="workload cost today")
    for col in ("model", "requests", "input tokens", "output tokens", "cost ($)", "per 1k requests ($)"):
        table.add_column(col, justify="right" if col != "model" else "left")

    def money(v: float | None) -> str:
        return "no price" if v is None else f"{v:,.4f}"

    for name, m in doc["by_model"].items():
        table.add_row(name, f"{m['requests']:,}", f"{m['input_tokens']:,}", f"{m['output_tokens']:,}",
                      money(m["cost_usd"]), money(m["cost_per_1k"]))
    table.add_row("all", f"{doc['requests']:,}", "", "", money(doc["cost_usd"]), money(doc["cost_per_1k"]))
    Console(soft_wrap=True).print(table)
    if result.unpriced:
        console.print(f"[yellow]audit[/]: no price for {', '.join(result.unpriced)}; add them to --prices")
    if result.bad_lines:
        first = result.bad_lines[0]
        console.print(f"[yellow]audit[/]: {len(result.bad_lines)} line(s) not counted "
                      f"({', '.join(f'{k}={v}' for k, v in doc['unusable_by_reason'].items())}); "
                      f"first: line {first['line']}: {scrub(first['detail'])}")
    expert = doc.get("with_expert")
    if expert is not None:
        if expert["cost_per_1k"] is None:
            console.print(f"with the expert: {expert['why']}")
        else:
            console.print(
                f"with the expert ({expert['decision']}, {expert['escalation_rate']:.1%} escalated): "
                f"${expert['cost_per_1k']:,.4f} per 1k requests"
                + (f", {expert['saving']:.1%} less than today" if expert["saving"] is not None else ""))
