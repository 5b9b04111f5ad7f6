"""The OpenAI-compatible HTTP API on a loopback coordinator, with the official `openai` client (sync, async,
streaming) and at the HTTP level (server-sent events, usage, each error status)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.http_api import HttpApi
from coordinator.server import start_coordinator
from specd.client import AsyncSpecdClient
from specd.rpc.security import Credentials

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something about foxes."}]


@pytest.fixture(scope="module")
async def served(ray_local, oracle, same_draft):
    config = CoordinatorConfig(
        port=0, metrics_port=-1, http_port=0, plane_name="plane-http", oracles=[oracle.address],
        drafts=[same_draft.address], health_interval_seconds=0.5,
    )
    running = await start_coordinator(config)
    yield running
    await running.stop()


def base_url(running) -> str:
    return f"http://127.0.0.1:{running.http_port}/v1"


async def model_id(running) -> str:
    async with httpx.AsyncClient() as http:
        listed = (await http.get(f"{base_url(running)}/models")).json()
    assert listed["object"] == "list" and listed["data"][0]["object"] == "model"
    return listed["data"][0]["id"]


async def test_completions_with_the_sync_client_match_the_grpc_api(served):
    model = await model_id(served)
    async with AsyncSpecdClient(served.address) as grpc_client:
        expected = await grpc_client.generate(PROMPT, max_tokens=12, temperature=0.0)

    def call():
        client = openai.OpenAI(base_url=base_url(served), api_key="unused")
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)

    reply = await asyncio.to_thread(call)  # the server runs in this event loop: the sync client gets a thread
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    figures = reply.model_extra["metrics"]["speculative_decoding"]
    assert figures["num_draft_tokens"] >= figures["num_accepted_tokens"] >= 0 and figures["depth_per_round"]


async def test_chat_with_the_async_client_and_streaming_match_the_grpc_api(served):
    model = await model_id(served)
    async with AsyncSpecdClient(served.address) as grpc_client:
        expected = await grpc_client.generate(messages=MESSAGES, max_tokens=16, temperature=0.0)
    client = openai.AsyncOpenAI(base_url=base_url(served), api_key="unused")
    whole = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == expected.text and finish in ("length", "stop")
    assert usage is not None and usage.completion_tokens == expected.completion_tokens
    await client.close()


async def test_a_seeded_sampled_request_repeats(served):
    model = await model_id(served)
    client = openai.AsyncOpenAI(base_url=base_url(served), api_key="unused")
    runs = [
        await client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=42)
        for _ in range(2)
    ]
    assert runs[0].choices[0].text == runs[1].choices[0].text
    await client.close()


async def test_server_sent_events_framing(served):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient() as http, http.stream("POST", f"{base_url(served)}/completions", json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        raw = (await reply.aread()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")


async def test_errors_have_openai_s_shape_and_status(served, oracle):
    url = base_url(served)
    async with httpx.AsyncClient() as http:
        for body, status, fragment in [
            ({"prompt": PROMPT, "n": 2}, 400, "n must be 1"),
            ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
            ({"prompt": PROMPT, "max_tokens": 10**7}, 400, "max_tokens"),
            ({"prompt": PROMPT, "logprobs": 3}, 400, "logprobs"),
            ({"prompt": 5}, 400, "prompt"),
            ({"prompt": PROMPT, "model": "no-such-model"}, 404, "does not exist"),
        ]:
            reply = await http.post(f"{url}/completions", json=body)
            assert reply.status_code == status, (body, reply.text)
            error = reply.json()["error"]
            assert fragment in error["message"] and error["type"]
        reply = await http.post(f"{url}/chat/completions", content=b"{not json")
        assert reply.status_code == 400
        assert (await http.get(f"http://127.0.0.1:{served.http_port}/health")).status_code == 200
        metrics = await http.get(f"http://127.0.0.1:{served.http_port}/metrics")
        assert "specd_request_success_total" in metrics.text or "specd_" in metrics.text
    with pytest.raises(openai.NotFoundError):
        await openai.AsyncOpenAI(base_url=url, api_key="x").completions.create(model="nope", prompt="hi")


async def test_a_wrong_or_missing_token_is_401(served):
    api = HttpApi(served.coordinator, served.plane, Credentials(clients={"s3cret": "team-a"}, admin="adm"))
    port = await api.start("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/models")).status_code == 401
            wrong = await http.get(f"{url}/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
            assert (await http.get(f"{url}/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
            admin = await http.post(f"{url}/completions", json={"prompt": PROMPT}, headers={"Authorization": "Bearer adm"})
            assert admin.status_code == 403 and admin.json()["error"]["type"] == "permission_error"
        client = openai.AsyncOpenAI(base_url=url, api_key="s3cret")
        reply = await client.completions.create(model=await model_id(served), prompt=PROMPT, max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=url, api_key="wrong").completions.create(model="m", prompt="hi")
    finally:
        await api.stop()


async def test_a_full_queue_is_429_with_retry_after_and_no_oracle_is_503(ray_local, oracle, tiny_dir):
    from specd.cluster.roles import start_local_worker
    from tests.conftest import oracle_config

    lone = await start_local_worker(oracle_config(tiny_dir))
    config = CoordinatorConfig(
        port=0, metrics_port=-1, http_port=0, plane_name="plane-http-full", oracles=[lone.address],
        health_interval_seconds=0.2, max_concurrent_sessions=1, max_waiting=0,
    )
    running = await start_coordinator(config)
    url = f"http://127.0.0.1:{running.http_port}/v1"
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            long = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
            async with http.stream("POST", f"{url}/completions", json=long) as holding:
                assert holding.status_code == 200
                full = await http.post(f"{url}/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
                assert full.json()["error"]["type"] == "rate_limit_error"
                await lone.stop()  # the only oracle goes away mid-stream: the stream ends with an error event
                raw = (await holding.aread()).decode()
            events = [e for e in raw.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
            for _ in range(50):
                health = await http.get(f"http://127.0.0.1:{running.http_port}/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.2)
            assert health.status_code == 503
            await asyncio.sleep(MODELS_WAIT)
            gone = await http.post(f"{url}/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert gone.status_code == 503
    finally:
        await running.stop()


MODELS_WAIT = 1.1  # the API's model list is cached for a second


def test_specd_generate_names_the_coordinator_it_uses(monkeypatch, capsys):
    from specd.cli.generate import find_coordinator

    monkeypatch.delenv("SPECD_ADDRESS", raising=False)
    assert find_coordinator("10.0.0.1:1") == "10.0.0.1:1"
    monkeypatch.setenv("SPECD_ADDRESS", "10.0.0.2:2")
    assert find_coordinator(None) == "10.0.0.2:2"
    monkeypatch.delenv("SPECD_ADDRESS")
    import socket

    probe = socket.socket()
    if probe.connect_ex(("127.0.0.1", 50050)) == 0:
        pytest.skip("something listens on 127.0.0.1:50050 here")
    assert find_coordinator(None) is None
    assert "no coordinator answers at 127.0.0.1:50050" in capsys.readouterr().err


async def test_specd_generate_uses_the_coordinator_in_specd_address(served):
    import os
    import sys

    env = dict(os.environ, SPECD_ADDRESS=served.address)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specd.cli", "generate", "--raw", "--max-tokens", "4", "--json", PROMPT,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-2000:]
    reply = json.loads(out)
    assert reply["usage"]["completion_tokens"] >= 1 and reply["stats"]["oracle_worker"]
