"""JSON that someone else wrote, parsed only when it is nested shallowly enough to be safe to walk.

Python's `json` parser recurses once per `[` or `{`: 200,000 brackets (under 1 MiB) end it with RecursionError,
and every walker of a parsed row (surrogate checks, PII redaction, JSON Schema validation) recurses the same
way. `check_depth` measures the nesting before parsing, without recursion, and refuses more than `MAX_DEPTH`
levels; `loads` is `json.loads` behind that check. Every reader of user files and endpoint answers parses
through it, so a too-deep line is a rejected line and never a crash.
"""

from __future__ import annotations

import json
import re
from typing import Any

# far deeper than any row, log record or answer needs (a chat log with tool calls is ~10 levels), and far
# shallower than Python's recursion limit (1,000 frames), which validators spend several of per level
MAX_DEPTH = 100

# a JSON string (escapes included) or one bracket; strings are skipped so that brackets inside them do not count
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class TooDeep(ValueError):
    """The JSON nests deeper than `MAX_DEPTH`."""

    def __init__(self, depth: int, limit: int):
        super().__init__(f"JSON nested deeper than {limit} levels (at least {depth}); flatten it")
        self.depth = depth


def check_depth(text: str, limit: int = MAX_DEPTH) -> None:
    """Raise `TooDeep` when the brackets of `text` (outside strings) nest deeper than `limit`."""
    if text.count("[") + text.count("{") <= limit:  # the common case: too few brackets to nest that deep
        return
    depth = 0
    for token in _TOKEN.finditer(text):
        c = token.group()[0]
        if c == "[" or c == "{":
            depth += 1
            if depth > limit:
                raise TooDeep(depth, limit)
        elif c != '"':
            depth -= 1


def loads(text: str, limit: int = MAX_DEPTH) -> Any:
    """`json.loads` of text nested at most `limit` levels deep; `TooDeep` otherwise (before any parsing). An
    integer of more than 4,300 digits, which `json` refuses with a plain ValueError, is a `JSONDecodeError`
    like any other unparsable text."""
    check_depth(text, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as err:
        raise json.JSONDecodeError(str(err).split(";")[0], text, 0) from None
