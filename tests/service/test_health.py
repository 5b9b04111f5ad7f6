"""The control plane's health checks: a slow worker stays in service, a silent one leaves it."""

from __future__ import annotations

import grpc

from coordinator.control_plane import health
from coordinator.control_plane.actor import ControlPlane
from coordinator.control_plane.health import SLOW_CHECKS_TO_FAIL
from specd.v1 import common_pb2


def failing_stub(code: grpc.StatusCode):
    class Stub:
        def __init__(self, channel):
            pass

        async def Check(self, *args, **kwargs):
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="injected")

    return Stub


async def test_timed_out_checks_take_a_worker_out_only_in_a_row(oracle, monkeypatch):
    plane = ControlPlane(health_interval_seconds=60.0)
    name = (await plane.register(common_pb2.WORKER_ROLE_ORACLE, oracle.address))["name"]
    worker = plane.registry.workers[name]
    assert worker.healthy
    real = health.health_pb2_grpc.HealthStub
    monkeypatch.setattr(health.health_pb2_grpc, "HealthStub", failing_stub(grpc.StatusCode.DEADLINE_EXCEEDED))
    for _ in range(SLOW_CHECKS_TO_FAIL - 1):
        await plane.health.check(worker)
        assert worker.healthy and "DEADLINE_EXCEEDED" in worker.error
    await plane.health.check(worker)
    assert not worker.healthy
    monkeypatch.setattr(health.health_pb2_grpc, "HealthStub", real)
    await plane.health.check(worker)
    assert worker.healthy and worker.failed_checks == 0


async def test_an_unreachable_worker_leaves_service_at_once(oracle, monkeypatch):
    plane = ControlPlane(health_interval_seconds=60.0)
    name = (await plane.register(common_pb2.WORKER_ROLE_ORACLE, oracle.address))["name"]
    monkeypatch.setattr(health.health_pb2_grpc, "HealthStub", failing_stub(grpc.StatusCode.UNAVAILABLE))
    await plane.health.check(plane.registry.workers[name])
    assert not plane.registry.workers[name].healthy
