"""Start workers inside the current process (tests, quick local runs) on loopback ports."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from specd.config import DraftConfig, OracleConfig, WorkerConfig
from specd.metrics import serve_metrics
from specd.server import ModelExecutor, ServiceHost, periodic
from specd.worker_service import SWEEP_SECONDS, WorkerServicerMixin


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


async def start_worker(config: WorkerConfig, sweep_seconds: float = SWEEP_SECONDS) -> LocalWorker:
    """Build and start a draft or oracle worker from its config (the model loads here)."""
    if isinstance(config, DraftConfig):
        from draft_service.server import build_servicer
        from draft_service.servicer import SERVICE_NAME
        from specd.v1.draft_pb2_grpc import add_DraftServiceServicer_to_server as adder
    elif isinstance(config, OracleConfig):
        from oracle_service.server import build_servicer
        from oracle_service.servicer import SERVICE_NAME
        from specd.v1.oracle_pb2_grpc import add_OracleServiceServicer_to_server as adder
    else:
        raise TypeError(f"not a worker config: {type(config).__name__}")
    # The model loads on the thread that will run it. Every thread that runs torch work gets a team of
    # OpenMP threads, and once a process has more OpenMP threads than cores libgomp stops letting
    # them spin between parallel regions: each of a forward pass's several hundred small ops then
    # waits for a sleeping thread to wake (on 2 cores, a one-token step of the default oracle took
    # 35-40 ms instead of 25 ms).
    executor = ModelExecutor(f"{'draft' if isinstance(config, DraftConfig) else 'oracle'}-model")
    servicer = await executor.run(build_servicer, config, executor)
    host = ServiceHost(
        config.host, config.port, grace_seconds=config.grace_seconds, max_message_bytes=config.max_message_bytes
    )
    host.add(adder, servicer, SERVICE_NAME)
    await host.start()
    sweeper = asyncio.ensure_future(periodic(sweep_seconds, servicer.evict_idle))

    async def stop_sweeper() -> None:
        sweeper.cancel()
        servicer.executor.shutdown()

    host.on_stop(stop_sweeper)
    metrics_port = -1
    if config.metrics_port >= 0:
        metrics_port = serve_metrics(servicer.metrics.registry, config.metrics_port, config.host)
    return LocalWorker(host=host, servicer=servicer, sweeper=sweeper, metrics_port=metrics_port)
