"""The `openai` baseline against a real local OpenAI-compatible HTTP server, faults included.

The server is real (tests/support/openai_server.py); only `sleep` is replaced,
so the test records the waits the retry loop asked for instead of spending them.
"""

from __future__ import annotations

import time

import pytest

from pipeline.errors import UserError
from pipeline.recipe.schema import OpenAIBaseline
from pipeline.routing import frontier
from tests.support.openai_server import FakeOpenAIServer, count_tokens

KEY = "sk-unit-secret-0987654321"
PROMPTS = [[{"role": "system", "content": "Route it."}, {"role": "user", "content": f"message number {i}"}] for i in range(3)]


def baseline(base_url: str, **extra) -> OpenAIBaseline:
    return OpenAIBaseline(name="frontier", kind="openai", model="fake-frontier", base_url=base_url,
                           api_key_env="UNIT_FRONTIER_KEY", **{"max_concurrency": 1, **extra})


@pytest.fixture
def cache(tmp_path):
    c = frontier.ResponseCache(tmp_path / "responses.sqlite")
    yield c
    c.close()


def test_faults_are_retried_boundedly_usage_counted_once_and_rerun_makes_zero_calls(cache):
    waits: list[float] = []
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.faults += [("status", 429, {"Retry-After": "7"}), ("status", 500, {}), ("delay", 2.0), ("malformed",)]
        b = baseline(srv.base_url, max_retries=4, timeout_s=0.5)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], max_tokens=8, cache=cache, sleep=waits.append)
        assert len(srv.requests) == 5, "four faults, then the fifth attempt succeeds"
        assert rows[0]["raw"] == "billing" and rows[0]["attempts"] == 5 and rows[0].get("error") is None
        assert waits[0] == 7.0, "Retry-After is honoured"
        assert len(waits) == 4 and all(0 <= w <= frontier.BACKOFF_MAX_S for w in waits[1:])
        expected_in = sum(count_tokens(m["content"]) for m in PROMPTS[0])
        assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (expected_in, 1), "usage of the one success only"

        again = frontier.ask_all(b, KEY, PROMPTS[:1], max_tokens=8, cache=cache, sleep=waits.append)
        assert len(srv.requests) == 5, "a re-run is answered from the cache"
        assert again[0]["cached"] and again[0]["raw"] == "billing" and again[0]["input_tokens"] == expected_in


def test_retries_stay_bounded_and_errors_are_not_cached(cache):
    waits: list[float] = []
    with FakeOpenAIServer(lambda body: "shipping", api_key=KEY) as srv:
        srv.faults += [("status", 503, {})] * 3
        b = baseline(srv.base_url, max_retries=2)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], max_tokens=8, cache=cache, sleep=waits.append)
        assert len(srv.requests) == 3, "1 try + max_retries 2, then give up"
        assert rows[0]["raw"] is None and "503" in rows[0]["error"] and rows[0]["input_tokens"] == 0
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], max_tokens=8, cache=cache, sleep=waits.append)
        assert len(srv.requests) == 4, "the failure was not cached: the re-run asks again"
        assert rows[0]["raw"] == "shipping"


def test_client_errors_are_not_retried(cache):
    with FakeOpenAIServer(lambda body: "x", api_key=KEY) as srv:
        srv.faults.append(("status", 400, {}))
        rows = frontier.ask_all(baseline(srv.base_url), KEY, PROMPTS[:1], max_tokens=8, cache=cache, sleep=lambda s: None)
        assert len(srv.requests) == 1 and rows[0]["attempts"] == 1 and "HTTP 400" in rows[0]["error"]
        rows = frontier.ask_all(baseline(srv.base_url), "wrong-key", PROMPTS[1:2], 8, cache=cache, sleep=lambda s: None)
        assert rows[0]["attempts"] == 1 and "HTTP 401" in rows[0]["error"]


def test_cache_key_covers_endpoint_model_messages_and_params(cache):
    params = {"temperature": 0, "max_tokens": 8}
    k = frontier.cache_key("http://a/v1", "m", PROMPTS[0], params)
    assert k == frontier.cache_key("http://a/v1/", "m", PROMPTS[0], dict(reversed(params.items())))
    assert len({k, frontier.cache_key("http://b/v1", "m", PROMPTS[0], params),
                frontier.cache_key("http://a/v1", "m2", PROMPTS[0], params),
                frontier.cache_key("http://a/v1", "m", PROMPTS[1], params),
                frontier.cache_key("http://a/v1", "m", PROMPTS[0], {**params, "max_tokens": 9})}) == 5


def test_json_schema_response_format_is_requested_when_asked(cache):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with FakeOpenAIServer(lambda body: '{"n": 3}', api_key=KEY) as srv:
        frontier.ask_all(baseline(srv.base_url, json_schema_response=True), KEY, PROMPTS[:1], 8, schema, cache)
        frontier.ask_all(baseline(srv.base_url), KEY, PROMPTS[:1], 8, schema, cache)
    assert srv.requests[0]["response_format"]["json_schema"]["schema"] == schema
    assert "response_format" not in srv.requests[1]


def test_concurrent_answers_keep_prompt_order(cache):
    with FakeOpenAIServer(lambda body: body["messages"][-1]["content"].split()[-1], api_key=KEY) as srv:
        b = OpenAIBaseline(name="f", kind="openai", model="m", base_url=srv.base_url, api_key_env="K", max_concurrency=3)
        rows = frontier.ask_all(b, KEY, PROMPTS, 8, cache=cache)
    assert [r["raw"] for r in rows] == ["0", "1", "2"]


def test_missing_key_skips_or_fails_when_required(monkeypatch):
    monkeypatch.delenv("UNIT_FRONTIER_KEY", raising=False)
    assert frontier.api_key(baseline("http://127.0.0.1:9/v1")) is None
    with pytest.raises(UserError, match="UNIT_FRONTIER_KEY is not set"):
        frontier.api_key(baseline("http://127.0.0.1:9/v1", required=True))


def test_cost_per_1k_from_usage_and_price():
    price = OpenAIBaseline(name="f", kind="openai", model="m", api_key_env="K",
                            price_per_mtok={"input": 2.0, "output": 10.0}).price_per_mtok
    rows = [{"raw": "a", "input_tokens": 100, "output_tokens": 10}, {"raw": "b", "input_tokens": 300, "output_tokens": 30},
            {"raw": None, "error": "x", "input_tokens": 0, "output_tokens": 0}]
    assert frontier.cost_per_1k(price, rows) == pytest.approx(1000 * (200 * 2.0 + 20 * 10.0) / 1e6)
    assert frontier.cost_per_1k(None, rows) is None


def test_a_key_echoed_in_an_error_body_never_reaches_the_error_text(cache):
    """Some gateways put the Authorization header in their 401 body; the SDK's error text carries it verbatim,
    and that text goes to eval's predictions (logged to MLflow), `expert predict` and `expert serve` answers."""
    with FakeOpenAIServer(lambda body: "x", api_key=KEY) as srv:
        srv.faults.append(("echo_auth", 401))
        rows = frontier.ask_all(baseline(srv.base_url), KEY, PROMPTS[:1], max_tokens=8, cache=cache, sleep=lambda s: None)
    assert "HTTP 401" in rows[0]["error"] and "Invalid credentials" in rows[0]["error"]
    assert KEY not in rows[0]["error"] and "Bearer [REDACTED]" in rows[0]["error"]


def test_scrub_removes_the_key_env_secrets_and_token_shapes(monkeypatch):
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "opaque-provider-secret-42")
    text = ("key sk-abcdefgh12345678 in body, Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x.y, "
            "env opaque-provider-secret-42, given my-own-secret-value")
    clean = frontier.scrub(text, "my-own-secret-value")
    for secret in ("sk-abcdefgh12345678", "eyJhbGciOiJIUzI1NiJ9", "opaque-provider-secret-42", "my-own-secret-value"):
        assert secret not in clean
    assert clean.count("[REDACTED]") == 4 and clean.startswith("key [REDACTED] in body")


def test_an_empty_choices_list_is_named_not_an_index_error(cache):
    with FakeOpenAIServer(lambda body: "x", api_key=KEY) as srv:
        srv.faults.append(("empty_choices",))
        rows = frontier.ask_all(baseline(srv.base_url, max_retries=0), KEY, PROMPTS[:1], max_tokens=8, cache=cache,
                                sleep=lambda s: None)
    assert "empty `choices` list" in rows[0]["error"] and "IndexError" not in rows[0]["error"]


# --- the budget: reserved per attempt before it is sent, settled on the answer ---------------------------------

PRICE = {"input": 100.0, "output": 400.0}  # dollars per million tokens: a few cents a request here
MANY = [[{"role": "system", "content": "Route it."}, {"role": "user", "content": f"message number {i} " + "word " * 40}]
        for i in range(300)]


def priced(base_url: str, **extra) -> OpenAIBaseline:
    return baseline(base_url, price_per_mtok=PRICE, **extra)


def bound_usd(b: OpenAIBaseline, messages, max_tokens: int) -> float:
    return frontier.Budget(b.price_per_mtok).cost(frontier.prompt_token_bound(messages), max_tokens)


def test_at_concurrency_64_a_small_budget_is_never_overspent(cache):
    """Issue 33: checked between chunks of max_concurrency x 8 rows, `max_cost_usd: 0.1` spent $8.05 at
    concurrency 64. Now each attempt is reserved at its upper bound before it is sent: what the endpoint bills
    for the requests it received stays within the cap."""
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        b = priced(srv.base_url, max_concurrency=64)
        budget = frontier.Budget(b.price_per_mtok, cap_usd=0.1)
        rows = frontier.ask_all(b, KEY, MANY, 16, cache=cache, budget=budget)
        billed = srv.billed_usd(PRICE["input"], PRICE["output"])
        answered = [r for r in rows if r["raw"] is not None]
        refused = [r for r in rows if r.get("budget_refused")]
        assert billed <= 0.1 and budget.spent_usd <= 0.1
        assert budget.spent_usd >= billed, "the count is never below what the endpoint bills"
        assert len(srv.requests) == len(answered) == budget.sent and len(answered) + len(refused) == len(MANY)
        assert 0 < len(answered) < len(MANY) and budget.refused == len(refused)
        assert billed + bound_usd(b, MANY[0], 16) > 0.1 * 0.9, "it keeps going until the next request may not fit"
        assert all(r["error"].startswith("BudgetExhausted: not sent") for r in refused)
        assert budget.in_flight == 0 and abs(budget.reserved_usd) < 1e-12


def test_a_request_is_sent_exactly_when_its_bound_fits_the_cap(cache):
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        b = priced(srv.base_url)
        bound = bound_usd(b, PROMPTS[0], 16)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, budget=frontier.Budget(b.price_per_mtok,
                                                                                             bound * (1 - 1e-9)))
        assert len(srv.requests) == 0 and rows[0]["budget_refused"]
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, budget=frontier.Budget(b.price_per_mtok,
                                                                                             bound * (1 + 1e-9)))
        assert len(srv.requests) == 1 and rows[0]["raw"] == "billing"


def test_cached_answers_count_against_the_cap_before_any_request(cache):
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        b = priced(srv.base_url)
        first = frontier.ask_all(b, KEY, PROMPTS[:2], 16, cache=cache, budget=frontier.Budget(b.price_per_mtok))
        paid = sum(r["cost_usd"] for r in first)
        budget = frontier.Budget(b.price_per_mtok, cap_usd=paid + bound_usd(b, PROMPTS[2], 16) * 0.5)
        rows = frontier.ask_all(b, KEY, PROMPTS, 16, cache=cache, budget=budget)
        assert len(srv.requests) == 2, "the cached two are free; the third does not fit what they leave"
        assert [r.get("cached") for r in rows[:2]] == [True, True] and rows[2]["budget_refused"]
        assert budget.cached_usd == pytest.approx(paid) and budget.spent_usd == pytest.approx(paid)


def test_an_answer_without_usage_is_priced_from_an_upper_bound_and_marked_estimated(cache):
    """Issue 33: a teacher that returns no `usage` was priced at $0."""
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.send_usage = False
        b = priced(srv.base_url)
        budget = frontier.Budget(b.price_per_mtok)
        rows = frontier.ask_all(b, KEY, PROMPTS, 16, cache=cache, budget=budget)
        billed = srv.billed_usd(PRICE["input"], PRICE["output"])
    assert all(r["usage_estimated"] and r["cost_usd"] > 0 for r in rows) and budget.estimated_answers == 3
    assert billed <= budget.spent_usd <= sum(bound_usd(b, p, 16) for p in PROMPTS) + 1e-12
    assert rows[0]["input_tokens"] == frontier.prompt_token_bound(PROMPTS[0]) and rows[0]["output_tokens"] == 7
    again = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache)
    assert again[0]["cached"] and again[0]["usage_estimated"], "the mark survives the cache"


def test_timed_out_attempts_are_charged_at_their_bound_and_reported(cache):
    """Issue 33: attempts that timed out were never counted although the endpoint received (and billed) them."""
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.faults += [("delay", 1.5)] * 2
        b = priced(srv.base_url, max_retries=1, timeout_s=0.3)
        budget = frontier.Budget(b.price_per_mtok)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, budget=budget, sleep=lambda s: None)
        assert rows[0]["raw"] is None and "Timeout" in rows[0]["error"] and len(srv.requests) == 2
        time.sleep(1.5)  # the endpoint finishes (and bills) both
        billed = srv.billed_usd(PRICE["input"], PRICE["output"])
    bound = bound_usd(b, PROMPTS[0], 16)
    assert (budget.sent, budget.failed_attempts) == (2, 2)
    assert budget.failed_usd == pytest.approx(2 * bound) == budget.spent_usd == rows[0]["cost_usd"]
    assert 0 < billed <= budget.spent_usd


def test_a_refused_connection_is_not_charged(cache):
    with FakeOpenAIServer(lambda body: "x") as srv:
        down = srv.base_url
    b = priced(down, max_retries=1)
    budget = frontier.Budget(b.price_per_mtok)
    rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, budget=budget, sleep=lambda s: None)
    assert "APIConnectionError" in rows[0]["error"] and rows[0]["attempts"] == 2
    assert (budget.sent, budget.spent_usd, budget.in_flight) == (0, 0.0, 0)


# --- answers that are not answers -------------------------------------------------------------------------------

def test_a_log_probability_above_zero_is_a_malformed_answer_not_a_sure_one(cache):
    """Issue 33 (10): a confidence above 1 (logprob +5) was accepted."""
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.token_logprob = 5.0
        b = baseline(srv.base_url, max_retries=1)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, sleep=lambda s: None, logprobs=True)
        assert rows[0]["raw"] is None and rows[0].get("confidence") is None and len(srv.requests) == 2
        assert "MalformedAnswer" in rows[0]["error"] and "5.0" in rows[0]["error"]
        srv.token_logprob = frontier.LOGPROB_ROUNDING  # rounding at the edge: a sure answer, not an error
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, logprobs=True)
        assert rows[0]["raw"] == "billing" and rows[0]["confidence"] == 1.0, "and it was not cached before"


class _Choice:
    def __init__(self, *logprobs):
        token = type("Token", (), {})
        self.logprobs = type("Logprobs", (), {"content": [type("T", (token,), {"logprob": v})() for v in logprobs]})()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 0.01])
def test_non_finite_or_positive_log_probabilities_are_refused(bad):
    with pytest.raises(frontier.MalformedAnswer, match="not a finite number <= 0"):
        frontier.answer_probability(_Choice(-0.1, bad))
    assert frontier.answer_probability(_Choice(-0.1, -0.2)) == pytest.approx(0.7408182, abs=1e-6)


def test_an_answer_over_the_size_cap_is_a_failure_never_cached(cache):
    """Issue 33 (10): 5 MB teacher answers were cached as labels."""
    cap = frontier.answer_byte_cap(16)
    sizes = iter([5_000_000, cap + 1, cap])
    with FakeOpenAIServer(lambda body: "x" * next(sizes), api_key=KEY) as srv:
        b = baseline(srv.base_url, max_retries=0)
        huge = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache)
        over = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache)
        edge = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache)
        assert len(srv.requests) == 3, "neither oversize answer was cached"
    assert "5,000,000 bytes, over the cap" in huge[0]["error"] and huge[0]["raw"] is None
    assert f"{cap + 1:,} bytes" in over[0]["error"] and len(edge[0]["raw"]) == cap


# --- a deadline on the whole call -------------------------------------------------------------------------------

def test_a_deadline_caps_each_attempt_and_no_attempt_begins_after_it(cache):
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.faults += [("delay", 5.0)]
        b = baseline(srv.base_url, max_retries=3, timeout_s=30)
        started = time.monotonic()
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, sleep=lambda s: None, deadline_s=0.5)
        took = time.monotonic() - started
        assert took < 2.0, "the attempt's timeout was capped at the time left, not timeout_s"
        assert len(srv.requests) == 1 and rows[0]["error"].startswith("DeadlineExceeded: the deadline of 0.5 s")
        assert rows[0]["deadline_exceeded"] is True, "callers tell a deadline from other failures by this flag"
        assert 0.3 <= rows[0]["latency_s"] <= took, "the attempt's real time (socket timers may fire a little early)"


def test_a_deadline_reports_the_time_of_every_attempt(cache):
    with FakeOpenAIServer(lambda body: "billing", api_key=KEY) as srv:
        srv.faults += [("delay", 3.0)] * 5
        b = baseline(srv.base_url, max_retries=5, timeout_s=0.3)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, sleep=lambda s: None, deadline_s=1.0)
    assert rows[0]["raw"] is None and "DeadlineExceeded" in rows[0]["error"] and "APITimeoutError" in rows[0]["error"]
    attempts = rows[0]["attempts"]
    assert attempts >= 2 and rows[0]["latency_s"] >= attempts * 0.3 - 0.05, "the sum over attempts, not the last one"


def test_attempt_timeouts_connect_apart_and_capped_at_the_time_left():
    t = frontier.attempt_timeout(60, None)
    assert (t.connect, t.read, t.write) == (frontier.CONNECT_TIMEOUT_S, 60, 60)
    t = frontier.attempt_timeout(60, 2.5)
    assert (t.connect, t.read, t.pool) == (2.5, 2.5, 2.5)


def test_an_oversize_answer_is_charged_at_its_usage_when_that_is_more_than_its_bound(cache):
    """An endpoint that ignores max_tokens bills what it sent: the count follows its usage, not the bound."""
    with FakeOpenAIServer(lambda body: "x " * 3000, api_key=KEY) as srv:
        b = priced(srv.base_url, max_retries=0)
        budget = frontier.Budget(b.price_per_mtok)
        rows = frontier.ask_all(b, KEY, PROMPTS[:1], 16, cache=cache, budget=budget)
        billed = srv.billed_usd(PRICE["input"], PRICE["output"])
    assert rows[0]["raw"] is None and "over the cap" in rows[0]["error"]
    assert billed > bound_usd(b, PROMPTS[0], 16)
    assert budget.failed_usd == pytest.approx(billed) == budget.spent_usd and budget.failed_attempts == 1
