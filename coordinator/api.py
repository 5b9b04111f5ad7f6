"""specd.v1.GenerationService and specd.v1.AdminService: protobuf in, Coordinator calls, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from coordinator.control_plane.client import PlaneClient
from coordinator.service import Coordinator
from coordinator.session.generation import Delta, GenerationRequest
from coordinator.session.loop import DEFAULT_MIGRATION_LIMIT, Finish
from specd.core.errors import InvalidArgument, SpecdError
from specd.rpc.host import abort_with_error, grpc_errors
from specd.rpc.security import Credentials
from specd.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)
GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
FINISH = {
    Finish.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    Finish.EOS: generation_pb2.FINISH_REASON_EOS,
    Finish.STOP: generation_pb2.FINISH_REASON_STOP,
}
# Worker statuses that describe the request itself; anything else means a worker is unavailable.
_PASS_THROUGH = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# A worker refusing a call the coordinator built from a request it had already checked: the coordinator's fault,
# not the client's.
_WORKER_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}


def request_from_proto(
    message: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext, credentials: Credentials
) -> GenerationRequest:
    kind = message.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("the request has no prompt: set text, chat or token_ids")
    remaining = context.time_remaining()
    return GenerationRequest(
        text=message.text if kind == "text" else None,
        chat=[{"role": m.role, "content": m.content} for m in message.chat.messages] if kind == "chat" else None,
        token_ids=list(message.token_ids.ids) if kind == "token_ids" else None,
        sampling=message.sampling,
        max_tokens=message.max_tokens,
        stop=list(message.stop),
        stop_at_eos=message.stop_at_eos if message.HasField("stop_at_eos") else True,
        migration_limit=message.migration_limit if message.HasField("migration_limit") else DEFAULT_MIGRATION_LIMIT,
        tenant=credentials.tenant_of(context.invocation_metadata(), context.auth_context()),
        cache_salt=message.cache_salt,
        deadline=time.monotonic() + remaining if remaining is not None else None,
        request_id=message.request_id or uuid.uuid4().hex,
    )


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Translate any failure of a request into a status a person understands."""
    if isinstance(error, SpecdError):
        await abort_with_error(context, error)
    if isinstance(error, grpc.aio.AioRpcError):
        if error.code() in _WORKER_REFUSALS:
            log.error("a worker refused a call: %s %s", error.code().name, error.details())
            await context.abort(
                grpc.StatusCode.INTERNAL, f"a worker refused the coordinator's call: {error.code().name}: {error.details()}"
            )
        code = error.code() if error.code() in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE
        await context.abort(code, f"worker call failed: {error.code().name}: {error.details()}")
    if isinstance(error, asyncio.TimeoutError):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    log.exception("request failed", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


def stats_fields(delta: Delta) -> dict[str, Any]:
    if delta.finish is None:
        return {}
    return {
        "finish_reason": FINISH[delta.finish],
        "usage": generation_pb2.Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens),
        "stats": delta.stats.to_proto() if delta.stats else None,
    }


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, coordinator: Coordinator, credentials: Credentials | None = None):
        self.coordinator = coordinator
        self.credentials = credentials or Credentials()

    async def Generate(self, message: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        text, ids, final, request = [], [], None, None
        try:
            request = request_from_proto(message, context, self.credentials)
            depth = message.depth if message.HasField("depth") else None
            async for delta in self.coordinator.generate(request, depth):
                text.append(delta.text)
                ids.extend(delta.token_ids)
                final = delta
        except Exception as error:
            self.coordinator.metrics.failures.labels(_code_name(error)).inc()
            await abort_with(context, error)
        assert final is not None and request is not None
        return generation_pb2.GenerateResponse(
            request_id=request.request_id, text="".join(text), token_ids=ids, **stats_fields(final)
        )

    async def GenerateStream(
        self, message: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        try:
            request = request_from_proto(message, context, self.credentials)
            depth = message.depth if message.HasField("depth") else None
            async for delta in self.coordinator.generate(request, depth):
                yield generation_pb2.GenerateStreamResponse(
                    request_id=request.request_id, text=delta.text, token_ids=delta.token_ids, **stats_fields(delta)
                )
        except Exception as error:
            self.coordinator.metrics.failures.labels(_code_name(error)).inc()
            await abort_with(context, error)


def _code_name(error: BaseException) -> str:
    if isinstance(error, SpecdError):
        return error.code
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    return type(error).__name__


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, plane: PlaneClient, ray_address: str = ""):
        self.plane = plane
        self.ray_address = ray_address

    @grpc_errors
    async def GetStatus(self, request, context) -> admin_pb2.ClusterStatus:
        status = await self.plane.call("status")
        return admin_pb2.ClusterStatus(
            workers=[admin_pb2.WorkerStatus(**w) for w in status["workers"]],
            pairs=[admin_pb2.PairStatus(**p) for p in status["pairs"]],
            ray_address=self.ray_address,
            active_sessions=status["active_sessions"],
            default_depth_policy=status["default_depth_policy"],
        )

    @grpc_errors
    async def ListSessions(self, request, context) -> admin_pb2.SessionList:
        sessions = await self.plane.call("list_sessions")
        return admin_pb2.SessionList(sessions=[admin_pb2.SessionInfo(**s) for s in sessions])

    async def _policies(self, pair_id: str) -> admin_pb2.DepthPolicies:
        policies = await self.plane.call("get_policies", pair_id)
        return admin_pb2.DepthPolicies(
            default_policy=policies["default_policy"],
            pairs=[admin_pb2.DepthPolicyEntry(**p) for p in policies["pairs"]],
        )

    @grpc_errors
    async def GetDepthPolicy(self, request, context) -> admin_pb2.DepthPolicies:
        return await self._policies(request.pair_id)

    @grpc_errors
    async def SetDepthPolicy(self, request, context) -> admin_pb2.DepthPolicies:
        if not request.policy:
            raise InvalidArgument("policy is required, e.g. goodput, heuristic or fixed:4")
        await self.plane.call("set_policy", request.pair_id, request.policy)
        return await self._policies(request.pair_id)

    @grpc_errors
    async def Drain(self, request, context) -> admin_pb2.WorkerStatus:
        return admin_pb2.WorkerStatus(**await self.plane.call("drain", request.worker, True, request.migrate))

    @grpc_errors
    async def Undrain(self, request, context) -> admin_pb2.WorkerStatus:
        return admin_pb2.WorkerStatus(**await self.plane.call("drain", request.worker, False))

    @grpc_errors
    async def GetStats(self, request, context) -> admin_pb2.PairStatsList:
        pairs = await self.plane.call("get_stats")
        out = []
        for p in pairs:
            history = [admin_pb2.DepthSample(**h) for h in p.pop("depth_history")]
            out.append(admin_pb2.PairStats(depth_history=history, **p))
        return admin_pb2.PairStatsList(pairs=out)

    @grpc_errors
    async def RegisterWorker(self, request, context) -> admin_pb2.WorkerStatus:
        if request.role == common_pb2.WORKER_ROLE_UNSPECIFIED:
            raise InvalidArgument("role is required (draft or oracle)")
        return admin_pb2.WorkerStatus(**await self.plane.call("register", request.role, request.address, request.name))

    @grpc_errors
    async def DeregisterWorker(self, request, context) -> admin_pb2.WorkerStatus:
        return admin_pb2.WorkerStatus(**await self.plane.call("deregister", request.worker))
