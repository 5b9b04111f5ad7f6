"""What the control plane records of sessions: the live ones (for `specctl sessions`) and totals per pair."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from specd.core.verification import acceptance_rate, mean_acceptance_length

DEPTH_HISTORY = 512


@dataclass
class PairStats:
    sessions: int = 0
    rounds: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    depth_history: deque = field(default_factory=lambda: deque(maxlen=DEPTH_HISTORY))

    def merge(self, summary: dict[str, Any]) -> None:
        """Add a finished session's SpeculationStats.summary()."""
        self.sessions += 1
        self.rounds += summary.get("rounds", 0)
        self.drafts += summary.get("rounds_with_draft", 0)
        self.draft_tokens += summary.get("drafted", 0)
        self.accepted_tokens += summary.get("accepted", 0)
        for name in ("accepted_per_position", "drafted_per_position"):
            target, values = getattr(self, name), summary.get(name, [])
            target.extend([0] * (len(values) - len(target)))
            for i, value in enumerate(values):
                target[i] += value
        if summary.get("depth_per_round"):
            self.depth_history.append((time.time(), summary["depth_per_round"][-1]))

    def to_dict(self, pair: str, policy: str, estimated_acceptance: list[float]) -> dict[str, Any]:
        """The fields of specd.v1 PairStats."""
        return {
            "pair_id": pair, "sessions": self.sessions, "rounds": self.rounds, "drafts": self.drafts,
            "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": acceptance_rate(self.accepted_tokens, self.draft_tokens),
            "mean_acceptance_length": mean_acceptance_length(self.accepted_tokens, self.drafts),
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position),
            "depth_history": [{"unix_time": t, "depth": k} for t, k in self.depth_history],
            "depth_policy": policy, "estimated_acceptance": list(estimated_acceptance),
        }


@dataclass
class SessionRecord:
    session_id: str
    request_id: str
    pair_id: str
    oracle: str
    draft: str
    started: float = field(default_factory=time.time)
    renewed: float = field(default_factory=time.monotonic)  # the lease: the last start or progress report
    depth: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0

    def to_dict(self, now: float) -> dict[str, Any]:
        """The fields of specd.v1 SessionInfo."""
        return {
            "session_id": self.session_id, "request_id": self.request_id, "pair_id": self.pair_id,
            "depth": self.depth, "generated_tokens": self.generated, "drafted": self.drafted,
            "accepted": self.accepted, "acceptance_rate": acceptance_rate(self.accepted, self.drafted),
            "age_seconds": now - self.started,
        }


class Statistics:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.pairs: dict[str, PairStats] = {}

    def pair(self, pair: str) -> PairStats:
        return self.pairs.setdefault(pair, PairStats())

    def started(self, record: SessionRecord) -> None:
        self.sessions[record.session_id] = record

    def progress(self, session_id: str, depth: int, generated: int, drafted: int, accepted: int) -> None:
        record = self.sessions.get(session_id)
        if record is not None:
            record.depth, record.generated, record.drafted, record.accepted = depth, generated, drafted, accepted
            record.renewed = time.monotonic()
            self.pair(record.pair_id).depth_history.append((time.time(), depth))

    def finished(self, session_id: str, summary: dict[str, Any] | None) -> SessionRecord | None:
        """The session's record, once, with its summary (if any) added to its pair's totals."""
        record = self.sessions.pop(session_id, None)
        if record is not None and summary is not None:
            self.pair(record.pair_id).merge(summary)
        return record

    def expired(self, before: float) -> list[SessionRecord]:
        """Remove and return the sessions whose lease was last renewed before `before` (time.monotonic())."""
        stale = [record for record in self.sessions.values() if record.renewed < before]
        for record in stale:
            del self.sessions[record.session_id]
        return stale

    def live(self) -> list[dict[str, Any]]:
        now = time.time()
        return [r.to_dict(now) for r in self.sessions.values()]
