"""Starting a worker service: its model on the model thread, its servicer on a ServiceHost, its sweeper.

Each worker service (draft_service, oracle_service) describes itself with a `WorkerService`;
`start_worker` serves it in the current process on the configured address (tests, local runs,
Ray actors) and `serve_worker` runs it until SIGTERM/SIGINT (`specd serve`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from specd.rpc.host import ServiceHost, periodic
from specd.rpc.metrics import serve_metrics
from specd.rpc.settings import WorkerConfig
from specd.runtime.executor import ModelExecutor

if TYPE_CHECKING:  # the servicer base imports the runtime (torch); launching a worker loads it anyway
    from specd.rpc.worker_servicer import WorkerServicerMixin

SWEEP_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerService:
    """How to build and host one kind of worker."""

    role: str  # "draft" or "oracle"
    service_name: str  # the gRPC service's full name (specd.v1.DraftService, ...)
    build: Callable[[Any, ModelExecutor], WorkerServicerMixin]  # (its config, the model thread) -> servicer
    add_to_server: Callable[[Any, grpc.aio.Server], None]  # the generated add_..._to_server


@dataclass
class LocalWorker:
    host: ServiceHost
    servicer: WorkerServicerMixin
    sweeper: asyncio.Future
    metrics_port: int = -1

    @property
    def address(self) -> str:
        return self.host.address

    async def stop(self) -> None:
        await self.host.stop()


async def start_worker(service: WorkerService, config: WorkerConfig, sweep_seconds: float = SWEEP_SECONDS) -> LocalWorker:
    """Build and start a worker from its config (the model loads here)."""
    # The model loads on the thread that will run it: every thread that runs torch work gets a team
    # of OpenMP threads, and once a process has more OpenMP threads than cores, libgomp stops letting
    # them spin between parallel regions, so each of a forward pass's many small ops would wait for a
    # sleeping thread to wake.
    executor = ModelExecutor(f"{service.role}-model")
    servicer = await executor.run(service.build, config, executor)
    host = ServiceHost(
        config.host, config.port, grace_seconds=config.grace_seconds, max_message_bytes=config.max_message_bytes
    )
    host.add(service.add_to_server, servicer, service.service_name)
    await host.start()
    sweeper = asyncio.ensure_future(periodic(sweep_seconds, servicer.evict_idle))

    async def stop_servicer() -> None:
        sweeper.cancel()
        await servicer.stop()
        servicer.executor.shutdown()

    host.on_stop(stop_servicer)
    metrics_port = -1
    if config.metrics_port >= 0:
        metrics_port = serve_metrics(servicer.metrics.registry, config.metrics_port, config.host)
    return LocalWorker(host=host, servicer=servicer, sweeper=sweeper, metrics_port=metrics_port)


async def serve_worker(
    service: WorkerService,
    config: WorkerConfig,
    on_ready: Callable[[ServiceHost], Awaitable[None] | None] | None = None,
) -> None:
    """Serve one worker until SIGTERM/SIGINT, then shut down gracefully."""
    worker = await start_worker(service, config)
    worker.host.install_signal_handlers()
    if on_ready is not None:
        maybe = on_ready(worker.host)
        if maybe is not None:
            await maybe
    await worker.host.wait()
