"""A control plane that survives its restart, and assignments that cannot leak: on a real local Ray."""

from __future__ import annotations

import asyncio
import time
import uuid

import ray

from coordinator.config import CoordinatorConfig
from coordinator.control_plane.client import get_or_create_plane
from coordinator.server import start_coordinator
from specd.client import AsyncSpecdClient
from specd.core.errors import Unavailable
from specd.models.tiny import build_tokenizer
from specd.v1 import common_pb2

ORACLE = common_pb2.WORKER_ROLE_ORACLE


async def eventually(call, timeout: float = 30.0):
    """call() once it stops failing with UNAVAILABLE (the actor restarting)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except Unavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_restarted_plane_has_its_registry_policies_and_health_loop(ray_local, oracle, same_draft):
    plane = await get_or_create_plane(
        CoordinatorConfig(plane_name=f"plane-restart-{uuid.uuid4().hex[:6]}", health_interval_seconds=0.2)
    )
    await plane.call("register", ORACLE, oracle.address, "oracle-a")
    await plane.call("register", common_pb2.WORKER_ROLE_DRAFT, same_draft.address, "draft-a")
    await plane.call("drain", "draft-a", True)
    await plane.call("set_policy", "draft-a+oracle-a", "fixed:3")
    before = await plane.call("get_incarnation")
    ray.kill(plane.handle, no_restart=False)  # Ray starts it again
    for _ in range(150):
        try:
            if await plane.call("get_incarnation") != before:
                break
        except Unavailable:
            pass
        await asyncio.sleep(0.2)
    status = await eventually(lambda: plane.call("status"))
    workers = {w["name"]: w for w in status["workers"]}
    assert set(workers) == {"oracle-a", "draft-a"} and workers["draft-a"]["draining"]
    policies = await plane.call("get_policies", "draft-a+oracle-a")
    assert policies["pairs"][0]["policy"] == "fixed:3"
    for _ in range(100):  # the health loop runs again: the oracle is checked without anyone asking
        workers = {w["name"]: w for w in (await plane.call("status"))["workers"]}
        if workers["oracle-a"]["healthy"] and workers["oracle-a"]["seconds_since_check"] < 1.0:
            break
        await asyncio.sleep(0.1)
    assert workers["oracle-a"]["healthy"]
    ray.kill(plane.handle, no_restart=True)


async def test_requests_are_served_after_the_plane_restarts(ray_local, oracle):
    config = CoordinatorConfig(
        port=0, metrics_port=0, plane_name=f"plane-serve-{uuid.uuid4().hex[:6]}", oracles=[oracle.address],
        health_interval_seconds=0.5,
    )
    running = await start_coordinator(config)
    prompt = build_tokenizer()("Hello there")["input_ids"]
    try:
        async with AsyncSpecdClient(running.address) as client:
            before = await client.generate(token_ids=prompt, max_tokens=6, depth=0)
            ray.kill(running.plane.handle, no_restart=False)
            for _ in range(150):
                try:
                    after = await client.generate(token_ids=prompt, max_tokens=6, depth=0)
                    break
                except Exception as error:  # UNAVAILABLE while the actor restarts
                    assert "UNAVAILABLE" in str(error) or "unavailable" in str(error)
                    await asyncio.sleep(0.2)
            assert after.token_ids == before.token_ids
    finally:
        await running.stop()
        ray.kill(running.plane.handle, no_restart=True)


async def test_a_leaked_assignment_expires(ray_local, oracle):
    """An assignment whose session never reports or releases (its coordinator crashed) stops counting."""
    plane = await get_or_create_plane(
        CoordinatorConfig(plane_name=f"plane-lease-{uuid.uuid4().hex[:6]}", health_interval_seconds=0.1, lease_seconds=0.5)
    )
    await plane.call("register", ORACLE, oracle.address, "oracle-a")
    assignment = await plane.call("acquire", "lost-session", "", False, [])
    assert assignment is not None

    async def assigned() -> int:
        (worker,) = (await plane.call("status"))["workers"]
        return worker["assigned_sessions"]

    assert await assigned() == 1
    for _ in range(50):
        if await assigned() == 0:
            break
        await asyncio.sleep(0.1)
    assert await assigned() == 0
    await plane.call("release", "lost-session", {}, {})  # a late release changes nothing
    assert await assigned() == 0
    ray.kill(plane.handle, no_restart=True)


def test_a_lease_is_renewed_by_progress_reports():
    from coordinator.control_plane.statistics import SessionRecord, Statistics

    stats = Statistics()
    stats.started(SessionRecord("a", "", "p", "o", ""))
    stats.started(SessionRecord("b", "", "p", "o", ""))
    stats.sessions["a"].renewed -= 100
    stats.sessions["b"].renewed -= 100
    stats.progress("b", 2, 10, 4, 3)
    expired = stats.expired(time.monotonic() - 50)
    assert [r.session_id for r in expired] == ["a"] and list(stats.sessions) == ["b"]

