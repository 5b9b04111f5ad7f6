"""Draft and oracle workers launched as Ray actors (`specd up`).

Each actor hosts an ordinary worker gRPC server inside its own process on the node Ray placed
it on; Ray chooses the node from the resources asked for (e.g. {"draft_node": 1} or
accelerator_type), which is how drafts and oracles land on different hardware. Once started,
the actor is just another worker address: sessions talk to it over gRPC, not through Ray.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import ray

from specd.cluster.roles import CONFIGS, start_local_worker
from specd.core.defaults import IDLE_THREADS_ENV


class WorkerHost:
    """The body of a worker actor: start and stop one worker server in this process."""

    def __init__(self) -> None:
        self.worker: Any = None

    async def start(self, role: str, settings: dict[str, Any]) -> dict[str, str]:
        # Ray starts its worker processes at a low priority (niceness 15); a model worker serves
        # latency-bound traffic, so it runs at normal priority where the node allows it.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        config = CONFIGS[role](**settings)
        self.worker = await start_local_worker(config)
        node_id = ray.get_runtime_context().get_node_id()
        node_ip = next(
            (n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), ray.util.get_node_ip_address()
        )
        advertised = node_ip if config.host in ("0.0.0.0", "::", "") else config.host
        return {"address": f"{advertised}:{self.worker.host.port}", "node_id": node_id, "node_ip": node_ip}

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None


@dataclass
class LaunchedWorker:
    role: str
    handle: Any
    address: str
    node_id: str
    node_ip: str


async def launch_worker(
    role: str, settings: dict[str, Any], *, resources: dict[str, float] | None = None, num_cpus: float = 0,
    num_gpus: float = 0, accelerator_type: str | None = None,
) -> LaunchedWorker:
    """Start a worker actor where Ray finds the resources asked for; returns once it serves."""
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "resources": resources or {},
        "runtime_env": {"env_vars": dict(IDLE_THREADS_ENV)},
    }
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    handle = ray.remote(WorkerHost).options(**options).remote()
    info = await handle.start.remote(role, settings)
    return LaunchedWorker(role=role, handle=handle, address=info["address"], node_id=info["node_id"], node_ip=info["node_ip"])


async def stop_worker(worker: LaunchedWorker) -> None:
    try:
        await worker.handle.stop.remote()
    finally:
        ray.kill(worker.handle)
