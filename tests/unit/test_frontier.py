"""The `openai` baseline against a real local OpenAI-compatible HTTP server, faults included.

The server is real (tests/support/openai_server.py); only `sleep` is replaced,
so the test records the waits the retry loop asked for instead of spending them.
"""

from __future__ import annotations

import pytest

from pipeline import frontier
from pipeline.errors import UserError
from pipeline.recipe import OpenAIBaseline
from tests.support.openai_server import FakeOpenAIServer, count_tokens

KEY = "sk-unit-secret-0987654321"
PROMPTS = [[{"role": "system", "content": "Route it."}, {"role": "user", "content": f"message number {i}"}] for i in range(3)]


def baseline(base_url: str, **extra) -> OpenAIBaseline:
    return OpenAIBaseline(name="frontier", kind="openai", model="fake-frontier", base_url=base_url,
                           api_key_env="UNIT_FRONTIER_KEY", max_concurrency=1, **extra)


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
