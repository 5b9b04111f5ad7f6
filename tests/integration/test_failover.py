"""Nothing lost when a worker fails: oracles as separate processes, killed (SIGKILL) or paused (SIGSTOP) mid-stream
by pid; the session moves to another oracle and the output is the one an uninterrupted run writes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.server import start_coordinator
from coordinator.session.clients import OracleClient
from specd.client import AsyncSpecdClient
from specd.cluster.procs import WorkerProcess, spawn
from specd.models.tiny import build_tokenizer
from specd.v1 import common_pb2
from tests.conftest import greedy_reference

PROMPT = "The quick brown fox jumps over"
ORACLE = common_pb2.WORKER_ROLE_ORACLE
DRAFT = common_pb2.WORKER_ROLE_DRAFT


@pytest.fixture(scope="module")
def prompt_ids():
    return build_tokenizer()(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
async def oracle_processes(tiny_dir: Path):
    """Four oracle workers, each a process of its own."""
    options = {"model": str(tiny_dir / "oracle"), "port": 0, "torch_threads": 1, "grace_seconds": 0.5}
    spawned = await asyncio.gather(*(asyncio.to_thread(spawn, "oracle", options) for _ in range(4)), return_exceptions=True)
    workers = [w for w in spawned if isinstance(w, WorkerProcess)]
    try:
        if len(workers) < 4:
            raise next(w for w in spawned if isinstance(w, BaseException))
        yield workers
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                os.kill(worker.process.pid, signal.SIGCONT)  # a paused one must be able to die
            worker.stop()


async def coordinator_over(name: str, oracles: dict[str, str], draft=None, **overrides):
    """A coordinator whose control plane knows these oracles by these names (the first by name gets a new session
    when all are idle), and a draft."""
    settings = {
        "port": 0, "metrics_port": 0, "plane_name": name, "oracles": [], "drafts": [], "health_interval_seconds": 0.5,
        "report_interval_seconds": 0.05,
    }
    config = CoordinatorConfig(**{**settings, **overrides})
    running = await start_coordinator(config)
    for worker_name, address in oracles.items():
        await running.plane.call("register", ORACLE, address, worker_name)
    if draft is not None:
        await running.plane.call("register", DRAFT, draft.address, "draft")
    return running


async def sessions_held(worker: WorkerProcess) -> int:
    client = OracleClient(worker.address)
    try:
        return (await client.info(2.0)).active_sessions
    finally:
        await client.close()


async def holder(workers: list[WorkerProcess], before: list[int] | None = None) -> WorkerProcess:
    """The oracle holding the one session: one with more sessions than `before` (each one's count when the request
    began; none by default). An oracle paused by an earlier test may still hold the session it was left with, until
    its time to live runs out."""
    for worker, held in zip(workers, before or [0] * len(workers), strict=True):
        if await sessions_held(worker) > held:
            return worker
    raise AssertionError("no oracle holds the session")


@pytest.mark.parametrize("depth", [2, 0])  # drafted rounds; the oracle alone, in decode runs
async def test_an_oracle_killed_mid_stream_loses_nothing(
    ray_local, tiny_dir, oracle_processes, same_draft, prompt_ids, depth
):
    """SIGKILL of the session's oracle after a few rounds (at depth 0: within a decode run): the stream goes on from
    another oracle with no error and no gap, and the output is the oracle's own greedy output."""
    first, second = [w for w in oracle_processes if w.process.poll() is None][:2]
    running = await coordinator_over(  # at depth 0 each decode run waits 200 ms first: the kill comes before the next
        f"plane-kill-{depth}", {"oracle-a": first.address, "oracle-b": second.address}, same_draft,
        oracle_delay_ms=5 if depth else 200,
    )
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 100)
    registry = running.coordinator.metrics.registry
    try:
        async with AsyncSpecdClient(running.address) as client:
            before = [await sessions_held(worker) for worker in (first, second)]
            chunks = []
            async for chunk in client.stream(token_ids=prompt_ids, max_tokens=100, stop_at_eos=False, depth=depth):
                chunks.append(chunk)
                if len(chunks) == 3:
                    victim = await holder([first, second], before)
                    victim.process.kill()  # SIGKILL, by pid
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == expected
        stats = chunks[-1].stats
        assert chunks[-1].finish_reason == "length" and stats.migrations == 1
        survivor = second if victim is first else first
        assert stats.oracle_worker == survivor.address
        assert registry.get_sample_value("specd_request_migrations_total") == 1.0
    finally:
        await running.stop()


@pytest.mark.parametrize("depth", [2, 0])
async def test_a_paused_oracle_is_left_within_its_deadline_and_sampling_stays_seeded(
    ray_local, tiny_dir, oracle_processes, same_draft, prompt_ids, depth
):
    """SIGSTOP of the session's oracle: its verify (at depth 0: the next token of its decode run) misses its call
    deadline, the session moves, and a seeded sampled request writes what it writes uninterrupted (same seed, same
    depths, draws keyed by position)."""
    alive = [w for w in oracle_processes if w.process.poll() is None]
    assert len(alive) >= 2
    # A decode run streams its tokens well ahead of the client; at depth 0 each run waits 200 ms first (a distant
    # oracle) and the request holds four runs, so the pause comes before the last.
    running = await coordinator_over(
        f"plane-pause-{depth}", {"oracle-a": alive[0].address, "oracle-b": alive[1].address}, same_draft,
        oracle_delay_ms=5 if depth else 200,
    )
    request = {"token_ids": prompt_ids, "max_tokens": 60 if depth else 100, "stop_at_eos": False, "depth": depth,
               "temperature": 0.9, "seed": 1234}
    paused: WorkerProcess | None = None
    try:
        async with AsyncSpecdClient(running.address) as client:
            reference = await client.generate(**request)
            assert reference.stats.migrations == 0
            await asyncio.sleep(0.2)  # the reference's sessions close after its last token
            before = [await sessions_held(worker) for worker in alive[:2]]
            chunks = []
            started = time.monotonic()
            async for chunk in client.stream(**request):
                chunks.append(chunk)
                if len(chunks) == 3:
                    paused = await holder(alive[:2], before)
                    os.kill(paused.process.pid, signal.SIGSTOP)
            elapsed = time.monotonic() - started
        assert [t for c in chunks for t in c.token_ids] == list(reference.token_ids)
        assert chunks[-1].stats.migrations == 1 and elapsed < 30
    finally:
        if paused is not None:
            os.kill(paused.process.pid, signal.SIGCONT)
        await running.stop()


async def test_an_oracle_that_fails_at_open_hands_the_session_to_the_next(ray_local, tiny_dir, oracle, prompt_ids):
    """The control plane still believes the first oracle healthy (checked rarely), but it is gone: the open fails,
    and the second oracle serves the request."""
    from specd.cluster.roles import start_local_worker
    from tests.conftest import oracle_config

    doomed = await start_local_worker(oracle_config(tiny_dir))
    try:
        running = await coordinator_over(
            "plane-open", {"oracle-a": doomed.address, "oracle-z": oracle.address}, health_interval_seconds=60.0
        )
    finally:
        await doomed.stop()
    try:
        async with AsyncSpecdClient(running.address) as client:
            result = await client.generate(token_ids=prompt_ids, max_tokens=10, stop_at_eos=False, depth=0)
        assert result.token_ids == greedy_reference(tiny_dir / "oracle", prompt_ids, 10)
        assert result.stats.oracle_worker == oracle.address
    finally:
        await running.stop()


async def test_past_the_migration_limit_the_client_gets_unavailable_with_the_count(ray_local, tiny_dir, prompt_ids):
    from specd.cluster.roles import start_local_worker
    from tests.conftest import oracle_config

    lone = await start_local_worker(oracle_config(tiny_dir))
    running = await coordinator_over("plane-limit", {"oracle-a": lone.address}, health_interval_seconds=60.0)
    try:
        async with AsyncSpecdClient(running.address) as client:
            chunks = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for chunk in client.stream(token_ids=prompt_ids, max_tokens=200, stop_at_eos=False, depth=0):
                    chunks.append(chunk)
                    if len(chunks) == 2:
                        await lone.stop()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert chunks and "no other healthy oracle" in info.value.details()
        assert "tokens had been generated" in info.value.details()
    finally:
        await running.stop()
        await lone.stop()


async def test_a_draft_error_of_any_status_never_fails_the_request(ray_local, tiny_dir, oracle, prompt_ids):
    """A draft with a shorter context than the oracle answers OUT_OF_RANGE once the session outgrows it; a draft
    whose session was advanced behind the coordinator's back answers FAILED_PRECONDITION. Either is dropped, and
    the session goes on with the oracle alone from the committed tokens."""
    from coordinator.session.clients import DraftClient
    from specd.cluster.roles import start_local_worker
    from tests.conftest import draft_config

    short = await start_local_worker(draft_config(tiny_dir, "oracle", lookup_min_ngram=0, max_context=40))
    desynced = await start_local_worker(draft_config(tiny_dir, "oracle", lookup_min_ngram=0))
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 80)
    intruder = DraftClient(desynced.address)
    try:
        for draft, status in ((short, "OUT_OF_RANGE"), (desynced, "FAILED_PRECONDITION")):
            running = await coordinator_over(
                f"plane-{status}", {"oracle-a": oracle.address}, draft, oracle_delay_ms=5, lookup_min_ngram=0
            )
            try:
                async with AsyncSpecdClient(running.address) as client:
                    chunks = []
                    async for chunk in client.stream(token_ids=prompt_ids, max_tokens=80, stop_at_eos=False, depth=2):
                        chunks.append(chunk)
                        if len(chunks) == 2 and draft is desynced:
                            (session_id,) = draft.servicer.worker.sessions.ids()
                            await intruder.propose(session_id, [1], 0, 1, 5.0)  # one token the coordinator never sent
                assert [t for c in chunks for t in c.token_ids] == expected
                stats = chunks[-1].stats
                assert stats.draft_error.startswith(status), stats.draft_error
                depths = list(stats.depth_per_round)
                assert depths[0] == 2 and depths[-1] == 0, depths
            finally:
                await running.stop()
    finally:
        await intruder.close()
        await short.stop()
        await desynced.stop()


async def test_drain_with_migrate_moves_sessions_in_flight(ray_local, tiny_dir, oracle, same_draft, prompt_ids):
    """`specctl drain WORKER --migrate` mid-stream: the session leaves the drained oracle at its next round, reopens
    on the other with its prompt and committed tokens, and writes the oracle's own greedy output."""
    from specd.cli.specctl import build_parser
    from specd.cluster.roles import start_local_worker
    from tests.conftest import oracle_config

    assert build_parser().parse_args(["drain", "oracle-a", "--migrate"]).migrate
    second = await start_local_worker(oracle_config(tiny_dir))
    running = await coordinator_over(
        "plane-migrate", {"oracle-a": oracle.address, "oracle-b": second.address}, same_draft, oracle_delay_ms=20,
        health_interval_seconds=0.2,
    )
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 120)
    try:
        async with AsyncSpecdClient(running.address) as client:
            chunks = []
            async for chunk in client.stream(token_ids=prompt_ids, max_tokens=120, stop_at_eos=False, depth=2):
                chunks.append(chunk)
                if len(chunks) == 3:
                    drained, other = ("oracle-a", second) if len(oracle.servicer.worker.sessions) else ("oracle-b", oracle)
                    status = await running.plane.call("drain", drained, True, True)
                    assert status["migrating"]
        assert [t for c in chunks for t in c.token_ids] == expected
        stats = chunks[-1].stats
        assert stats.migrations == 1 and stats.oracle_worker == other.address
        assert len(oracle.servicer.worker.sessions) == len(second.servicer.worker.sessions) == 0
    finally:
        for name in ("oracle-a", "oracle-b"):
            await running.plane.call("drain", name, False)
        await running.stop()
        await second.stop()


@pytest.mark.parametrize("draft", ["feature_draft", "layers_draft"])
async def test_a_feature_draft_follows_the_session_to_the_new_oracle(
    ray_local, tiny_dir, feature_draft, layers_draft, draft, prompt_ids
):
    """A feature draft reads the oracle's features: after a move its session reopens with the new oracle's features
    for the prompt and committed tokens, and keeps drafting (k > 0 after the move), the output exact. A draft of
    several hidden states gets those of the new oracle too."""
    from specd.cluster.roles import start_local_worker
    from tests.conftest import oracle_config

    feature_draft = {"feature_draft": feature_draft, "layers_draft": layers_draft}[draft]
    first = await start_local_worker(oracle_config(tiny_dir))
    second = await start_local_worker(oracle_config(tiny_dir))
    running = await coordinator_over(
        f"plane-feature-move-{draft}", {"oracle-a": first.address, "oracle-b": second.address}, feature_draft,
        oracle_delay_ms=10, lookup_min_ngram=0,
    )
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 100)
    try:
        async with AsyncSpecdClient(running.address) as client:
            chunks = []
            async for chunk in client.stream(token_ids=prompt_ids, max_tokens=100, stop_at_eos=False, depth=2):
                chunks.append(chunk)
                if len(chunks) == 3:
                    holding = first if len(first.servicer.worker.sessions) else second
                    await holding.stop()
        assert [t for c in chunks for t in c.token_ids] == expected
        stats = chunks[-1].stats
        assert stats.migrations == 1 and not stats.draft_error
        depths = list(stats.depth_per_round)
        assert depths.count(2) > 10 and 2 in depths[len(depths) // 2 :]  # still drafting from the new oracle's features
    finally:
        await running.stop()
        await first.stop()
        await second.stop()
