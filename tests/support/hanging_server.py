"""A hung OpenAI-compatible tier: a real `FakeOpenAIServer` on 127.0.0.1 that reads each request and never answers.

    with hung_tier(api_key="sk-test") as srv:
        ...  # every chat completion sent to srv.base_url hangs until the block ends; srv.requests counts them

Each request holds one of the server's handler threads until the block ends (or `HANG_S` passes), like an
endpoint whose upstream stopped answering: the connection is accepted, the body read, no response sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.openai_server import FakeOpenAIServer

HANG_S = 300.0


@contextmanager
def hung_tier(api_key: str | None = None, answer: str = "technical") -> Iterator[FakeOpenAIServer]:
    released = threading.Event()

    def hang(body: dict) -> str:
        released.wait(HANG_S)
        return answer

    with FakeOpenAIServer(hang, api_key=api_key) as srv:
        try:
            yield srv
        finally:
            released.set()  # let the handler threads go, so the server stops at once
