"""Sessions on real loopback workers: KV-cache rollback, bad input, cancellation and TTL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.depth import FixedDepth
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import SessionRequest, SpeculativeSession
from specd.cluster.roles import start_local_worker
from specd.runtime.kv import KVSession
from specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc, oracle_pb2, oracle_pb2_grpc
from tests.conftest import draft_config, oracle_config


def layer_tensors(kv: KVSession) -> list[torch.Tensor]:
    return [t for layer in kv.cache.layers for t in (layer.keys, layer.values)]


async def test_rollback_equals_fresh_prefill(oracle, unrelated_draft):
    """After many rounds with rejections, both caches equal a fresh prefill of the committed tokens."""
    oracle_client, draft_client = OracleClient(oracle.address), DraftClient(unrelated_draft.address)
    session = SpeculativeSession(
        SessionRequest(prompt=[5, 17, 42, 99, 7], sampling=common_pb2.SamplingParams(), max_tokens=60),
        draft_client,
        oracle_client,
        FixedDepth(5),
    )
    try:
        await session.open()
        async for _ in session.rounds():
            pass
        stats = session.stats
        assert stats.rounds > 10 and stats.accepted < stats.drafted
        # The clocks count the prefill: open <= first token <= total, and the rounds' RPCs fit in the rest.
        assert 0 < stats.open_seconds <= stats.time_to_first_token_seconds <= stats.total_seconds
        rpcs = stats.draft_seconds + stats.verify_seconds + stats.network_seconds
        assert rpcs <= stats.total_seconds - stats.open_seconds
        for worker in (oracle, unrelated_draft):
            state = worker.servicer.worker.sessions.get(session.session_id)
            committed = state.committed
            if worker is oracle:
                assert state.kv.cached_ids == committed[:-1]
            else:  # the draft learns the last round's tokens on its next call; roll back as it would
                committed = committed + session._draft_pending
                state.kv.sync(committed)
                assert state.kv.cached_ids == committed[: len(state.kv.cached_ids)]
                assert len(state.kv.cached_ids) >= len(committed) - 6
            fresh = KVSession(state.kv.model, state.kv.device)
            fresh.forward(state.kv.cached_ids)
            for got, want in zip(layer_tensors(state.kv), layer_tensors(fresh)):
                assert got.shape == want.shape
                assert torch.allclose(got, want, atol=1e-4)
    finally:
        await session.close()
        await oracle_client.close()
        await draft_client.close()


@pytest.fixture
async def stubs(oracle, unrelated_draft):
    oracle_channel = grpc.aio.insecure_channel(oracle.address)
    draft_channel = grpc.aio.insecure_channel(unrelated_draft.address)
    yield oracle_pb2_grpc.OracleServiceStub(oracle_channel), draft_pb2_grpc.DraftServiceStub(draft_channel)
    await oracle_channel.close()
    await draft_channel.close()


async def expect_status(call, code: grpc.StatusCode, fragment: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    return info.value.details()


def open_oracle(session_id="s", prompt=(1, 2, 3), **sampling):
    return oracle_pb2.OpenOracleSessionRequest(
        session_id=session_id, prompt_token_ids=list(prompt), sampling=common_pb2.SamplingParams(**sampling)
    )


async def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(stubs, oracle):
    oracle_stub, draft_stub = stubs
    invalid, out_of_range = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
    await expect_status(oracle_stub.OpenSession(open_oracle(prompt=())), invalid, "empty")
    await expect_status(oracle_stub.OpenSession(open_oracle(prompt=[1] * 600)), out_of_range, "context")
    await expect_status(oracle_stub.OpenSession(open_oracle(temperature=-1.0)), invalid, "temperature")
    await expect_status(oracle_stub.OpenSession(open_oracle(temperature=1.0, top_p=1.5)), invalid, "top_p")
    await expect_status(oracle_stub.OpenSession(open_oracle(temperature=1.0, top_p=-0.2)), invalid, "top_p")
    await expect_status(oracle_stub.OpenSession(open_oracle(top_k=-3)), invalid, "top_k")
    await expect_status(oracle_stub.OpenSession(open_oracle(prompt=[1, 10**6])), invalid, "token ids")
    await expect_status(oracle_stub.OpenSession(open_oracle(session_id="")), invalid, "session_id")
    await expect_status(
        oracle_stub.Verify(oracle_pb2.VerifyRequest(session_id="nope", draft_token_ids=[1])),
        grpc.StatusCode.NOT_FOUND,
        "unknown session",
    )
    await oracle_stub.OpenSession(open_oracle(session_id="bad-k"))
    await expect_status(
        oracle_stub.Verify(oracle_pb2.VerifyRequest(session_id="bad-k", draft_token_ids=[1] * 40)),
        out_of_range,
        "depth",
    )
    await expect_status(oracle_stub.OpenSession(open_oracle(session_id="bad-k")), grpc.StatusCode.ALREADY_EXISTS)
    await draft_stub.OpenSession(
        draft_pb2.OpenDraftSessionRequest(session_id="bad-k", prompt_token_ids=[1, 2, 3])
    )
    await expect_status(
        draft_stub.Propose(draft_pb2.ProposeRequest(session_id="bad-k", depth=100)), out_of_range, "depth"
    )
    await expect_status(draft_stub.Propose(draft_pb2.ProposeRequest(session_id="bad-k", depth=0)), invalid)
    # A caller whose count of committed tokens disagrees with the worker's is out of sync, at either worker.
    desync = grpc.StatusCode.FAILED_PRECONDITION
    await expect_status(
        draft_stub.Propose(draft_pb2.ProposeRequest(session_id="bad-k", depth=2, committed_length=7)), desync, "sync"
    )
    await expect_status(
        oracle_stub.Verify(oracle_pb2.VerifyRequest(session_id="bad-k", draft_token_ids=[1], committed_length=7)),
        desync,
        "sync",
    )
    await expect_status(
        draft_stub.Propose(draft_pb2.ProposeRequest(session_id="gone", depth=2)), grpc.StatusCode.NOT_FOUND
    )
    # Nothing above broke the session or the server: a valid round still works.
    proposal = await draft_stub.Propose(draft_pb2.ProposeRequest(session_id="bad-k", depth=3))
    verdict = await oracle_stub.Verify(
        oracle_pb2.VerifyRequest(session_id="bad-k", draft_token_ids=proposal.token_ids, committed_length=3)
    )
    assert 0 <= verdict.accepted <= 3 and verdict.committed_length == 3 + verdict.accepted + 1
    for stub in (oracle_stub, draft_stub):
        assert (await stub.CloseSession(common_pb2.CloseSessionRequest(session_id="bad-k"))).existed
    async with grpc.aio.insecure_channel(oracle.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_sampled_proposal_must_be_a_distribution(stubs):
    oracle_stub, _ = stubs
    await oracle_stub.OpenSession(open_oracle(session_id="q", temperature=1.0, seed=3))
    bad = common_pb2.TokenDistribution(token_ids=[1, 2], probs=[0.2, 0.2])
    await expect_status(
        oracle_stub.Verify(oracle_pb2.VerifyRequest(session_id="q", draft_token_ids=[1], draft_distributions=[bad])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sum to 1",
    )
    await expect_status(
        oracle_stub.Verify(oracle_pb2.VerifyRequest(session_id="q", draft_token_ids=[1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "one proposal distribution per draft token",
    )
    await oracle_stub.CloseSession(common_pb2.CloseSessionRequest(session_id="q"))


async def test_cancelled_generation_leaves_no_session(oracle, unrelated_draft):
    oracle_client, draft_client = OracleClient(oracle.address), DraftClient(unrelated_draft.address)
    session = SpeculativeSession(
        SessionRequest(prompt=[3, 4, 5], sampling=common_pb2.SamplingParams(), max_tokens=400),
        draft_client,
        oracle_client,
        FixedDepth(3),
    )
    rounds_seen = asyncio.Event()

    async def run():
        try:
            await session.open()
            async for _ in session.rounds():
                rounds_seen.set()
        finally:
            await session.close()

    task = asyncio.create_task(run())
    await asyncio.wait_for(rounds_seen.wait(), 30)
    assert session.session_id in oracle.servicer.worker.sessions
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert session.session_id not in oracle.servicer.worker.sessions
    assert session.session_id not in unrelated_draft.servicer.worker.sessions
    await oracle_client.close()
    await draft_client.close()


async def test_idle_sessions_expire(tiny_dir):
    oracle_worker = await start_local_worker(oracle_config(tiny_dir, session_ttl_seconds=0.3), sweep_seconds=0.1)
    draft_worker = await start_local_worker(draft_config(tiny_dir, session_ttl_seconds=0.3), sweep_seconds=0.1)
    try:
        async with grpc.aio.insecure_channel(oracle_worker.address) as oc, grpc.aio.insecure_channel(
            draft_worker.address
        ) as dc:
            oracle_stub, draft_stub = oracle_pb2_grpc.OracleServiceStub(oc), draft_pb2_grpc.DraftServiceStub(dc)
            await oracle_stub.OpenSession(open_oracle(session_id="idle"))
            await draft_stub.OpenSession(draft_pb2.OpenDraftSessionRequest(session_id="idle", prompt_token_ids=[1, 2]))
            await asyncio.sleep(1.0)
            assert len(oracle_worker.servicer.worker.sessions) == 0
            assert len(draft_worker.servicer.worker.sessions) == 0
            await expect_status(
                draft_stub.Propose(draft_pb2.ProposeRequest(session_id="idle", depth=2)), grpc.StatusCode.NOT_FOUND
            )
            await expect_status(
                oracle_stub.Verify(oracle_pb2.VerifyRequest(session_id="idle")), grpc.StatusCode.NOT_FOUND
            )
    finally:
        await oracle_worker.stop()
        await draft_worker.stop()


async def test_session_limit_is_resource_exhausted(tiny_dir):
    worker = await start_local_worker(oracle_config(tiny_dir, max_sessions=1))
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = oracle_pb2_grpc.OracleServiceStub(channel)
            await stub.OpenSession(open_oracle(session_id="a"))
            await expect_status(stub.OpenSession(open_oracle(session_id="b")), grpc.StatusCode.RESOURCE_EXHAUSTED)
    finally:
        await worker.stop()


async def streamed(call) -> list:
    return [message async for message in call]


async def test_a_decode_run_commits_what_single_rounds_commit(stubs, oracle):
    """Decode(n) streams n verdicts, each the token a k = 0 Verify commits at that place (greedy, and sampled with a
    seed: draws are keyed by position); a stop token ends the run after it."""
    oracle_stub, _ = stubs
    prompt = [5, 9, 13, 2]
    for name, sampling in (("greedy", {}), ("sampled", {"temperature": 0.8, "seed": 7})):
        for sid in (f"one-{name}", f"run-{name}", f"stop-{name}"):
            await oracle_stub.OpenSession(open_oracle(sid, prompt, **sampling))
        single = []
        for i in range(12):
            verdict = await oracle_stub.Verify(
                oracle_pb2.VerifyRequest(session_id=f"one-{name}", committed_length=len(prompt) + i)
            )
            single.append(verdict.next_token_id)
        run = await streamed(oracle_stub.Decode(
            oracle_pb2.DecodeRequest(session_id=f"run-{name}", committed_length=len(prompt), max_tokens=12)
        ))
        assert [v.next_token_id for v in run] == single
        assert [v.committed_length for v in run] == list(range(len(prompt) + 1, len(prompt) + 13))
        assert all(v.accepted == 0 and v.step_sessions >= 1 for v in run)
        stop = single[4]
        ended = await streamed(oracle_stub.Decode(oracle_pb2.DecodeRequest(
            session_id=f"stop-{name}", committed_length=len(prompt), max_tokens=12, stop_token_ids=[stop]
        )))
        assert [v.next_token_id for v in ended] == single[: single.index(stop) + 1]
        for sid in (f"one-{name}", f"run-{name}", f"stop-{name}"):
            await oracle_stub.CloseSession(common_pb2.CloseSessionRequest(session_id=sid))
    assert len(oracle.servicer.worker.sessions) == 0


async def test_a_bad_decode_run_gets_a_clear_status_and_keeps_what_it_committed(stubs, oracle):
    oracle_stub, _ = stubs

    async def refused(request: oracle_pb2.DecodeRequest, code: grpc.StatusCode, fragment: str) -> list:
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for verdict in oracle_stub.Decode(request):
                got.append(verdict)
        assert info.value.code() == code, info.value.details()
        assert fragment in info.value.details()
        return got

    await refused(oracle_pb2.DecodeRequest(session_id="nope", max_tokens=3), grpc.StatusCode.NOT_FOUND, "unknown")
    await oracle_stub.OpenSession(open_oracle("run", [1, 2, 3]))
    await refused(
        oracle_pb2.DecodeRequest(session_id="run", committed_length=3, max_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT, "max_tokens",
    )
    await refused(
        oracle_pb2.DecodeRequest(session_id="run", committed_length=9, max_tokens=3),
        grpc.StatusCode.FAILED_PRECONDITION, "sync",
    )
    # A run past the model's context (512 positions) streams every token there is room for, then OUT_OF_RANGE.
    prompt = [(7 * i) % 50 + 1 for i in range(505)]
    await oracle_stub.OpenSession(open_oracle("long", prompt))
    got = await refused(
        oracle_pb2.DecodeRequest(session_id="long", committed_length=len(prompt), max_tokens=20),
        grpc.StatusCode.OUT_OF_RANGE, "context",
    )
    assert got and got[-1].committed_length == len(prompt) + len(got)
    assert oracle.servicer.worker.sessions.get("long").committed[len(prompt):] == [v.next_token_id for v in got]
    # The server and the sessions are still there: a valid run works.
    (verdict,) = await streamed(
        oracle_stub.Decode(oracle_pb2.DecodeRequest(session_id="run", committed_length=3, max_tokens=1))
    )
    assert verdict.committed_length == 4
    for sid in ("run", "long"):
        assert (await oracle_stub.CloseSession(common_pb2.CloseSessionRequest(session_id=sid))).existed


async def test_a_cancelled_decode_run_leaves_no_session(stubs, oracle, monkeypatch):
    """A caller that leaves a run midway is gone, as one that cancels a Verify: its session is freed. (Each step of
    the tiny oracle is held 10 ms, so that the run is still going when the caller leaves: a run that has ended
    leaves its session open, as a finished Verify does.)"""
    import time

    verifier = oracle.servicer.worker
    finish = verifier.finish_verify

    def held(*args):
        time.sleep(0.01)
        return finish(*args)

    monkeypatch.setattr(verifier, "finish_verify", held)
    oracle_stub, _ = stubs
    await oracle_stub.OpenSession(open_oracle("left", [4, 5, 6]))
    call = oracle_stub.Decode(oracle_pb2.DecodeRequest(session_id="left", committed_length=3, max_tokens=400))
    async for verdict in call:
        if verdict.committed_length == 5:
            break
    call.cancel()
    for _ in range(100):
        if "left" not in oracle.servicer.worker.sessions:
            break
        await asyncio.sleep(0.05)
    assert "left" not in oracle.servicer.worker.sessions
