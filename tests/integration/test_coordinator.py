"""The coordinator on a real local Ray with real gRPC workers on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.server import start_coordinator
from coordinator.session.clients import OracleClient
from specd.client import AsyncSpecdClient
from specd.models.tiny import build_tokenizer
from specd.v1 import common_pb2
from tests.conftest import greedy_reference

PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def prompt_ids():
    return build_tokenizer()(PROMPT)["input_ids"]


async def own_coordinator(plane_name: str, oracle, draft=None, **overrides):
    settings = {
        "port": 0, "metrics_port": 0, "plane_name": plane_name, "oracles": [oracle.address],
        "drafts": [draft.address] if draft is not None else [], "health_interval_seconds": 0.5,
        "report_interval_seconds": 0.05,
    }
    config = CoordinatorConfig(**{**settings, **overrides})
    return await start_coordinator(config)


async def no_sessions_left(*workers, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if all(len(w.servicer.worker.sessions) == 0 for w in workers):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_identical_pair_accepts_every_drafted_token_and_is_exact(
    ray_local, tiny_dir, oracle, same_draft, prompt_ids
):
    """A draft that is the oracle has every drafted token accepted. With a distant oracle (10 ms round trip) and a
    draft as dear per token as the oracle, the policy drafts while it learns, and then leaves the oracle alone in
    decode runs, which share a round trip among up to 32 tokens where a drafted block pays one per block and a
    draft step per token."""
    running = await own_coordinator("plane-same", oracle, same_draft, oracle_delay_ms=10)
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 48)
    try:
        async with AsyncSpecdClient(running.address) as client:
            results = [
                await client.generate(token_ids=prompt_ids, max_tokens=48, stop_at_eos=False) for _ in range(4)
            ]
        assert all(result.token_ids == expected for result in results)
        drafted = sum(result.stats.drafted for result in results)
        assert drafted > 0 and sum(result.stats.accepted for result in results) == drafted
        last = list(results[-1].stats.depth_per_round)
        assert last.count(0) > len(last) // 2, last
    finally:
        await running.stop()


async def test_unrelated_pair_ends_with_k_zero_and_is_exact(ray_local, tiny_dir, oracle, unrelated_draft, prompt_ids):
    # Without prompt lookup: the tiny oracle repeats itself, and copied blocks would pay.
    running = await own_coordinator("plane-unrelated", oracle, unrelated_draft, lookup_min_ngram=0)
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 48)
    try:
        async with AsyncSpecdClient(running.address) as client:
            for _ in range(2):
                result = await client.generate(token_ids=prompt_ids, max_tokens=48, stop_at_eos=False)
                assert result.token_ids == expected
        depths = list(result.stats.depth_per_round)
        tail = depths[-16:]  # converged: the oracle alone, with a probe after every 4 rounds
        # How long a probe runs is the stop rule's call, from measured timings (a busy host moves it),
        # so only how often the draft is asked is checked here.
        assert sum(1 for k in tail if k) <= 4, (depths, result.stats.drafted, result.stats.accepted)
    finally:
        await running.stop()


async def test_stream_delivers_rounds_and_final_stats_add_up(coordinator, prompt_ids):
    codec = build_tokenizer()
    async with AsyncSpecdClient(coordinator.address) as client:
        chunks = [c async for c in client.stream(token_ids=prompt_ids, max_tokens=40, stop_at_eos=False, depth=2)]
    final = chunks[-1]
    assert final.finish_reason == "length"
    assert sum(1 for c in chunks if c.token_ids) > 5  # tokens arrive as rounds complete
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == final.completion_tokens == 40
    assert "".join(c.text for c in chunks) == codec.decode(ids, skip_special_tokens=True)
    s = final.stats
    assert s.accepted <= s.drafted
    assert s.drafted == sum(s.depth_per_round) == sum(s.drafted_per_position)
    assert s.accepted == sum(s.accepted_per_position)
    assert s.rounds == len(s.depth_per_round)
    drafting_rounds = sum(1 for k in s.depth_per_round if k)
    assert s.mean_acceptance_length == pytest.approx(1 + s.accepted / drafting_rounds)
    # Each round commits accepted + 1 tokens; the last round may be cut at max_tokens.
    assert s.accepted + s.rounds >= 40


async def test_cancelled_stream_and_expired_deadline_leave_no_session(coordinator, oracle, unrelated_draft, same_draft, prompt_ids):
    async with AsyncSpecdClient(coordinator.address) as client:
        seen = 0
        async for chunk in client.stream(token_ids=prompt_ids, max_tokens=400, stop_at_eos=False, depth=8):
            seen += len(chunk.token_ids)
            if seen >= 5:
                break  # leaving the loop cancels the call
    assert await no_sessions_left(oracle, unrelated_draft, same_draft)
    async with AsyncSpecdClient(coordinator.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.generate(token_ids=prompt_ids, max_tokens=450, stop_at_eos=False, depth=1, timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await no_sessions_left(oracle, unrelated_draft, same_draft)
    # The coordinator tells the control plane of the release after the workers' sessions close
    # (fire-and-forget), so the plane may lag the workers by a moment.
    for _ in range(100):
        if await coordinator.plane.call("list_sessions") == []:
            break
        await asyncio.sleep(0.05)
    assert await coordinator.plane.call("list_sessions") == []


async def test_drained_worker_gets_no_new_sessions_and_finishes_its_own(ray_local, oracle, same_draft, unrelated_draft, prompt_ids):
    running = await own_coordinator("plane-drain", oracle, same_draft)
    await running.plane.call("register", common_pb2.WORKER_ROLE_DRAFT, unrelated_draft.address, "second-draft")
    try:
        async with AsyncSpecdClient(running.address) as client:
            stream = client.stream(token_ids=prompt_ids, max_tokens=300, stop_at_eos=False, depth=4)
            first = await stream.__anext__()
            assert first.token_ids
            status = await running.plane.call("status")
            busy = [w["name"] for w in status["workers"] if w["role"] == common_pb2.WORKER_ROLE_DRAFT and w["assigned_sessions"]]
            assert len(busy) == 1
            await running.plane.call("drain", busy[0], True)
            other = await client.generate(token_ids=prompt_ids, max_tokens=8, stop_at_eos=False, depth=2)
            drained_address = same_draft.address if busy[0] != "second-draft" else unrelated_draft.address
            assert other.stats.draft_worker and other.stats.draft_worker != drained_address
            rest = [c async for c in stream]
        assert rest[-1].finish_reason == "length"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 300
        assert rest[-1].stats.draft_worker == drained_address
    finally:
        await running.stop()


async def run_specctl(address: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specd.cli.specctl", "--address", address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_specctl_against_a_running_coordinator(ray_local, oracle, same_draft, unrelated_draft, prompt_ids):
    # A 20 ms oracle round trip keeps one long session in flight while specctl looks at it.
    coordinator = await own_coordinator("plane-ctl", oracle, same_draft, oracle_delay_ms=20)
    await coordinator.plane.call("register", common_pb2.WORKER_ROLE_DRAFT, unrelated_draft.address)
    try:
        await specctl_checks(coordinator, prompt_ids)
    finally:
        await coordinator.stop()


async def specctl_checks(coordinator, prompt_ids):
    async with AsyncSpecdClient(coordinator.address) as client:
        await client.generate(token_ids=prompt_ids, max_tokens=16, stop_at_eos=False)
        stream = client.stream(token_ids=prompt_ids, max_tokens=400, stop_at_eos=False, depth=1)
        await stream.__anext__()
        await asyncio.sleep(0.2)
        sessions = json.loads(await run_specctl(coordinator.address, "--json", "sessions"))
        assert len(sessions["sessions"]) == 1 and sessions["sessions"][0]["depth"] == 1
        assert sessions["sessions"][0]["generated_tokens"] > 0
        async for _ in stream:
            pass
    status = json.loads(await run_specctl(coordinator.address, "--json", "status"))
    roles = sorted(w["role"] for w in status["workers"])
    assert roles == ["draft", "draft", "oracle"]
    assert all(w["healthy"] for w in status["workers"])
    # each worker's resident memory and its linear layers per weights kernel
    assert all(w["resident_mb"] > 0 and w["weights"] for w in status["workers"])
    assert len(status["pairs"]) == 3
    table = await run_specctl(coordinator.address, "status")
    assert "oracle-1" in table and "healthy" in table.lower()
    assert "MEMORY" in table and "WEIGHTS" in table and " MB" in table
    pair = next(p["pair_id"] for p in status["pairs"] if p["draft"])
    await run_specctl(coordinator.address, "depth", "set", "fixed:3", "--pair", pair)
    policies = json.loads(await run_specctl(coordinator.address, "--json", "depth", "get", "--pair", pair))
    assert policies["pairs"][0]["policy"] == "fixed:3"
    stats = json.loads(await run_specctl(coordinator.address, "--json", "stats"))
    assert any(p["draft_tokens"] > 0 and p["accepted_per_position"] for p in stats["pairs"])
    assert "acceptance" in (await run_specctl(coordinator.address, "stats")).lower()
    await run_specctl(coordinator.address, "depth", "set", "goodput", "--pair", pair)


async def test_metrics_endpoint_reports_spec_decode_counters(coordinator, prompt_ids):
    async with AsyncSpecdClient(coordinator.address) as client:
        await client.generate(token_ids=prompt_ids, max_tokens=16, stop_at_eos=False, depth=3)
    url = f"http://127.0.0.1:{coordinator.metrics_port}/metrics"
    body = await asyncio.get_running_loop().run_in_executor(None, lambda: urllib.request.urlopen(url).read().decode())
    for name in (
        "specd_spec_decode_num_drafts_total",
        "specd_spec_decode_num_draft_tokens_total",
        "specd_spec_decode_num_accepted_tokens_total",
        "specd_spec_decode_num_accepted_tokens_per_pos_total",
        "specd_time_to_first_token_seconds",
        "specd_inter_token_latency_seconds",
        "specd_e2e_request_latency_seconds",
        "specd_num_requests_running",
        "specd_num_requests_waiting",
        "specd_spec_decode_depth",
    ):
        assert name in body, name
    drafts = [line for line in body.splitlines() if line.startswith("specd_spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0


async def test_bad_requests_get_clear_statuses(coordinator, prompt_ids):
    async with AsyncSpecdClient(coordinator.address) as client:
        cases = [
            (dict(token_ids=prompt_ids, max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
            (dict(token_ids=prompt_ids, max_tokens=10**6), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
            (dict(prompt="", max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
            (dict(token_ids=[1] * 900, max_tokens=4), grpc.StatusCode.OUT_OF_RANGE, "context"),
            (dict(token_ids=prompt_ids, max_tokens=4, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
            (dict(token_ids=prompt_ids, max_tokens=4, temperature=1.0, top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
            (dict(token_ids=prompt_ids, max_tokens=4, depth=99), grpc.StatusCode.OUT_OF_RANGE, "depth"),
            (dict(token_ids=prompt_ids, max_tokens=4, depth=-1), grpc.StatusCode.INVALID_ARGUMENT, "depth"),
            (dict(token_ids=prompt_ids, max_tokens=4, temperature=1e-40), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
            (dict(token_ids=prompt_ids, max_tokens=4, stop=["x"] * 17), grpc.StatusCode.OUT_OF_RANGE, "stop strings"),
            (dict(token_ids=prompt_ids, max_tokens=4, stop=["x" * 257]), grpc.StatusCode.OUT_OF_RANGE, "stop strings"),
            (dict(messages=[{"role": "user", "content": "hi"}] * 1025, max_tokens=4), grpc.StatusCode.OUT_OF_RANGE,
             "chat messages"),
        ]
        for kwargs, code, fragment in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(**kwargs)
            assert info.value.code() == code, (kwargs, info.value.details())
            assert fragment in info.value.details()
        ok = await client.generate(token_ids=prompt_ids, max_tokens=4)
        assert ok.completion_tokens <= 4
        assert len(ok.request_id) == 32  # generated when the request names none
        named = await client.generate(token_ids=prompt_ids, max_tokens=2, request_id="mine-1")
        assert named.request_id == "mine-1"


async def test_stop_strings_and_chat_template(coordinator, prompt_ids):
    codec = build_tokenizer()
    async with AsyncSpecdClient(coordinator.address) as client:
        full = await client.generate(token_ids=prompt_ids, max_tokens=30, stop_at_eos=False)
        # Random weights emit arbitrary bytes; pick a stop string of plain ASCII letters.
        stop = next(full.text[i : i + 3] for i in range(4, len(full.text) - 3) if full.text[i : i + 3].isascii()
                    and full.text[i : i + 3].isalpha())
        cut = await client.generate(token_ids=prompt_ids, max_tokens=30, stop_at_eos=False, stop=[stop])
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(stop)]
        assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
        chat = await client.generate(messages=[{"role": "user", "content": "hello"}], max_tokens=5, stop_at_eos=False)
    expected_prompt = codec.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    expected_prompt = expected_prompt["input_ids"] if hasattr(expected_prompt, "keys") else expected_prompt
    assert chat.prompt_tokens == len(expected_prompt)


async def test_a_draft_dying_mid_stream_does_not_fail_the_request(ray_local, tiny_dir, oracle, prompt_ids):
    from specd.cluster.roles import start_local_worker
    from tests.conftest import draft_config

    draft = await start_local_worker(draft_config(tiny_dir, "oracle"))
    running = await own_coordinator("plane-draft-dies", oracle, draft, oracle_delay_ms=5)
    expected = greedy_reference(tiny_dir / "oracle", prompt_ids, 120)
    try:
        async with AsyncSpecdClient(running.address) as client:
            chunks = []
            async for chunk in client.stream(token_ids=prompt_ids, max_tokens=120, stop_at_eos=False, depth=2):
                chunks.append(chunk)
                if len(chunks) == 3:
                    await draft.stop()  # the draft goes away mid-session
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == expected
        assert chunks[-1].finish_reason == "length"
        depths = list(chunks[-1].stats.depth_per_round)
        assert depths[0] == 2 and depths[-1] == 0  # went on with the oracle alone
        assert await no_sessions_left(oracle)
    finally:
        await running.stop()


async def test_admission_is_bounded_and_its_gauges_return_to_zero(ray_local, oracle, prompt_ids):
    """One running slot and one waiting place: a third request is refused at once with RESOURCE_EXHAUSTED and a
    RetryInfo; a request cancelled while it waits leaves no trace in the gauges."""
    from google.rpc import error_details_pb2, status_pb2

    running = await own_coordinator("plane-admission", oracle, max_concurrent_sessions=1, max_waiting=1)
    registry = running.coordinator.metrics.registry

    def gauges() -> tuple[float, float]:
        return (
            registry.get_sample_value("specd_num_requests_running"),
            registry.get_sample_value("specd_num_requests_waiting"),
        )

    try:
        async with AsyncSpecdClient(running.address) as client:
            long = client.stream(token_ids=prompt_ids, max_tokens=300, stop_at_eos=False, depth=0)
            await long.__anext__()  # it holds the one slot
            waiting = asyncio.ensure_future(client.generate(token_ids=prompt_ids, max_tokens=2, depth=0))
            for _ in range(100):
                if gauges() == (1.0, 1.0):
                    break
                await asyncio.sleep(0.02)
            assert gauges() == (1.0, 1.0)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(token_ids=prompt_ids, max_tokens=2, depth=0)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in info.value.details()
            details = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
            status = status_pb2.Status.FromString(details)
            retry = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(retry) and retry.retry_delay.ToTimedelta().total_seconds() > 0
            waiting.cancel()  # cancelled while it waits
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for _ in range(100):
                if gauges() == (1.0, 0.0):
                    break
                await asyncio.sleep(0.02)
            assert gauges() == (1.0, 0.0)
            rest = [c async for c in long]
            assert rest[-1].finish_reason == "length"
        for _ in range(100):
            if gauges() == (0.0, 0.0):
                break
            await asyncio.sleep(0.02)
        assert gauges() == (0.0, 0.0)
        # The oracle's recent passes show in the control plane's status (for `specctl status`).
        await running.plane.call("check_all")
        (worker,) = (await running.plane.call("status"))["workers"]
        assert worker["load"]["rows_per_step"] >= 1 and worker["load"]["step_seconds"] > 0
    finally:
        await running.stop()


async def test_a_full_oracle_sends_the_session_to_another(ray_local, tiny_dir, oracle, prompt_ids):
    """An oracle at its max_sessions answers RESOURCE_EXHAUSTED when the session opens; the coordinator tries the
    next oracle, and the request completes there with the oracle's own greedy output. With every oracle full, the
    client gets RESOURCE_EXHAUSTED."""
    from specd.cluster.roles import start_local_worker
    from tests.conftest import greedy_reference, oracle_config

    full = await start_local_worker(oracle_config(tiny_dir, max_sessions=1))
    holder = OracleClient(full.address)
    # Checked rarely, the full oracle still looks empty to the control plane, and its name sorts first.
    running = await own_coordinator("plane-full", full, health_interval_seconds=60.0)
    try:
        await running.plane.call("register", common_pb2.WORKER_ROLE_ORACLE, oracle.address, "oracle-z")
        await holder.open_session("holder", [1, 2, 3], common_pb2.SamplingParams(), 5.0)  # takes its one slot
        async with AsyncSpecdClient(running.address) as client:
            result = await client.generate(token_ids=prompt_ids, max_tokens=12, stop_at_eos=False, depth=0)
            assert result.token_ids == greedy_reference(tiny_dir / "oracle", prompt_ids, 12)
            assert result.stats.oracle_worker == oracle.address
            await running.plane.call("drain", "oracle-z", True)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(token_ids=prompt_ids, max_tokens=4, depth=0)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in info.value.details()
    finally:
        await holder.close_session("holder")
        await holder.close()
        await running.stop()
        await full.stop()


async def test_a_chat_template_that_raises_is_the_request_s_mistake():
    from coordinator.session.generation import TextCodec
    from specd.core.errors import InvalidArgument
    from specd.models.tiny import build_tokenizer
    from specd.v1 import oracle_pb2

    tokenizer = build_tokenizer()
    spec = oracle_pb2.TokenizerSpec(
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        chat_template="{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
        "{% endif %}{{ m.content }}{% endfor %}",
    )
    codec = TextCodec(spec)
    assert codec.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidArgument, match="no tools here"):
        codec.encode_chat([{"role": "tool", "content": "hi"}])


async def test_a_dead_control_plane_is_unavailable_not_internal(ray_local):
    import ray

    from coordinator.config import CoordinatorConfig
    from coordinator.control_plane.client import get_or_create_plane
    from specd.core.errors import Unavailable

    plane = await get_or_create_plane(CoordinatorConfig(plane_name="plane-dead", health_interval_seconds=60.0))
    ray.kill(plane.handle, no_restart=True)
    # The kill takes effect a moment later (longer on a busy machine): a call may still be answered until then.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            await plane.call("status")
        except Unavailable as error:
            assert "control plane" in str(error)
            break
        assert time.monotonic() < deadline, "the killed control plane still answers"
        await asyncio.sleep(0.1)
