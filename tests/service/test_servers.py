"""Server behaviour every worker shares: pairing checks, reflection, graceful shutdown, seeds."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.depth import FixedDepth
from coordinator.session.generation import GenerationRequest, stream_generation
from coordinator.session.pairing import connect_pair
from specd.cluster.procs import spawn
from specd.cluster.roles import start_local_worker
from specd.core.errors import IncompatiblePair
from specd.models.tiny import build_model, build_tokenizer
from specd.v1 import common_pb2
from tests.conftest import draft_config


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    """A draft whose tokenizer differs from the oracle's."""
    path = tmp_path_factory.mktemp("other-vocab")
    tokenizer = build_tokenizer(vocab_size=300)
    build_model(len(tokenizer), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


async def test_mismatched_vocabulary_is_refused(oracle, other_vocab_dir):
    worker = await start_local_worker(draft_config(other_vocab_dir.parent, other_vocab_dir.name))
    try:
        with pytest.raises(IncompatiblePair, match="do not share a vocabulary"):
            await connect_pair(oracle.address, worker.address)
    finally:
        await worker.stop()


async def test_reflection_lists_the_services(oracle):
    async with grpc.aio.insecure_channel(oracle.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for reply in call:
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"specd.v1.OracleService", "grpc.health.v1.Health"} <= names


def test_sigterm_stops_a_worker_process_gracefully(tiny_dir):
    worker = spawn("oracle", {"model": str(tiny_dir / "oracle"), "port": 0, "grace_seconds": 1})
    try:
        with grpc.insecure_channel(worker.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=20) == 0
        assert time.monotonic() - started < 15
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    assert "stopped" in log


async def test_seed_reproduces_a_sampled_generation(oracle, unrelated_draft):
    pair = await connect_pair(oracle.address, unrelated_draft.address)

    async def sample(seed: int) -> list[int]:
        request = GenerationRequest(
            token_ids=[5, 17, 42], max_tokens=30, stop_at_eos=False,
            sampling=common_pb2.SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=seed),
        )
        return [t async for d in stream_generation(request, pair, FixedDepth(3)) for t in d.token_ids]

    first, again, other = await sample(7), await sample(7), await sample(8)
    assert first == again
    assert first != other
    await pair.oracle.close()
    await pair.draft.close()


def test_cli_generate_json_with_local_workers(tiny_dir):
    done = subprocess.run(
        [sys.executable, "-m", "specd.cli", "generate", "The quick brown fox", "--raw", "--json", "--max-tokens", "10",
         "--oracle-model", str(tiny_dir / "oracle"), "--draft-model", str(tiny_dir / "oracle"), "--depth", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout)
    assert len(result["token_ids"]) == result["usage"]["completion_tokens"]
    assert result["stats"]["accepted"] == result["stats"]["drafted"] > 0
    assert {"text", "token_ids", "stats", "finish_reason"} <= set(result)


async def test_worker_metrics_endpoint(tiny_dir):
    import urllib.request

    from tests.conftest import oracle_config

    worker = await start_local_worker(oracle_config(tiny_dir, metrics_port=0))
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            from specd.v1 import oracle_pb2, oracle_pb2_grpc

            stub = oracle_pb2_grpc.OracleServiceStub(channel)
            await stub.OpenSession(oracle_pb2.OpenOracleSessionRequest(session_id="m", prompt_token_ids=[1, 2, 3]))
            await stub.Verify(oracle_pb2.VerifyRequest(session_id="m", draft_token_ids=[4, 5], committed_length=3))
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        body = await asyncio.get_running_loop().run_in_executor(None, lambda: urllib.request.urlopen(url).read().decode())
    finally:
        await worker.stop()
    assert "specd_num_requests_running 1.0" in body
    assert "specd_spec_decode_num_draft_tokens_total 2.0" in body
    assert 'specd_worker_step_seconds_count{call="verify"} 1.0' in body
