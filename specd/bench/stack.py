"""The system under test: an oracle and a draft worker as separate processes, a private local
Ray, and coordinators started in this process, one per scenario.

Every scenario gets its own coordinator with its own control-plane actor (a unique name), so
the depth policy starts from fresh state and nothing learned in one scenario leaks into the
next. `stop()` takes everything down, and is safe to call after a failed or interrupted start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass

import ray

from coordinator.config import CoordinatorConfig
from coordinator.server import RunningCoordinator, start_coordinator
from specd.cluster.procs import WorkerProcess, spawn
from specd.core.memory import resident_mb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackSettings:
    oracle: str
    draft: str
    draft_layers: int
    torch_threads: int
    max_depth: int = 8
    weights: str = "auto"  # the oracle's weights plan
    model_only_draft: bool = False  # also a draft worker without prompt lookup, for comparison
    unbatched_pair: bool = False  # also an oracle and a draft with continuous batching off, for comparison


class BenchStack:
    def __init__(self, settings: StackSettings):
        self.settings = settings
        self.namespace = f"specd-bench-{os.getpid()}"
        self.oracle: WorkerProcess | None = None
        self.draft: WorkerProcess | None = None
        self.model_only_draft: WorkerProcess | None = None
        self.unbatched: tuple[WorkerProcess, WorkerProcess] | None = None
        self._extra: list[WorkerProcess] = []  # the unbatched pair, or what of it started
        self._coordinators: list[RunningCoordinator] = []
        self._started_ray = False

    async def start(self) -> None:
        """Start both workers (in parallel) and a local Ray of our own."""
        s = self.settings
        # No prefix cache: every configuration runs the same prompts, and each should prefill them as a
        # new prompt would be (the transformers baselines have no such cache).
        common = {"port": 0, "torch_threads": s.torch_threads, "prefix_cache_tokens": 0}
        oracle = {"model": s.oracle, "layers": 0, "weights": s.weights, **common}
        draft = {"model": s.draft, "layers": s.draft_layers, **common}
        spawns = [
            asyncio.create_task(asyncio.to_thread(spawn, "oracle", oracle)),
            asyncio.create_task(asyncio.to_thread(spawn, "draft", draft)),
        ]
        if s.model_only_draft:
            spawns.append(asyncio.create_task(asyncio.to_thread(spawn, "draft", {**draft, "lookup_min_ngram": 0})))
        unbatched = []
        if s.unbatched_pair:
            off = {"batching": "false"}
            unbatched = [
                asyncio.create_task(asyncio.to_thread(spawn, "oracle", {**oracle, **off})),
                asyncio.create_task(asyncio.to_thread(spawn, "draft", {**draft, **off})),
            ]
        try:
            if not ray.is_initialized():
                # address="local": a Ray of our own even when another cluster runs on this machine.
                # Off the main thread, so that Ray leaves the benchmark's own SIGTERM handling alone.
                await asyncio.to_thread(
                    ray.init,
                    address="local",
                    namespace=self.namespace,
                    include_dashboard=False,
                    logging_level="ERROR",
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                )
                self._started_ray = True
        finally:
            results = await asyncio.gather(*spawns, *unbatched, return_exceptions=True)
            workers = [r if isinstance(r, WorkerProcess) else None for r in results]
            self.oracle, self.draft = workers[0], workers[1]
            self.model_only_draft = workers[2] if s.model_only_draft else None
            pair = workers[len(spawns) :]
            self._extra = [w for w in pair if w is not None]
            if len(pair) == 2 and pair[0] is not None and pair[1] is not None:
                self.unbatched = (pair[0], pair[1])
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def resident_memory_mb(self) -> dict[str, tuple[float, float]]:
        """Each worker process's resident memory now (VmRSS) and at its peak (VmHWM), MB."""
        workers = {"oracle": self.oracle, "draft": self.draft, "draft (no prompt lookup)": self.model_only_draft}
        if self.unbatched:
            workers["oracle (batching off)"], workers["draft (batching off)"] = self.unbatched
        return {
            role: (rss, resident_mb(w.process.pid, peak=True))
            for role, w in workers.items() if w is not None and (rss := resident_mb(w.process.pid))
        }

    async def coordinator(
        self, label: str, *, oracle_delay_ms: float = 0.0, lookup: bool = True, policy: str = "goodput",
        batching: bool = True, http: bool = False,
    ) -> RunningCoordinator:
        """A fresh coordinator (own control plane, fresh state of depth policy `policy`) over the oracle
        and a draft (lookup=False: prompt lookup off in the coordinator, and the draft worker without it;
        batching=False: the pair of workers with continuous batching off)."""
        oracle, draft = self.oracle, self.draft if lookup else self.model_only_draft
        if not batching:
            assert self.unbatched is not None, "start() first, with unbatched_pair"
            oracle, draft = self.unbatched
        assert oracle is not None and draft is not None, "start() first (with model_only_draft for lookup=False)"
        config = CoordinatorConfig(
            port=0,
            metrics_port=-1,
            http_port=0 if http else -1,
            oracles=[oracle.address],
            drafts=[draft.address],
            depth_policy=policy,
            max_depth=self.settings.max_depth,
            oracle_delay_ms=oracle_delay_ms,
            **({} if lookup else {"lookup_min_ngram": 0}),
            ray_namespace=self.namespace,
            plane_name=f"bench-{label}-{uuid.uuid4().hex[:8]}",
        )
        running = await start_coordinator(config)
        self._coordinators.append(running)
        return running

    async def close_coordinator(self, running: RunningCoordinator) -> None:
        if running in self._coordinators:
            self._coordinators.remove(running)
        try:
            await running.stop()
        finally:
            ray.kill(running.plane.handle)

    async def stop(self) -> None:
        for running in list(self._coordinators):
            try:
                await self.close_coordinator(running)
            except Exception as error:
                log.warning("stopping a coordinator: %s", error)
        # Requests cancelled on the way out report to the control plane as they unwind: let them.
        await asyncio.sleep(0.5)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        for worker in (*self._extra, self.model_only_draft, self.draft, self.oracle):
            if worker is not None:
                worker.stop()

    async def __aenter__(self) -> BenchStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
