"""The control plane: worker registry, health, pairing, depth policies and statistics.

Runs as one Ray actor (async) that every coordinator replica shares. It is called once when
a session starts (`acquire`), occasionally while it runs (`report`, fire-and-forget) and once
when it ends (`release`) — never per token: per-token traffic goes straight from the session
loop to the workers over gRPC.

Pairs: every healthy draft whose vocabulary fingerprint equals an oracle's forms a pair with it
(a feature draft also needs the oracle's feature width, ModelInfo.feature_dim).
A new session goes to the least-loaded healthy, undrained oracle, and to the least-loaded
compatible draft; with no usable draft it runs on the oracle alone (k = 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.depth import make_policy
from specd.core.compat import pair_problem
from specd.core.errors import InvalidArgument, NotFound
from specd.rpc.security import Security
from specd.v1 import common_pb2, draft_pb2_grpc, oracle_pb2_grpc

log = logging.getLogger(__name__)
DEPTH_HISTORY = 512
ROLE_NAMES = {common_pb2.WORKER_ROLE_DRAFT: "draft", common_pb2.WORKER_ROLE_ORACLE: "oracle"}
# Timed-out health checks in a row before a worker that still answers is taken out of service.
SLOW_CHECKS_TO_FAIL = 3


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
    max_depth: int = 0
    max_context: int = 0
    max_sessions: int = 0
    device: str = ""
    healthy: bool = False
    draining: bool = False
    active_sessions: int = 0
    assigned: int = 0
    last_check: float = 0.0
    error: str = ""
    failed_checks: int = 0  # consecutive health checks that timed out

    def usable(self) -> bool:
        return self.healthy and not self.draining

    def load(self) -> float:
        return max(self.assigned, self.active_sessions) / max(self.max_sessions, 1)


@dataclass
class Assignment:
    """Where a new session runs and how it chooses k."""

    session_id: str
    oracle_name: str
    oracle_address: str
    draft_name: str
    draft_address: str  # "" when the session runs on the oracle alone
    pair_id: str
    policy: str
    policy_state: dict[str, Any]
    max_depth: int


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
        self.rounds += summary.get("rounds", 0)
        self.drafts += summary.get("rounds_with_draft", 0)
        self.draft_tokens += summary.get("drafted", 0)
        self.accepted_tokens += summary.get("accepted", 0)
        for name in ("accepted_per_position", "drafted_per_position"):
            target, values = getattr(self, name), summary.get(name, [])
            target.extend([0] * (len(values) - len(target)))
            for i, value in enumerate(values):
                target[i] += value


@dataclass
class SessionRecord:
    session_id: str
    request_id: str
    pair_id: str
    oracle: str
    draft: str
    started: float = field(default_factory=time.time)
    depth: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0


def pair_id(draft: str, oracle: str) -> str:
    return f"{draft}+{oracle}" if draft else oracle


class ControlPlane:
    def __init__(self, default_policy: str = "goodput", max_depth: int = 8, health_interval_seconds: float = 2.0):
        make_policy(default_policy, max_depth)  # refuse a bad spec at start-up
        self.default_policy = default_policy
        self.max_depth = max_depth
        self.health_interval_seconds = health_interval_seconds
        self.workers: dict[str, Worker] = {}
        self.policies: dict[str, str] = {}
        self.policy_states: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, PairStats] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._security = Security.from_env()
        self._health_task: asyncio.Task | None = None
        self._counter = {common_pb2.WORKER_ROLE_DRAFT: 0, common_pb2.WORKER_ROLE_ORACLE: 0}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.ensure_future(self._health_loop())

    async def ping(self) -> bool:
        return True

    # -- registry ---------------------------------------------------------------------------
    async def register(
        self, role: int, address: str, name: str = "", launched_by: str = "static", node_id: str = "", node_ip: str = ""
    ) -> dict[str, Any]:
        if role not in ROLE_NAMES:
            raise InvalidArgument("role must be draft or oracle")
        if not address or ":" not in address:
            raise InvalidArgument(f"worker address must be host:port, got {address!r}")
        for existing in self.workers.values():
            if existing.address == address:
                return self._worker_dict(existing)
        if not name:
            self._counter[role] += 1
            name = f"{ROLE_NAMES[role]}-{self._counter[role]}"
            while name in self.workers:
                self._counter[role] += 1
                name = f"{ROLE_NAMES[role]}-{self._counter[role]}"
        elif name in self.workers:
            raise InvalidArgument(f"a worker named {name!r} is already registered")
        worker = Worker(name=name, role=role, address=address, launched_by=launched_by, node_id=node_id, node_ip=node_ip)
        self.workers[name] = worker
        await self._check(worker)
        log.info("registered %s %s at %s (healthy=%s)", ROLE_NAMES[role], name, address, worker.healthy)
        return self._worker_dict(worker)

    async def deregister(self, name: str) -> dict[str, Any]:
        worker = self._worker(name)
        del self.workers[name]
        channel = self._channels.pop(worker.address, None)
        if channel is not None:
            await channel.close()
        return self._worker_dict(worker)

    async def drain(self, name: str, draining: bool = True) -> dict[str, Any]:
        worker = self._worker(name)
        worker.draining = draining
        return self._worker_dict(worker)

    def _worker(self, name: str) -> Worker:
        if name not in self.workers:
            known = ", ".join(sorted(self.workers)) or "none"
            raise NotFound(f"no worker named {name!r} (known: {known})")
        return self.workers[name]

    # -- health -----------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self._security.aio_channel(address)
        return self._channels[address]

    async def _check(self, worker: Worker) -> None:
        channel = self._channel(worker.address)
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            stub_cls = draft_pb2_grpc.DraftServiceStub if worker.role == common_pb2.WORKER_ROLE_DRAFT else oracle_pb2_grpc.OracleServiceStub
            info = await stub_cls(channel).GetInfo(
                common_pb2.GetInfoRequest(), timeout=2.0, metadata=self._security.call_metadata()
            )
        except grpc.aio.AioRpcError as error:
            worker.failed_checks += 1
            worker.error = f"{error.code().name}: {error.details()}"
            # A worker that cannot be reached is down at once; one that answers slowly (a busy
            # machine) is down only after SLOW_CHECKS_TO_FAIL timed-out checks in a row.
            slow = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if not slow or worker.failed_checks >= SLOW_CHECKS_TO_FAIL:
                worker.healthy = False
        else:
            worker.failed_checks = 0
            worker.healthy = health.status == health_pb2.HealthCheckResponse.SERVING
            worker.error = "" if worker.healthy else "not serving"
            worker.model_id = info.model_id
            worker.vocab_fingerprint = info.vocab_fingerprint
            worker.vocab_size = info.vocab_size
            worker.feature_dim = info.feature_dim
            worker.max_depth = info.max_depth
            worker.max_context = info.max_context
            worker.max_sessions = info.max_sessions
            worker.active_sessions = info.active_sessions
            worker.device = info.device
        worker.last_check = time.monotonic()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")
            await asyncio.sleep(self.health_interval_seconds)

    # -- pairing and assignment ---------------------------------------------------------------
    @staticmethod
    def _compatible(draft: Worker, oracle: Worker) -> bool:
        return pair_problem(draft, oracle) is None

    def policy_for(self, pid: str) -> str:
        return self.policies.get(pid, self.default_policy)

    async def acquire(self, session_id: str, request_id: str = "", use_draft: bool = True) -> Assignment | None:
        oracles = [w for w in self.workers.values() if w.role == common_pb2.WORKER_ROLE_ORACLE and w.usable()]
        if not oracles:
            return None
        oracle = min(oracles, key=lambda w: (w.load(), w.name))
        drafts = [
            w
            for w in self.workers.values()
            if use_draft and w.role == common_pb2.WORKER_ROLE_DRAFT and w.usable() and self._compatible(w, oracle)
        ]
        draft = min(drafts, key=lambda w: (w.load(), w.name)) if drafts else None
        oracle.assigned += 1
        if draft is not None:
            draft.assigned += 1
        pid = pair_id(draft.name if draft else "", oracle.name)
        max_depth = min(self.max_depth, oracle.max_depth or self.max_depth, draft.max_depth if draft else 0)
        self.sessions[session_id] = SessionRecord(
            session_id, request_id, pid, oracle.name, draft.name if draft else ""
        )
        return Assignment(
            session_id=session_id,
            oracle_name=oracle.name,
            oracle_address=oracle.address,
            draft_name=draft.name if draft else "",
            draft_address=draft.address if draft else "",
            pair_id=pid,
            policy=self.policy_for(pid),
            policy_state=dict(self.policy_states.get(pid, {})),
            max_depth=max_depth,
        )

    async def report(self, session_id: str, depth: int, generated: int, drafted: int, accepted: int) -> None:
        record = self.sessions.get(session_id)
        if record is not None:
            record.depth, record.generated, record.drafted, record.accepted = depth, generated, drafted, accepted
            self.stats.setdefault(record.pair_id, PairStats()).depth_history.append((time.time(), depth))

    async def release(self, session_id: str, summary: dict[str, Any], policy_state: dict[str, Any]) -> None:
        record = self.sessions.pop(session_id, None)
        if record is None:
            return
        for name in (record.oracle, record.draft):
            if name in self.workers:
                self.workers[name].assigned = max(0, self.workers[name].assigned - 1)
        stats = self.stats.setdefault(record.pair_id, PairStats())
        stats.sessions += 1
        stats.merge(summary)
        if summary.get("depth_per_round"):
            stats.depth_history.append((time.time(), summary["depth_per_round"][-1]))
        if policy_state and summary.get("rounds", 0) >= 4:
            self.policy_states[record.pair_id] = policy_state

    # -- policies -----------------------------------------------------------------------------
    def pair_ids(self) -> list[str]:
        ids = []
        for oracle in self.workers.values():
            if oracle.role != common_pb2.WORKER_ROLE_ORACLE:
                continue
            ids.append(pair_id("", oracle.name))
            for draft in self.workers.values():
                if draft.role == common_pb2.WORKER_ROLE_DRAFT and self._compatible(draft, oracle):
                    ids.append(pair_id(draft.name, oracle.name))
        return ids

    async def set_policy(self, pid: str, spec: str) -> None:
        try:
            make_policy(spec, self.max_depth)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        if not pid:
            self.default_policy = spec
            return
        if pid not in self.pair_ids() and pid not in self.stats:
            raise NotFound(f"no pair {pid!r} (pairs: {', '.join(self.pair_ids()) or 'none'})")
        if spec != self.policy_for(pid):
            self.policy_states.pop(pid, None)  # a new policy starts from fresh state
        self.policies[pid] = spec

    async def get_policies(self, pid: str = "") -> dict[str, Any]:
        ids = [pid] if pid else self.pair_ids()
        if pid and pid not in self.pair_ids() and pid not in self.stats:
            raise NotFound(f"no pair {pid!r}")
        entries = []
        for p in ids:
            spec = self.policy_for(p)
            next_depth = make_policy(spec, self.max_depth, self.policy_states.get(p)).choose_k() if "+" in p else 0
            entries.append({"pair_id": p, "policy": spec, "next_depth": next_depth})
        return {"default_policy": self.default_policy, "pairs": entries}

    # -- read-outs ----------------------------------------------------------------------------
    def _worker_dict(self, w: Worker) -> dict[str, Any]:
        return {
            "name": w.name, "role": w.role, "address": w.address, "model_id": w.model_id, "healthy": w.healthy,
            "draining": w.draining, "active_sessions": w.active_sessions, "assigned_sessions": w.assigned,
            "max_sessions": w.max_sessions, "node_id": w.node_id, "node_ip": w.node_ip,
            "vocab_fingerprint": w.vocab_fingerprint,
            "seconds_since_check": time.monotonic() - w.last_check if w.last_check else -1.0,
            "error": w.error, "device": w.device, "launched_by": w.launched_by,
        }

    async def status(self) -> dict[str, Any]:
        pairs = []
        for p in self.pair_ids():
            draft, _, oracle = p.rpartition("+")
            usable = self.workers[oracle].usable() and (not draft or self.workers[draft].usable())
            pairs.append({"pair_id": p, "draft": draft, "oracle": oracle, "depth_policy": self.policy_for(p), "usable": usable})
        return {
            "workers": [self._worker_dict(w) for w in sorted(self.workers.values(), key=lambda w: w.name)],
            "pairs": pairs,
            "active_sessions": len(self.sessions),
            "default_depth_policy": self.default_policy,
        }

    async def list_sessions(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                "session_id": r.session_id, "request_id": r.request_id, "pair_id": r.pair_id, "depth": r.depth,
                "generated_tokens": r.generated, "drafted": r.drafted, "accepted": r.accepted,
                "acceptance_rate": r.accepted / r.drafted if r.drafted else 0.0, "age_seconds": now - r.started,
            }
            for r in self.sessions.values()
        ]

    async def get_stats(self) -> list[dict[str, Any]]:
        out = []
        for p, s in sorted(self.stats.items()):
            estimated = self.policy_states.get(p, {}).get("acceptance", [])
            out.append({
                "pair_id": p, "sessions": s.sessions, "rounds": s.rounds, "drafts": s.drafts,
                "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
                "acceptance_rate": s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0,
                "mean_acceptance_length": 1 + s.accepted_tokens / s.drafts if s.drafts else 1.0,
                "accepted_per_position": list(s.accepted_per_position),
                "drafted_per_position": list(s.drafted_per_position),
                "depth_history": [{"unix_time": t, "depth": k} for t, k in s.depth_history],
                "depth_policy": self.policy_for(p), "estimated_acceptance": list(estimated),
            })
        return out
