"""A real local Ray (bound to loopback) and a coordinator serving on a loopback port."""

from __future__ import annotations

import pytest
import ray

from coordinator.config import CoordinatorConfig
from coordinator.control_plane.client import connect_ray
from coordinator.server import start_coordinator


@pytest.fixture(scope="session")
def ray_local():
    connect_ray("", "specd-test")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
async def coordinator(ray_local, oracle, same_draft, unrelated_draft):
    """Coordinator with the tiny oracle, an identical draft and an unrelated draft registered."""
    config = CoordinatorConfig(
        port=0,
        metrics_port=0,
        oracles=[oracle.address],
        drafts=[same_draft.address, unrelated_draft.address],
        health_interval_seconds=0.5,
        report_interval_seconds=0.05,
    )
    running = await start_coordinator(config)
    yield running
    await running.stop()
