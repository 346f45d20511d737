"""The error a request is answered with: raised by the serving logic (`service`) and turned into a response by the
HTTP layer (`app`), so neither imports the other for it."""

from __future__ import annotations

from typing import Any


class HTTPError(Exception):
    """A request problem answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 408: "invalid_request_error",
                413: "invalid_request_error", 502: "upstream_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
