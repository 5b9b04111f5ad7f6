"""Admission at the coordinator: at most `max_concurrent_sessions` requests run, at most `max_waiting` wait
for a slot, and a request beyond both is refused at once with RESOURCE_EXHAUSTED and a time to retry after,
never left in an unbounded line. The running and waiting gauges count exactly, whatever way a request ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import Gauge

from specd.core.errors import ResourceExhausted

# The retry hint is the expected wait for a slot: the mean request time of recent requests times the
# requests ahead per slot, within these bounds.
MIN_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 30.0
_SMOOTHING = 0.1


class Admission:
    def __init__(self, max_running: int, max_waiting: int, running: Gauge, waiting: Gauge):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self._running_gauge, self._waiting_gauge = running, waiting
        self.running = self.waiting = 0
        self._mean_seconds = 1.0

    def retry_after_seconds(self) -> float:
        ahead = (self.waiting + 1) / self.max_running
        return max(MIN_RETRY_SECONDS, min(MAX_RETRY_SECONDS, self._mean_seconds * ahead))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a running slot for the body; wait in line for one if the line has room."""
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"the coordinator is at capacity ({self.running} requests running, {self.waiting} waiting); "
                "retry later",
                retry_after_seconds=self.retry_after_seconds(),
            )
        self._set(waiting=self.waiting + 1)
        try:
            await self._slots.acquire()
        finally:
            self._set(waiting=self.waiting - 1)
        self._set(running=self.running + 1)
        started = asyncio.get_running_loop().time()
        try:
            yield
        finally:
            self._set(running=self.running - 1)
            self._slots.release()
            elapsed = asyncio.get_running_loop().time() - started
            self._mean_seconds += _SMOOTHING * (elapsed - self._mean_seconds)

    def _set(self, *, running: int | None = None, waiting: int | None = None) -> None:
        if running is not None:
            self.running = running
            self._running_gauge.set(running)
        if waiting is not None:
            self.waiting = waiting
            self._waiting_gauge.set(waiting)
