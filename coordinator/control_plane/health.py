"""Health checks of registered workers: grpc.health.v1 plus GetInfo, on a loop, with what they report.

A worker that cannot be reached leaves service at once; one that answers too slowly (a busy
machine) only after SLOW_CHECKS_TO_FAIL timed-out checks in a row.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.control_plane.registry import Worker
from specd.rpc.security import WORKER, Security
from specd.v1 import common_pb2, draft_pb2_grpc, oracle_pb2_grpc

SLOW_CHECKS_TO_FAIL = 3
CHECK_TIMEOUT_SECONDS = 2.0


class HealthChecker:
    def __init__(self, security: Security | None = None):
        self._security = security or Security.from_env(WORKER)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self._security.aio_channel(address)
        return self._channels[address]

    async def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def check(self, worker: Worker) -> None:
        """Check one worker and record its state and what its ModelInfo says."""
        channel = self._channel(worker.address)
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_SECONDS
            )
            stub_cls = draft_pb2_grpc.DraftServiceStub if worker.is_draft else oracle_pb2_grpc.OracleServiceStub
            info = await stub_cls(channel).GetInfo(
                common_pb2.GetInfoRequest(), timeout=CHECK_TIMEOUT_SECONDS, metadata=self._security.call_metadata()
            )
        except grpc.aio.AioRpcError as error:
            worker.failed_checks += 1
            worker.error = f"{error.code().name}: {error.details()}"
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
            worker.feature_layers, worker.num_layers = list(info.feature_layers), info.num_layers
            worker.max_depth = info.max_depth
            worker.max_context = info.max_context
            worker.max_sessions = info.max_sessions
            worker.active_sessions = info.active_sessions
            worker.device = info.device
            worker.resident_mb, worker.weights = info.resident_mb, info.weights
            worker.load = {
                "queued": info.load.queued, "rows_per_step": info.load.rows_per_step,
                "step_seconds": info.load.step_seconds, "busy_fraction": info.load.busy_fraction,
            }
        worker.last_check = time.monotonic()

    async def check_all(self, workers: list[Worker]) -> None:
        await asyncio.gather(*(self.check(w) for w in workers))
