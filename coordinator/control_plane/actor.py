"""The control plane: one async Ray actor that every coordinator replica shares.

It holds the worker registry (registry.py) and checks its workers' health (health.py), assigns
each new session a pair (scheduling.py), keeps the depth policy and the learned policy state of
each pair, and records session statistics (statistics.py). It is called once when a session
starts (`acquire`), occasionally while it runs (`report`, fire-and-forget) and once when it ends
(`release`), never per token: per-token traffic goes straight from the session loop to the
workers over gRPC.

Ray restarts the actor when it dies. What a restart must not lose, the registry (workers, their
names and drain marks) and the depth policies with their learned state, is kept in Ray's
key-value store (in the GCS, outside the actor) at every change and read back when the actor
starts; the health loop starts again with the first call. Assignments are leases: each
session's progress report renews its lease, and one not renewed for `lease_seconds` stops
counting against its workers, so a coordinator that crashed, or a session cancelled between
its acquire and its release, leaves nothing counted forever. After a restart every lease is
gone; the sessions still running go on (their workers hold them) and their releases are
ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

from coordinator.control_plane.health import HealthChecker
from coordinator.control_plane.registry import ROLE_NAMES, Registry, Worker
from coordinator.control_plane.scheduling import Assignment, choose_pair, pairs
from coordinator.control_plane.statistics import SessionRecord, Statistics
from coordinator.depth import make_policy
from specd.core.compat import pair_id
from specd.core.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)
# A session's learned policy state seeds its pair's next sessions once it ran this many rounds.
MIN_ROUNDS_TO_KEEP_STATE = 4
# A worker's fields that describe how it was registered (the rest its health checks fill in).
_REGISTERED_FIELDS = ("name", "role", "address", "launched_by", "node_id", "node_ip", "draining", "migrating")


class ControlPlane:
    def __init__(
        self, default_policy: str = "goodput", max_depth: int = 8, health_interval_seconds: float = 2.0,
        state_key: str = "", lease_seconds: float = 60.0,
    ):
        """state_key: where in Ray's key-value store the plane keeps what a restart must not lose ("": nowhere)."""
        make_policy(default_policy, max_depth)  # refuse a bad spec at start-up
        self.default_policy = default_policy
        self.max_depth = max_depth
        self.health_interval_seconds = health_interval_seconds
        self.state_key = state_key
        self.lease_seconds = lease_seconds
        self.registry = Registry()
        self.health = HealthChecker()
        self.statistics = Statistics()
        self.policies: dict[str, str] = {}
        self.policy_states: dict[str, dict[str, Any]] = {}
        self._health_task: asyncio.Task | None = None
        self.incarnation = uuid.uuid4().hex  # a new one after each restart
        self._restore()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the health loop (any call does, so that a restarted actor resumes it with its first call)."""
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.ensure_future(self._maintain())

    async def get_incarnation(self) -> str:
        """This instance of the actor (each restart makes a new one)."""
        return self.incarnation

    async def _ready(self) -> None:
        """Start the health loop if it is not running, and check any worker never checked (restored after a
        restart), so that what a call reads is current."""
        await self.start()
        unchecked = [w for w in self.registry.all() if not w.last_check]
        if unchecked:
            await self.health.check_all(unchecked)

    async def _maintain(self) -> None:
        while True:
            try:
                await self.health.check_all(self.registry.all())
                self._expire_leases()
            except Exception:  # one failed round must not end the loop
                log.exception("control-plane round failed")
            await asyncio.sleep(self.health_interval_seconds)

    def _expire_leases(self) -> None:
        for record in self.statistics.expired(time.monotonic() - self.lease_seconds):
            log.warning("session %s's lease expired: it no longer counts against its workers", record.session_id)
            self._unassign(record)

    def _unassign(self, record: SessionRecord) -> None:
        for name in (record.oracle, record.draft):
            worker = self.registry.workers.get(name)
            if worker is not None:
                worker.assigned = max(0, worker.assigned - 1)

    # -- state that outlives the actor -----------------------------------------------------------
    def _save(self) -> None:
        if not self.state_key:
            return
        from ray.experimental.internal_kv import _internal_kv_put

        state = {
            "workers": [{key: asdict(w)[key] for key in _REGISTERED_FIELDS} for w in self.registry.all()],
            "default_policy": self.default_policy,
            "policies": self.policies,
            "policy_states": self.policy_states,
        }
        _internal_kv_put(self.state_key.encode(), json.dumps(state).encode(), overwrite=True)

    def _restore(self) -> None:
        if not self.state_key:
            return
        from ray.experimental.internal_kv import _internal_kv_get

        saved = _internal_kv_get(self.state_key.encode())
        if not saved:
            return
        state = json.loads(saved)
        for fields in state["workers"]:
            self.registry.workers[fields["name"]] = Worker(**fields)
        self.default_policy = state["default_policy"]
        self.policies = state["policies"]
        self.policy_states = state["policy_states"]
        log.warning("control plane restarted: %d workers restored, to be checked", len(self.registry.workers))

    # -- registry ---------------------------------------------------------------------------
    async def register(
        self, role: int, address: str, name: str = "", launched_by: str = "static", node_id: str = "", node_ip: str = ""
    ) -> dict[str, Any]:
        await self.start()
        worker, new = self.registry.add(role, address, name, launched_by, node_id, node_ip)
        if new:
            self._save()
            await self.health.check(worker)
            log.info("registered %s %s at %s (healthy=%s)", ROLE_NAMES[role], worker.name, address, worker.healthy)
        return worker.to_dict()

    async def deregister(self, name: str) -> dict[str, Any]:
        await self._ready()
        worker = self.registry.remove(name)
        self._save()
        await self.health.forget(worker.address)
        return worker.to_dict()

    async def drain(self, name: str, draining: bool = True, migrate: bool = False) -> dict[str, Any]:
        """Stop (or resume) new sessions on a worker; with `migrate`, its sessions in flight move away too."""
        await self._ready()
        worker = self.registry.get(name)
        worker.draining = draining
        worker.migrating = draining and migrate
        self._save()
        return worker.to_dict()

    async def migrating(self) -> list[str]:
        """Addresses of the workers whose sessions should move away (coordinators poll this)."""
        await self.start()
        return [w.address for w in self.registry.all() if w.migrating]

    async def check_all(self) -> None:
        await self.health.check_all(self.registry.all())

    # -- sessions -----------------------------------------------------------------------------
    def policy_for(self, pid: str) -> str:
        return self.policies.get(pid, self.default_policy)

    async def acquire(
        self, session_id: str, request_id: str = "", use_draft: bool = True, exclude: list[str] | None = None
    ) -> Assignment | None:
        """A pair for a new session, on an oracle not in `exclude` (ones that refused or failed it)."""
        await self._ready()
        chosen = choose_pair(self.registry, use_draft, exclude or [])
        if chosen is None:
            return None
        oracle, draft = chosen
        oracle.assigned += 1
        if draft is not None:
            draft.assigned += 1
        pid = pair_id(draft.name if draft else "", oracle.name)
        max_depth = min(self.max_depth, oracle.max_depth or self.max_depth, draft.max_depth if draft else 0)
        self.statistics.started(SessionRecord(session_id, request_id, pid, oracle.name, draft.name if draft else ""))
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
        """A session's progress; renews its lease."""
        await self.start()
        self.statistics.progress(session_id, depth, generated, drafted, accepted)

    async def release(self, session_id: str, summary: dict[str, Any] | None, policy_state: dict[str, Any]) -> None:
        """A session ended (summary None: it left its pair for another, and counts in no statistics)."""
        await self.start()
        record = self.statistics.finished(session_id, summary)
        if record is None:  # released before, expired, or from before a restart
            return
        self._unassign(record)
        if summary and policy_state and summary.get("rounds", 0) >= MIN_ROUNDS_TO_KEEP_STATE:
            self.policy_states[record.pair_id] = policy_state
            self._save()

    # -- policies -----------------------------------------------------------------------------
    def pair_ids(self) -> list[str]:
        return [pid for pid, _, _ in pairs(self.registry)]

    def _known_pair(self, pid: str) -> None:
        if pid not in self.pair_ids() and pid not in self.statistics.pairs:
            raise NotFound(f"no pair {pid!r} (pairs: {', '.join(self.pair_ids()) or 'none'})")

    async def set_policy(self, pid: str, spec: str) -> None:
        await self._ready()
        try:
            make_policy(spec, self.max_depth)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        if not pid:
            self.default_policy = spec
            self._save()
            return
        self._known_pair(pid)
        if spec != self.policy_for(pid):
            self.policy_states.pop(pid, None)  # a new policy starts from fresh state
        self.policies[pid] = spec
        self._save()

    async def get_policies(self, pid: str = "") -> dict[str, Any]:
        await self._ready()
        if pid:
            self._known_pair(pid)
        entries = []
        for p in [pid] if pid else self.pair_ids():
            spec = self.policy_for(p)
            drafted = "+" in p  # the oracle alone runs at k = 0
            next_depth = make_policy(spec, self.max_depth, self.policy_states.get(p)).choose_k() if drafted else 0
            entries.append({"pair_id": p, "policy": spec, "next_depth": next_depth})
        return {"default_policy": self.default_policy, "pairs": entries}

    # -- read-outs ----------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        await self._ready()
        return {
            "workers": [w.to_dict() for w in self.registry.all()],
            "pairs": [
                {
                    "pair_id": pid, "draft": draft.name if draft else "", "oracle": oracle.name,
                    "depth_policy": self.policy_for(pid), "usable": oracle.usable() and (draft is None or draft.usable()),
                }
                for pid, draft, oracle in pairs(self.registry)
            ],
            "active_sessions": len(self.statistics.sessions),
            "default_depth_policy": self.default_policy,
        }

    async def list_sessions(self) -> list[dict[str, Any]]:
        await self._ready()
        return self.statistics.live()

    async def get_stats(self) -> list[dict[str, Any]]:
        await self._ready()
        return [
            stats.to_dict(p, self.policy_for(p), self.policy_states.get(p, {}).get("acceptance", []))
            for p, stats in sorted(self.statistics.pairs.items())
        ]

