"""Credentials by role on loopback servers: client, admin and worker tokens each open their own API only, and
tenants are kept apart in the prefix cache."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
import ray

from coordinator.config import CoordinatorConfig
from coordinator.server import start_coordinator
from specd.client import AsyncSpecdClient
from specd.cluster.roles import start_local_worker
from specd.rpc.security import Credentials, Security, parse_client_tokens
from specd.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc, oracle_pb2_grpc
from tests.conftest import oracle_config

TOKENS = {"team-a": "tok-a", "team-b": "tok-b", "admin": "tok-admin", "worker": "tok-worker"}
# Two whole prefix-cache blocks and more: a second request with it reuses what the first prefilled.
PROMPT_IDS = [(5 * i) % 250 + 3 for i in range(30)]


def bearer(name: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if name is None else (("authorization", f"Bearer {TOKENS.get(name, name)}"),)


@pytest.fixture
def role_env(tmp_path: Path, monkeypatch):
    files = {
        "SPECD_AUTH_TOKEN_FILE": "# tenants\nteam-a:tok-a\nteam-b:tok-b\n",
        "SPECD_ADMIN_TOKEN_FILE": "tok-admin\n",
        "SPECD_WORKER_TOKEN_FILE": "tok-worker\n",
    }
    for variable, text in files.items():
        path = tmp_path / variable.lower()
        path.write_text(text)
        monkeypatch.setenv(variable, str(path))


@pytest.fixture
async def secured(role_env, ray_local, tiny_dir):
    oracle = await start_local_worker(oracle_config(tiny_dir))
    running = await start_coordinator(CoordinatorConfig(
        port=0, metrics_port=-1, plane_name=f"plane-roles-{uuid.uuid4().hex[:6]}", oracles=[oracle.address],
        health_interval_seconds=0.5,
    ))
    yield running, oracle
    await running.stop()
    await oracle.stop()
    ray.kill(running.plane.handle, no_restart=True)


def test_client_token_files_name_their_tenants():
    assert parse_client_tokens("a:1\n\n# comment\nb : 2\nbare\n") == {"1": "a", "2": "b", "bare": "default"}
    shared = Credentials(clients={"t": "default"})
    assert shared.identify("t") == ({"client", "admin", "worker"}, "default")  # one token for all, as before roles
    split = Credentials(clients={"t": "x"}, admin="a", worker="w")
    assert split.identify("t") == ({"client"}, "x") and split.identify("a") == ({"admin"}, "default")
    assert split.identify("nope") is None and split.token_for("worker") == "w" and split.token_for("client") == "t"


async def test_each_role_opens_its_own_api_only(secured):
    running, oracle = secured
    async with grpc.aio.insecure_channel(running.address) as channel:
        generate = generation_pb2_grpc.GenerationServiceStub(channel).Generate
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=PROMPT_IDS[:5]), max_tokens=3)
        for who, code in [(None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED),
                          ("admin", grpc.StatusCode.PERMISSION_DENIED), ("worker", grpc.StatusCode.PERMISSION_DENIED)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(request, metadata=bearer(who))
            assert info.value.code() == code, who
        for tenant in ("team-a", "team-b"):
            assert len((await generate(request, metadata=bearer(tenant))).token_ids) >= 1
        for who, code in [("team-a", grpc.StatusCode.PERMISSION_DENIED), ("worker", grpc.StatusCode.PERMISSION_DENIED),
                          (None, grpc.StatusCode.UNAUTHENTICATED)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=bearer(who))
            assert info.value.code() == code, who
            with pytest.raises(grpc.aio.AioRpcError) as info:  # registration is an admin action
                await admin.RegisterWorker(
                    admin_pb2.RegisterWorkerRequest(role=common_pb2.WORKER_ROLE_ORACLE, address="127.0.0.1:1"),
                    metadata=bearer(who),
                )
            assert info.value.code() == code, who
        status = await admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=bearer("admin"))
        assert status.workers[0].healthy  # the coordinator reached the worker with the worker credential
    async with grpc.aio.insecure_channel(oracle.address) as channel:
        stub = oracle_pb2_grpc.OracleServiceStub(channel)
        for who, code in [("team-a", grpc.StatusCode.PERMISSION_DENIED), ("admin", grpc.StatusCode.PERMISSION_DENIED),
                          ("wrong", grpc.StatusCode.UNAUTHENTICATED)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:  # a client cannot reach another's session on a worker
                await stub.CloseSession(common_pb2.CloseSessionRequest(session_id="someone-else"), metadata=bearer(who))
            assert info.value.code() == code, who
        assert (await stub.GetInfo(common_pb2.GetInfoRequest(), metadata=bearer("worker"))).vocab_size > 0
    assert Security.from_env("admin").call_metadata() == (("authorization", "Bearer tok-admin"),)  # what specctl sends


async def test_tenants_are_apart_in_the_prefix_cache(secured):
    running, _ = secured

    async def cached(tenant: str, salt: str = "") -> int:
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=PROMPT_IDS), max_tokens=2, cache_salt=salt,
        )
        async with grpc.aio.insecure_channel(running.address) as channel:
            reply = await generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, metadata=bearer(tenant))
        return reply.stats.cached_prompt_tokens

    assert await cached("team-a") == 0
    assert await cached("team-a") > 0  # its own prefix, reused
    assert await cached("team-b") == 0  # the same prompt from another tenant: nothing of team-a's shows
    assert await cached("team-a", salt="private") == 0  # a salt is a partition of its own
    assert await cached("team-b") > 0
    async with AsyncSpecdClient(running.address) as client:  # specd's client sends the first client token
        assert (await client.generate(token_ids=PROMPT_IDS[:4], max_tokens=2)).completion_tokens >= 1
