"""A table of live sessions with an idle time-to-live, shared by the draft and oracle services."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from specd.core.errors import AlreadyExists, NotFound, ResourceExhausted

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    last_used: float = field(default_factory=time.monotonic)


class SessionTable(Generic[T]):
    """Session id -> state; evicts sessions idle longer than `ttl_seconds`.

    Not thread-safe on purpose: a worker touches it only from its single model thread.
    """

    def __init__(self, max_sessions: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_sessions = max_sessions
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: dict[str, _Entry[T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def reserve(self, session_id: str, pending: int = 0) -> None:
        """Fail early, before any model work, if the session cannot be added (`pending`: sessions being opened
        that will take room too)."""
        if session_id in self._entries:
            raise AlreadyExists(f"session {session_id!r} is already open")
        if len(self._entries) + pending >= self.max_sessions:
            raise ResourceExhausted(
                f"this worker already holds {self.max_sessions} sessions (its max_sessions); retry later"
            )

    def add(self, session_id: str, value: T) -> None:
        self.reserve(session_id)
        self._entries[session_id] = _Entry(value, self._clock())

    def get(self, session_id: str) -> T:
        entry = self._entries.get(session_id)
        if entry is None:
            raise NotFound(f"unknown session {session_id!r}: never opened, closed, or expired after idling")
        entry.last_used = self._clock()
        return entry.value

    def pop(self, session_id: str) -> T | None:
        entry = self._entries.pop(session_id, None)
        return None if entry is None else entry.value

    def expired(self) -> list[str]:
        """Evict and return the ids of sessions idle longer than the TTL."""
        now = self._clock()
        stale = [sid for sid, e in self._entries.items() if now - e.last_used > self.ttl_seconds]
        for sid in stale:
            del self._entries[sid]
        return stale
