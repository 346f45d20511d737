"""A hung OpenAI-compatible tier: a real `FakeOpenAIServer` on 127.0.0.1 that reads each request and never answers.

    with hung_tier(api_key="sk-test") as srv:
        ...  # every chat completion sent to srv.base_url hangs until the block ends; srv.requests counts them

    with FakeOpenAIServer(...) as srv:
        roomy(srv)  # for many simultaneous clients

Each request holds one of the server's handler threads until the block ends (or `HANG_S` passes), like an
endpoint whose upstream stopped answering: the connection is accepted, the body read, no response sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.openai_server import FakeOpenAIServer

HANG_S = 300.0
BACKLOG = 128


def roomy(srv: FakeOpenAIServer) -> FakeOpenAIServer:
    """`srv` (started) accepting `BACKLOG` connections at once: socketserver listens with a backlog of 5, so 50
    simultaneous clients otherwise wait out TCP's SYN retries (1 s, 3 s) and fail with connection errors. Linux
    takes a second listen() on a listening socket as a new backlog."""
    srv._httpd.socket.listen(BACKLOG)
    return srv


@contextmanager
def hung_tier(api_key: str | None = None, answer: str = "technical") -> Iterator[FakeOpenAIServer]:
    released = threading.Event()

    def hang(body: dict) -> str:
        released.wait(HANG_S)
        return answer

    with FakeOpenAIServer(hang, api_key=api_key) as srv:
        srv._httpd.handle_error = lambda request, client_address: None  # released into a closed connection: expected
        try:
            yield roomy(srv)
        finally:
            released.set()  # let the handler threads go, so the server stops at once
