"""The OpenAI-compatible HTTP API, served by the coordinator beside gRPC (`--http-port`).

    GET  /v1/models             the models of the healthy oracles
    POST /v1/completions        a text prompt
    POST /v1/chat/completions   chat messages, through the oracle's chat template
    GET  /health                200 while an oracle is healthy, 503 otherwise
    GET  /metrics               the coordinator's Prometheus metrics

Requests take OpenAI's fields: `max_tokens` (chat: also `max_completion_tokens`), `temperature`,
`top_p`, `stop`, `seed`, `n` (1 only), `stream` with `stream_options.include_usage`, and as vLLM
takes them `top_k`, `cache_salt` (the prefix cache's partition within the tenant) and `return_token_ids` (each choice, and each streamed chunk, also carries its
token ids; a completion's prompt may also be a list of token ids). `speculation_depth` fixes the
depth k as the gRPC API's `depth` does (0: the oracle alone; absent: the depth policy chooses). Replies carry `usage`, `finish_reason` and, as vLLM reports them, the request's
speculation figures in `metrics.speculative_decoding`. Streams are server-sent events, one
`data: {...}` chunk per round's text and `data: [DONE]` at the end; an error during a stream
arrives as a `data: {"error": ...}` event before the end.

It runs on Starlette and uvicorn in the coordinator's process and event loop, and calls the
same generation path as the gRPC API (`Coordinator.generate`): one implementation of sampling,
stop strings, chat templates, admission and statistics. Errors come in OpenAI's JSON shape:
400 for a bad value, 401 for a missing or wrong token (the client token of the gRPC API, as
`Authorization: Bearer`), 404 for an unknown model, 429 with `Retry-After` when the
coordinator's queue is full, 503 when no worker can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator.control_plane.client import PlaneClient
from coordinator.service import Coordinator
from coordinator.session.generation import Delta, GenerationRequest
from coordinator.session.loop import Finish
from specd.core.errors import SpecdError
from specd.rpc.security import CLIENT, DEFAULT_TENANT, Credentials, bearer
from specd.v1 import common_pb2

log = logging.getLogger(__name__)

FINISH = {Finish.LENGTH: "length", Finish.EOS: "stop", Finish.STOP: "stop"}
_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
# OpenAI fields specd does not offer: a request that sets one gets a 400 rather than a silent difference.
_UNSUPPORTED = ("echo", "suffix", "logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's for /v1/completions
MODELS_CACHE_SECONDS = 1.0


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def http_error(error: BaseException) -> HttpError:
    """The HTTP form of whatever a request failed with."""
    if isinstance(error, HttpError):
        return error
    if isinstance(error, SpecdError):
        status = _STATUS.get(error.code, 500)
        headers = {}
        if error.retry_after_seconds is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_seconds)))
        kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status, "server_error")
        return HttpError(status, str(error), kind, headers=headers)
    if isinstance(error, grpc.aio.AioRpcError):
        status = 429 if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else 503
        return HttpError(status, f"worker call failed: {error.code().name}: {error.details()}", "server_error")
    if isinstance(error, asyncio.TimeoutError):
        return HttpError(504, "the request's deadline passed", "server_error")
    log.exception("HTTP request failed", exc_info=error)
    return HttpError(500, f"internal error: {type(error).__name__}", "server_error")


def _speculation(delta: Delta) -> dict[str, Any]:
    """vLLM's names for a request's speculation figures."""
    stats = delta.stats
    if stats is None:
        return {}
    return {"speculative_decoding": {
        "acceptance_rate": stats.acceptance_rate,
        "mean_acceptance_length": stats.mean_acceptance_length,
        "num_drafts": stats.rounds_with_draft,
        "num_draft_tokens": stats.drafted,
        "num_accepted_tokens": stats.accepted,
        "depth_per_round": list(stats.depth_per_round),
        "migrations": stats.migrations,
    }}


def _usage(delta: Delta) -> dict[str, int]:
    return {
        "prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens,
        "total_tokens": delta.prompt_tokens + delta.completion_tokens,
    }


class _Fields:
    """A request body's fields, checked as they are read."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        self.body = body

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise HttpError(400, f"{name} must be a number", param=name)
        if not isinstance(value, kind):
            raise HttpError(400, f"{name} has the wrong type ({type(value).__name__})", param=name)
        return value

    def stop(self) -> list[str]:
        stop = self.body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            return list(stop)
        raise HttpError(400, "stop must be a string or a list of strings", param="stop")


class HttpApi:
    def __init__(self, coordinator: Coordinator, plane: PlaneClient, credentials: Credentials | None = None):
        self.coordinator = coordinator
        self.plane = plane
        self.credentials = credentials or Credentials()
        self._models: tuple[float, list[str]] = (0.0, [])
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # -- serving ------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0 picks a free port) in this event loop; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = _InLoopServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- endpoints ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> str:
        """The caller's tenant; 401 without a token anyone issued, 403 with another role's."""
        if not self.credentials.enabled:
            return DEFAULT_TENANT
        token = bearer([("authorization", request.headers.get("authorization", ""))])
        found = self.credentials.identify(token) if token else None
        if found is None:
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer ...)", "authentication_error")
        roles, tenant = found
        if CLIENT not in roles:
            raise HttpError(403, "this API needs the client credential", "permission_error")
        return tenant

    async def _model_ids(self) -> list[str]:
        fetched, ids = self._models
        if time.monotonic() - fetched > MODELS_CACHE_SECONDS:
            workers = (await self.plane.call("status"))["workers"]
            ids = sorted({w["model_id"] for w in workers
                          if w["role"] == common_pb2.WORKER_ROLE_ORACLE and w["healthy"] and w["model_id"]})
            self._models = (time.monotonic(), ids)
        return ids

    async def _check_model(self, fields: _Fields) -> str:
        ids = await self._model_ids()
        model = fields.get("model", str, "")
        if not ids:
            raise HttpError(503, "no healthy oracle worker is available", "server_error")
        if model and model not in ids:
            raise HttpError(404, f"the model {model!r} does not exist here (models: {', '.join(ids)})",
                            "not_found_error", "model")
        return model or ids[0]

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            ids = await self._model_ids()
        except Exception as error:
            return http_error(error).response()
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": now, "owned_by": "specd"} for model_id in ids
        ]})

    async def health(self, request: Request) -> Response:
        try:
            ids = await self._model_ids()
        except Exception as error:
            return http_error(error).response()
        return JSONResponse({"status": "ok" if ids else "no healthy oracle"}, status_code=200 if ids else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.coordinator.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        try:
            tenant = self._authorize(request)
            try:
                body = await request.json()
            except ValueError:
                raise HttpError(400, "the request body is not valid JSON") from None
            fields = _Fields(body)
            model = await self._check_model(fields)
            generation = self._generation(fields, chat)
            generation.tenant = tenant
            generation.cache_salt = fields.get("cache_salt", str, "")
            stream = fields.get("stream", bool, False)
            include_usage = bool(fields.get("stream_options", dict, {}).get("include_usage", False))
            token_ids = fields.get("return_token_ids", bool, False)
            depth = fields.get("speculation_depth", int)
        except Exception as error:
            return http_error(error).response()
        kind = "chatcmpl" if chat else "cmpl"
        reply = _Reply(f"{kind}-{uuid.uuid4().hex}", model, chat, token_ids)
        generation.request_id = reply.id
        deltas = self.coordinator.generate(generation, depth)
        try:
            # Up to the first round, a failure (a bad value, a full queue, no worker) still gets its HTTP status.
            first = await anext(deltas)
        except Exception as error:
            await deltas.aclose()
            return http_error(error).response()
        if stream:
            return StreamingResponse(
                self._stream(first, deltas, reply, include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            text, ids, final = [first.text], list(first.token_ids), first
            async for delta in deltas:
                text.append(delta.text)
                ids += delta.token_ids
                final = delta
        except Exception as error:
            return http_error(error).response()
        finally:
            await deltas.aclose()
        return JSONResponse(reply.whole("".join(text), ids, final))

    def _generation(self, fields: _Fields, chat: bool) -> GenerationRequest:
        for name in _UNSUPPORTED:
            if fields.body.get(name) not in (None, False, [], {}, 0, ""):
                raise HttpError(400, f"{name} is not supported by this server", param=name)
        if fields.get("n", int, 1) != 1:
            raise HttpError(400, "n must be 1: this server writes one completion per request", param="n")
        if fields.get("best_of", int, 1) != 1:
            raise HttpError(400, "best_of must be 1", param="best_of")
        sampling = common_pb2.SamplingParams(
            temperature=float(fields.get("temperature", (int, float), 1.0)),
            top_p=float(fields.get("top_p", (int, float), 1.0)),
            top_k=max(0, int(fields.get("top_k", int, 0))),
        )
        seed = fields.get("seed", int)
        if seed is not None:
            if not 0 <= seed < 2**63:
                raise HttpError(400, "seed must be in [0, 2^63)", param="seed")
            sampling.seed = seed
        limit = self.coordinator.config.max_tokens_limit
        if chat:
            max_tokens = fields.get("max_completion_tokens", int) or fields.get("max_tokens", int) or limit
            return GenerationRequest(
                chat=_messages(fields.body.get("messages")), sampling=sampling, max_tokens=max_tokens, stop=fields.stop(),
            )
        prompt = fields.body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        max_tokens = fields.get("max_tokens", int, COMPLETION_DEFAULT_MAX_TOKENS)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return GenerationRequest(token_ids=list(prompt), sampling=sampling, max_tokens=max_tokens, stop=fields.stop())
        if not isinstance(prompt, str):
            raise HttpError(400, "prompt must be a string (or one string, or a list of token ids)", param="prompt")
        return GenerationRequest(text=prompt, sampling=sampling, max_tokens=max_tokens, stop=fields.stop())

    async def _stream(
        self, first: Delta, deltas: AsyncIterator[Delta], reply: _Reply, include_usage: bool
    ) -> AsyncIterator[str]:
        async def all_deltas() -> AsyncIterator[Delta]:
            yield first
            async for delta in deltas:
                yield delta

        try:
            if reply.chat:
                yield _event(reply.chunk({"role": "assistant", "content": ""}))
            async for delta in all_deltas():
                if delta.text or delta.token_ids or delta.finish is not None:
                    yield _event(reply.chunk_of(delta))
                if delta.finish is not None and include_usage:
                    yield _event(reply.usage_chunk(delta))
        except Exception as error:  # the status is sent already: the error goes in the stream
            yield _event(http_error(error).body())
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"


class _Reply:
    """The JSON of one request's reply, whole or in chunks."""

    def __init__(self, reply_id: str, model: str, chat: bool, token_ids: bool = False):
        self.id, self.model, self.chat, self.token_ids = reply_id, model, chat, token_ids
        self.created = int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, ids: list[int], final: Delta) -> dict[str, Any]:
        assert final.finish is not None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": FINISH[final.finish],
                      "logprobs": None}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "finish_reason": FINISH[final.finish], "logprobs": None}
            head = self._head("text_completion")
        if self.token_ids:
            choice["token_ids"] = ids
        return {**head, "choices": [choice], "usage": _usage(final), "metrics": _speculation(final)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def chunk_of(self, delta: Delta) -> dict[str, Any]:
        finish = FINISH[delta.finish] if delta.finish is not None else None
        out = self.chunk({"content": delta.text} if delta.text or not self.chat else {}, finish)
        if self.token_ids:
            out["choices"][0]["token_ids"] = list(delta.token_ids)
        if delta.finish is not None:
            out["metrics"] = _speculation(delta)
        return out

    def usage_chunk(self, final: Delta) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": _usage(final)}


def _messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as role and text; content given as parts keeps its text parts."""
    if not isinstance(raw, list) or not raw:
        raise HttpError(400, "messages must be a non-empty list", param="messages")
    out = []
    for message in raw:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, "every message needs a role and content", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise HttpError(400, "only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise HttpError(400, "message content must be a string or a list of text parts", param="messages")
        out.append({"role": message["role"], "content": content})
    return out


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _InLoopServer(uvicorn.Server):
    """uvicorn in the coordinator's event loop: the coordinator handles the process's signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
