"""A small Python client for the specd Generation API, sync and asyncio.

    from specd.client import SpecdClient
    with SpecdClient("127.0.0.1:50050") as client:
        result = client.generate("Write a haiku", max_tokens=32)
        print(result.text, result.stats.acceptance_rate)
        for chunk in client.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")

Other languages use the protos in protos/specd/v1 directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from specd.rpc.security import Security
from specd.v1 import common_pb2, generation_pb2, generation_pb2_grpc

FINISH_NAMES = {
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_EOS: "eos",
    generation_pb2.FINISH_REASON_STOP: "stop",
}


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: generation_pb2.SpeculationStats
    request_id: str = ""  # the client's, or the one the coordinator generated


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: generation_pb2.SpeculationStats | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_id: str = ""


def build_request(
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    token_ids: list[int] | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    depth: int | None = None,
    stop_at_eos: bool = True,
    request_id: str = "",
) -> generation_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    request = generation_pb2.GenerateRequest(
        sampling=sampling, max_tokens=max_tokens, stop=stop or [], request_id=request_id, stop_at_eos=stop_at_eos
    )
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.chat.messages.extend(generation_pb2.ChatMessage(**m) for m in messages)
    else:
        request.token_ids.ids.extend(token_ids or [])
    if depth is not None:
        request.depth = depth
    return request


def _result(reply: generation_pb2.GenerateResponse) -> Result:
    return Result(
        text=reply.text,
        token_ids=list(reply.token_ids),
        finish_reason=FINISH_NAMES.get(reply.finish_reason, "unknown"),
        prompt_tokens=reply.usage.prompt_tokens,
        completion_tokens=reply.usage.completion_tokens,
        stats=reply.stats,
        request_id=reply.request_id,
    )


def _chunk(message: generation_pb2.GenerateStreamResponse) -> Chunk:
    final = message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return Chunk(
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=FINISH_NAMES.get(message.finish_reason) if final else None,
        stats=message.stats if final else None,
        prompt_tokens=message.usage.prompt_tokens,
        completion_tokens=message.usage.completion_tokens,
        request_id=message.request_id,
    )


class SpecdClient:
    """Blocking client. Token and TLS settings come from the environment (specd.rpc.security)
    unless a Security is given."""

    def __init__(self, address: str, timeout: float | None = None, security: Security | None = None):
        security = security or Security.from_env()
        self.channel = security.channel(address)
        self.metadata = security.call_metadata()
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.timeout = timeout

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Result:
        request = build_request(prompt, **kwargs)
        return _result(self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[Chunk]:
        request = build_request(prompt, **kwargs)
        for message in self.stub.GenerateStream(request, timeout=timeout or self.timeout, metadata=self.metadata):
            yield _chunk(message)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SpecdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSpecdClient:
    """asyncio client; same settings as SpecdClient."""

    def __init__(self, address: str, timeout: float | None = None, security: Security | None = None):
        security = security or Security.from_env()
        self.channel = security.aio_channel(address)
        self.metadata = security.call_metadata()
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.timeout = timeout

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Result:
        request = build_request(prompt, **kwargs)
        return _result(await self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata))

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> AsyncIterator[Chunk]:
        request = build_request(prompt, **kwargs)
        call = self.stub.GenerateStream(request, timeout=timeout or self.timeout, metadata=self.metadata)
        async for message in call:
            yield _chunk(message)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSpecdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
