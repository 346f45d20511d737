"""`expert audit` on gateway and Batch API logs: the cost by model from the logged usage and a price table, the
lines it cannot count reported, and the same workload priced with an expert from an eval's decision."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

PRICES = "gpt-4o-mini: {input: 0.15, output: 0.60}\ngpt-4o: {input: 2.50, output: 10.00}\n"


def gateway(model: str, prompt: int, completion: int) -> dict:
    return {"request": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
            "response": {"model": model, "choices": [{"message": {"role": "assistant", "content": "billing"}}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion}}}


def write_logs(path, lines) -> None:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def audit(tmp_path, *args):
    (tmp_path / "prices.yaml").write_text(PRICES)
    result = CliRunner().invoke(app, ["audit", *map(str, args), "--prices", str(tmp_path / "prices.yaml"),
                                      "--out", str(tmp_path / "audit.json")])
    return result, (json.loads((tmp_path / "audit.json").read_text()) if result.exit_code == 0 else None)


def test_gateway_logs_are_priced_by_model_and_bad_lines_reported(tmp_path):
    lines = [gateway("gpt-4o-mini-2024-07-18", 1000, 10)] * 30 + [gateway("gpt-4o", 2000, 100)] * 10
    lines += ["{broken", {"request": {}, "response": {"model": "gpt-4o"}}]
    write_logs(tmp_path / "logs.jsonl", lines)
    result, doc = audit(tmp_path, tmp_path / "logs.jsonl")
    assert result.exit_code == 0, result.output
    mini = 30 * (1000 * 0.15 + 10 * 0.60) / 1e6  # the dated model priced by its listed prefix
    big = 10 * (2000 * 2.50 + 100 * 10.00) / 1e6
    assert doc["by_model"]["gpt-4o-mini-2024-07-18"]["cost_usd"] == pytest.approx(mini)
    assert doc["by_model"]["gpt-4o"]["cost_usd"] == pytest.approx(big)
    assert doc["requests"] == 40 and doc["cost_per_1k"] == pytest.approx(1000 * (mini + big) / 40)
    assert doc["unusable_by_reason"] == {"no_usage": 1, "unparsable": 1}
    assert "2 line(s) not counted" in " ".join(result.output.split())


def test_an_unpriced_model_is_no_price_not_free(tmp_path):
    write_logs(tmp_path / "logs.jsonl", [gateway("claude-x", 100, 10), gateway("gpt-4o", 100, 10)])
    result, doc = audit(tmp_path, tmp_path / "logs.jsonl")
    assert result.exit_code == 0, result.output
    assert doc["cost_usd"] is None and doc["unpriced_models"] == ["claude-x"]
    assert "no price for claude-x" in result.output


def verdict(decision: str) -> dict:
    """The keys every eval writes to verdict.json (`stage_documents.VerdictDocument`), with `decision`."""
    return {"passed": False, "decision": decision, "metric": "accuracy", "expert": 0.8}


def test_batch_output_and_the_cost_with_an_expert(tmp_path):
    body = {"model": "gpt-4o", "usage": {"prompt_tokens": 2000, "completion_tokens": 100}, "choices": []}
    lines = [{"custom_id": f"r{i}", "response": {"status_code": 200, "body": body}, "error": None} for i in range(20)]
    lines.append({"custom_id": "failed", "response": None, "error": {"message": "rate limited"}})
    write_logs(tmp_path / "out.jsonl", lines)
    run = tmp_path / "run" / "eval"
    run.mkdir(parents=True)
    (run / "verdict.json").write_text(json.dumps(verdict("cascade")))
    (run / "metrics.json").write_text(json.dumps({"systems": {"expert": {"cost_per_1k": 0.02}}, "test_examples": 20}))
    (run / "cascade.json").write_text(json.dumps({"threshold": 0.8, "test": {"escalation_rate": 0.25}}))
    result, doc = audit(tmp_path, tmp_path / "out.jsonl", "--format", "openai_batch", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    today = 1000 * (2000 * 2.50 + 100 * 10.00) / 1e6  # $6 per 1k requests
    assert doc["cost_per_1k"] == pytest.approx(today) and doc["unusable_by_reason"] == {"batch_failed": 1}
    assert doc["with_expert"]["cost_per_1k"] == pytest.approx(0.02 + 0.25 * today)
    assert doc["with_expert"]["saving"] == pytest.approx(1 - (0.02 + 0.25 * today) / today)
    # a route: expert, then a mid tier at its eval cost, then today's traffic cost for what reaches the last tier
    (run / "verdict.json").write_text(json.dumps(verdict("route")))
    (run / "metrics.json").write_text(json.dumps({"systems": {"expert": {"cost_per_1k": 0.02},
                                                              "mid": {"cost_per_1k": 0.5}}, "test_examples": 20}))
    (run / "route.json").write_text(json.dumps({"chain": ["expert", "mid", "frontier"], "thresholds": [0.9, 0.7],
                                                "choose": "point", "options": {"point": {"test": {"shares": {
                                                    "expert": 0.6, "mid": 0.3, "frontier": 0.1}}}}}))
    result, doc = audit(tmp_path, tmp_path / "out.jsonl", "--format", "openai_batch", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    routed = 0.02 + 0.4 * 0.5 + 0.1 * today
    assert doc["with_expert"]["cost_per_1k"] == pytest.approx(routed)
    assert doc["with_expert"]["escalation_rate"] == pytest.approx(0.4) and "route" in result.output
    (run / "verdict.json").write_text(json.dumps(verdict("keep_frontier")))
    result, doc = audit(tmp_path, tmp_path / "out.jsonl", "--format", "openai_batch", "--run-dir", tmp_path / "run")
    assert doc["with_expert"]["cost_per_1k"] is None and "keep_frontier" in result.output


def test_bad_prices_and_formats_exit_2_naming_the_problem(tmp_path):
    write_logs(tmp_path / "logs.jsonl", [gateway("gpt-4o", 1, 1)])
    (tmp_path / "prices.yaml").write_text("gpt-4o: {input: -1, output: 1}\n")
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "logs.jsonl"), "--prices", str(tmp_path / "prices.yaml")])
    assert result.exit_code == 2 and "gpt-4o -> input" in result.output
    result, _ = audit(tmp_path, tmp_path / "logs.jsonl", "--format", "chat")
    assert result.exit_code == 2 and "gateway, openai_batch" in result.output


@pytest.mark.parametrize("usage, named", [
    ({"prompt_tokens": -1_000_000_000, "completion_tokens": 10}, "usage.prompt_tokens is -1,000,000,000"),
    ({"prompt_tokens": 100, "completion_tokens": 10**400}, "usage.completion_tokens is a 401-digit number"),
    ({"prompt_tokens": 2**53 + 1, "completion_tokens": 1}, "usage.prompt_tokens is 9,007,199,254,740,993, outside 0 to 2^53"),
    ({"prompt_tokens": "1e400", "completion_tokens": 1}, "usage.prompt_tokens is '1e400', not a whole number"),
    ({"prompt_tokens": True, "completion_tokens": 1}, "usage.prompt_tokens is True, not a whole number"),
    ({"prompt_tokens": 12.5, "completion_tokens": 1}, "usage.prompt_tokens is 12.5, not a whole number"),
])
def test_token_counts_no_bill_can_be_made_of_exit_2_naming_the_line(tmp_path, usage, named):
    bad = gateway("gpt-4o", 1, 1)
    bad["response"]["usage"] = usage
    write_logs(tmp_path / "logs.jsonl", [gateway("gpt-4o", 100, 10)] * 3 + [bad])
    result, _ = audit(tmp_path, tmp_path / "logs.jsonl")
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "logs.jsonl" in output and f"line 4: {named}" in output


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "NaN", "Infinity"])
def test_non_finite_token_counts_written_as_json_numbers_exit_2(tmp_path, literal):
    good = json.dumps(gateway("gpt-4o", 100, 10))
    write_logs(tmp_path / "logs.jsonl", [good, good.replace('"prompt_tokens": 100', f'"prompt_tokens": {literal}')])
    result, _ = audit(tmp_path, tmp_path / "logs.jsonl")
    assert result.exit_code == 2 and "line 2: usage.prompt_tokens is" in " ".join(result.output.split())


@pytest.mark.parametrize("prices, named", [
    ("gpt-4o: {input: 2.5, output: 10}\ngpt-4o-mini: {input: 1, output: 1}\ngpt-4o: {input: 0, output: 0}\n",
     "key `gpt-4o` is given twice (lines 1 and 3)"),
    ("gpt-4o: {input: .inf, output: 10}\n", "gpt-4o -> input"),
    ("gpt-4o: {input: 2.5, output: .nan}\n", "gpt-4o -> output"),
    ("gpt-4o: {input: 2.5, output: -.inf}\n", "gpt-4o -> output"),
])
def test_prices_that_are_not_finite_or_given_twice_exit_2_naming_the_key(tmp_path, prices, named):
    write_logs(tmp_path / "logs.jsonl", [gateway("gpt-4o", 100, 10)])
    (tmp_path / "prices.yaml").write_text(prices)
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "logs.jsonl"), "--prices", str(tmp_path / "prices.yaml")])
    assert result.exit_code == 2, result.output
    assert "prices.yaml" in result.output and named in " ".join(result.output.split())


def test_a_cost_that_overflows_exits_2_naming_the_line(tmp_path):
    write_logs(tmp_path / "logs.jsonl", [gateway("gpt-4o", 100, 10), gateway("gpt-4o", 2**53, 0)])
    (tmp_path / "prices.yaml").write_text("gpt-4o: {input: 1.0e+300, output: 1}\n")
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "logs.jsonl"), "--prices", str(tmp_path / "prices.yaml")])
    assert result.exit_code == 2 and "line 2: the cost of gpt-4o overflows" in " ".join(result.output.split())


def test_a_line_nested_200000_deep_is_one_unusable_line_not_a_crash(tmp_path):
    deep = '{"request": ' + "[" * 200_000 + "]" * 200_000 + "}"
    write_logs(tmp_path / "logs.jsonl", [gateway("gpt-4o", 100, 10), deep, gateway("gpt-4o", 100, 10)])
    result, doc = audit(tmp_path, tmp_path / "logs.jsonl")
    assert result.exit_code == 0, result.output
    assert doc["requests"] == 2 and doc["unusable_by_reason"] == {"too_deep": 1}
    assert "line 2: too_deep: JSON nested deeper than 100 levels" in " ".join(result.output.split())
    write_logs(tmp_path / "logs.jsonl", [deep])  # nothing usable left: a user error, not a RecursionError
    result, _ = audit(tmp_path, tmp_path / "logs.jsonl")
    assert result.exit_code == 2 and "no line with a model and token usage" in " ".join(result.output.split())
