"""The tiers above the expert as `expert serve` asks them: each with its own slots, a bounded queue and a deadline.

A hung tier must not hold up the server: with one shared pool, requests behind a hung middle tier waited for minutes
(docs/BENCHMARKS.md). Here each tier has its own threads (its `max_concurrency`), at most `--tier-queue` requests
waiting for one, and every request gives up on it at its deadline; a request that finds slots and queue full is shed
at once (it goes on to the next tier, or is flagged or 502 as `--frontier-down` says).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class TierBusy(Exception):
    """The tier's slots and its queue are full: the request is shed, not queued."""


class Lane:
    """One tier's calls: at most `slots` in flight on its own threads and `queue` more waiting for one.

    A call counts against the lane until its thread is done with it, even after the request that made it gave up
    at its deadline: a hung endpoint keeps its slots busy (its attempts end by their own timeout), so a stuck
    tier sheds new requests instead of gathering threads. A call still waiting for a slot when its request gives
    up never starts.
    """

    def __init__(self, name: str, slots: int, queue: int):
        self.name, self.slots, self.queue = name, slots, queue
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix=f"tier-{name}")
        self._lock = threading.Lock()
        self.in_flight = 0  # running or waiting for a thread

    async def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """`fn()` on one of the lane's threads; TierBusy when the lane is full, TimeoutError after `timeout_s`."""
        with self._lock:
            if self.in_flight >= self.slots + self.queue:
                raise TierBusy(f"`{self.name}` is busy: {self.slots} calls in flight and {self.queue} waiting "
                               "(its max_concurrency; serve --tier-queue)")
            self.in_flight += 1
        try:
            future = self.pool.submit(fn)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        finally:
            future.cancel()  # not started yet: it never will; running: it ends by its own timeouts, holding its slot

    def _done(self, _: Future | None) -> None:
        with self._lock:
            self.in_flight -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
