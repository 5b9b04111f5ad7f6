"""The control plane's registry: the workers it knows, by name, with what their health checks last reported."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from specd.core.errors import InvalidArgument, NotFound
from specd.v1 import common_pb2

ROLE_NAMES = {common_pb2.WORKER_ROLE_DRAFT: "draft", common_pb2.WORKER_ROLE_ORACLE: "oracle"}
# Pair ids join a draft's name and an oracle's with this (specd.core.compat.pair_id), so no name may hold it.
_RESERVED = "+"


@dataclass
class Worker:
    name: str
    role: int
    address: str
    launched_by: str = "static"
    node_id: str = ""
    node_ip: str = ""
    model_id: str = ""
    vocab_fingerprint: str = ""
    vocab_size: int = 0
    feature_dim: int = 0  # see ModelInfo.feature_dim
    feature_layers: list[int] = field(default_factory=list)  # see ModelInfo.feature_layers (drafts)
    num_layers: int = 0  # see ModelInfo.num_layers (oracles)
    max_depth: int = 0
    max_context: int = 0
    max_sessions: int = 0
    device: str = ""
    healthy: bool = False
    draining: bool = False
    migrating: bool = False  # drained with migration: its sessions move away at their next round
    active_sessions: int = 0
    assigned: int = 0
    last_check: float = 0.0
    error: str = ""
    failed_checks: int = 0  # consecutive health checks that timed out
    load: dict[str, float] = field(default_factory=dict)  # ModelInfo.load at the last check (WorkerLoad's fields)
    resident_mb: float = 0.0
    weights: str = ""

    @property
    def is_oracle(self) -> bool:
        return self.role == common_pb2.WORKER_ROLE_ORACLE

    @property
    def is_draft(self) -> bool:
        return self.role == common_pb2.WORKER_ROLE_DRAFT

    def usable(self) -> bool:
        return self.healthy and not self.draining

    def occupancy(self) -> float:
        """Sessions held or assigned, as a share of what it takes."""
        return max(self.assigned, self.active_sessions) / max(self.max_sessions, 1)

    def to_dict(self) -> dict[str, Any]:
        """The fields of specd.v1 WorkerStatus."""
        return {
            "name": self.name, "role": self.role, "address": self.address, "model_id": self.model_id,
            "healthy": self.healthy, "draining": self.draining, "active_sessions": self.active_sessions,
            "assigned_sessions": self.assigned, "max_sessions": self.max_sessions, "node_id": self.node_id,
            "node_ip": self.node_ip, "vocab_fingerprint": self.vocab_fingerprint,
            "seconds_since_check": time.monotonic() - self.last_check if self.last_check else -1.0,
            "error": self.error, "device": self.device, "launched_by": self.launched_by, "load": dict(self.load),
            "migrating": self.migrating, "resident_mb": self.resident_mb, "weights": self.weights,
        }


class Registry:
    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self._counter = {role: 0 for role in ROLE_NAMES}

    def add(
        self, role: int, address: str, name: str = "", launched_by: str = "static", node_id: str = "", node_ip: str = ""
    ) -> tuple[Worker, bool]:
        """Register a worker; returns (the worker, whether it is new). An address registered before
        returns the worker already there."""
        if role not in ROLE_NAMES:
            raise InvalidArgument("role must be draft or oracle")
        if not address or ":" not in address:
            raise InvalidArgument(f"worker address must be host:port, got {address!r}")
        for existing in self.workers.values():
            if existing.address == address:
                return existing, False
        if _RESERVED in name:
            raise InvalidArgument(f"worker names may not contain {_RESERVED!r} (it joins the names in a pair id): {name!r}")
        if not name:
            name = self._next_name(role)
        elif name in self.workers:
            raise InvalidArgument(f"a worker named {name!r} is already registered")
        worker = Worker(name=name, role=role, address=address, launched_by=launched_by, node_id=node_id, node_ip=node_ip)
        self.workers[name] = worker
        return worker, True

    def _next_name(self, role: int) -> str:
        while True:
            self._counter[role] += 1
            name = f"{ROLE_NAMES[role]}-{self._counter[role]}"
            if name not in self.workers:
                return name

    def remove(self, name: str) -> Worker:
        worker = self.get(name)
        del self.workers[name]
        return worker

    def get(self, name: str) -> Worker:
        if name not in self.workers:
            known = ", ".join(sorted(self.workers)) or "none"
            raise NotFound(f"no worker named {name!r} (known: {known})")
        return self.workers[name]

    def oracles(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_oracle]

    def drafts(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_draft]

    def all(self) -> list[Worker]:
        return sorted(self.workers.values(), key=lambda w: w.name)
