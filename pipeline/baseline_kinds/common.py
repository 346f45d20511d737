"""What every kind computes alike: seconds per request."""

from __future__ import annotations

from typing import Any


def latency_s(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds each request took, as measured (or recorded); 0 where there is no number."""
    return [r.get("latency_s") or 0.0 for r in rows]
