"""Frontier traffic as training data: one logged conversation into the expert's input and the frontier's answer.

Three shapes, each one JSON object per line:
- `chat`: OpenAI's fine-tuning format, `{"messages": [...]}`; the answer is the last assistant turn and the
  input is what came before it.
- `gateway`: what LLM gateways export per call, `{"request": {"messages": [...], "model"?},
  "response": {"choices": [{"message": {...}}], "usage"?, "model"?}}`; the answer is the first choice.
- `openai_batch`: a Batch API output file (`{"custom_id", "response": {"status_code", "body"}, "error"}`) read
  against its input file (`{"custom_id", "body": {"messages"}}`): each result is a gateway record of its request.
  Failed results, results without a request and requests without a result are each reported, never dropped.

The input is the last user message before the answer (`data.input: last_user`) or the conversation before it
rendered with roles (`conversation`; the system prompt left out, since the expert has its own). A line that
does not have that shape raises `LogRowError` with a reason code and what is wrong, so prep rejects it with its
line like any bad row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


class LogRowError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class LoggedCall:
    text: str  # the expert's input
    answer: str  # the frontier's answer, as text
    model: str | None  # the model that answered, when the log says
    usage: dict[str, int] | None  # token counts the log reports (prompt_tokens, completion_tokens, ...)


def _content(message: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of content parts (their `text` parts joined)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise LogRowError("bad_log_shape", f"{where} is not a message with a `role`")
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise LogRowError("non_text", f"{where} has content parts that are not text (images, audio)")
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise LogRowError("non_text", f"{where} has no text content")
    return content


def expert_input(messages: list[Any], mode: Literal["last_user", "conversation"]) -> str:
    """The expert's input from the messages before the answer."""
    if not messages:
        raise LogRowError("bad_log_shape", "no messages before the answer")
    turns = [(m.get("role") if isinstance(m, dict) else None, _content(m, f"message {i}")) for i, m in enumerate(messages)]
    if mode == "last_user":
        users = [text for role, text in turns if role == "user"]
        if not users:
            raise LogRowError("bad_log_shape", "no user message before the answer")
        return users[-1]
    return "\n\n".join(f"{role}: {text}" for role, text in turns if role != "system")


def _usage(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)} or None


def read_chat(row: dict[str, Any], mode: Literal["last_user", "conversation"]) -> LoggedCall:
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise LogRowError("bad_log_shape", "`messages` is missing or not a list (chat format: {\"messages\": [...]})")
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise LogRowError("no_answer", "the last message is not an assistant turn: nothing to learn from")
    return LoggedCall(expert_input(messages[:-1], mode), _content(last, "the last assistant message"),
                      row.get("model") if isinstance(row.get("model"), str) else None, None)


def read_gateway(row: dict[str, Any], mode: Literal["last_user", "conversation"]) -> LoggedCall:
    request, response = row.get("request"), row.get("response")
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise LogRowError("bad_log_shape", "`request.messages` is missing (gateway format: "
                          "{\"request\": {\"messages\": [...]}, \"response\": {\"choices\": [...]}})")
    if not isinstance(response, dict):
        raise LogRowError("no_answer", "`response` is missing: the call failed or was not logged")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LogRowError("no_answer", "`response.choices` is empty: the frontier gave no answer")
    message = choices[0].get("message")
    return LoggedCall(expert_input(request["messages"], mode), _content(message, "`response.choices[0].message`"),
                      answering_model(request, response), _usage(response.get("usage")))


def answering_model(request: Any, response: Any) -> str | None:
    """The model a logged call names: the response's (dated, what answered), else the request's."""
    for part in (response, request):
        if isinstance(part, dict) and isinstance(part.get("model"), str):
            return part["model"]
    return None


def batch_response(row: dict[str, Any]) -> tuple[str, Any]:
    """A Batch API output line's `custom_id` and response body; a failed request raises `batch_failed`."""
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str):
        raise LogRowError("bad_log_shape", "`custom_id` is missing (Batch API output: {\"custom_id\", \"response\"})")
    if row.get("error"):
        raise LogRowError("batch_failed", f"request {custom_id} failed in the batch: {str(row['error'])[:200]}")
    response = row.get("response")
    if not isinstance(response, dict) or response.get("status_code", 200) != 200:
        status = response.get("status_code") if isinstance(response, dict) else None
        raise LogRowError("batch_failed", f"request {custom_id} got no answer (status {status})")
    return custom_id, response.get("body")


def read_batch_result(row: dict[str, Any], requests: dict[str, tuple[int, dict[str, Any]]],
                      mode: Literal["last_user", "conversation"]) -> LoggedCall:
    """One line of a Batch API output file, answered for the request of the same `custom_id`."""
    custom_id, body = batch_response(row)
    if custom_id not in requests:
        raise LogRowError("unmatched", f"custom_id {custom_id} is in no line of data.batch_requests")
    return read_gateway({"request": requests[custom_id][1], "response": body}, mode)


def read_batch_requests(rows) -> tuple[dict[str, tuple[int, dict[str, Any]]], list[tuple[int, str, str]]]:
    """A Batch API input file's (line, request body) by `custom_id`, and its bad lines as (line, reason, detail)."""
    requests: dict[str, tuple[int, dict[str, Any]]] = {}
    bad: list[tuple[int, str, str]] = []
    for line, row, problem in rows:
        if row is None:
            bad.append((line, problem.split(":")[0], problem))
            continue
        custom_id, body = row.get("custom_id"), row.get("body")
        if not isinstance(custom_id, str) or not isinstance(body, dict):
            bad.append((line, "bad_log_shape", "a Batch API request line needs `custom_id` and `body`"))
        elif custom_id in requests:
            bad.append((line, "duplicate_id", f"custom_id {custom_id} appears twice; the Batch API needs it unique"))
        else:
            requests[custom_id] = (line, body)
    return requests, bad


READERS = {"chat": read_chat, "gateway": read_gateway}


def logged_call(row: dict[str, Any], fmt: str, mode: Literal["last_user", "conversation"],
                requests: dict[str, tuple[int, dict[str, Any]]] | None = None) -> LoggedCall:
    if fmt == "openai_batch":
        return read_batch_result(row, requests or {}, mode)
    if fmt == "mlflow_traces":  # `readers.read_traces` gives each trace the gateway record's shape
        return read_gateway(row, mode)
    return READERS[fmt](row, mode)
