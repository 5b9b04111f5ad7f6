"""gRPC side of a worker: the RPCs both workers share, and how a worker process serves.

Servicers translate protobuf to domain calls on a ModelWorker and back; every model call
runs on the worker's single model thread. A call cancelled by its client (or by its
deadline) while it opens or advances a session closes that session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import grpc
import torch

from specd import validation
from specd.config import WorkerConfig
from specd.attention import use_grouped_attention
from specd.cpu_linear import use_cpu_linear
from specd.errors import InvalidArgument
from specd.feature_draft import features_from_bytes, features_to_bytes
from specd.int8_linear import use_int8_linear
from specd.metrics import WorkerMetrics
from specd.models import LoadedModel, load_model
from specd.server import ModelExecutor, ServiceHost, grpc_errors
from specd.v1 import common_pb2
from specd.worker import ModelWorker, PositionFeatures

log = logging.getLogger(__name__)
T = TypeVar("T")
SWEEP_SECONDS = 1.0


def sampling_from_proto(sampling: common_pb2.SamplingParams) -> Any:
    seed = sampling.seed if sampling.HasField("seed") else random.getrandbits(63)
    return validation.sampling_params(sampling.temperature, sampling.top_k, sampling.top_p, seed)


def session_id_from(request: Any) -> str:
    if not request.session_id:
        raise InvalidArgument("session_id is required")
    if len(request.session_id) > 128:
        raise InvalidArgument("session_id is longer than 128 characters")
    return request.session_id


class WorkerServicerMixin:
    """GetInfo, OpenSession and CloseSession, identical for the draft and the oracle."""

    role: int
    open_response: type

    def __init__(self, worker: ModelWorker, executor: ModelExecutor, config: WorkerConfig):
        self.worker = worker
        self.executor = executor
        self.config = config
        self.metrics = WorkerMetrics("draft" if self.role == common_pb2.WORKER_ROLE_DRAFT else "oracle")
        self.metrics.running.set_function(lambda: len(worker.sessions))

    async def run_for_session(self, session_id: str, fn: Callable[..., T], *args: Any) -> T:
        """Run model work; if the call is cancelled meanwhile, free the session."""
        try:
            return await self.executor.run(fn, *args)
        except asyncio.CancelledError:
            asyncio.ensure_future(self.executor.run(self.worker.close, session_id))
            raise

    @grpc_errors
    async def GetInfo(self, request: Any, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        loaded = self.worker.loaded
        return common_pb2.ModelInfo(
            role=self.role,
            model_id=loaded.model_id,
            vocab_size=loaded.vocab_size,
            vocab_fingerprint=loaded.vocab_fingerprint,
            max_context=loaded.max_context,
            max_depth=self.worker.max_depth,
            eos_token_ids=loaded.eos_token_ids,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            active_sessions=len(self.worker.sessions),
            max_sessions=self.worker.sessions.max_sessions,
            feature_dim=self.feature_dim(),
        )

    def feature_dim(self) -> int:
        """ModelInfo.feature_dim: what a draft reads (0: tokens alone); oracles override it."""
        return self.worker.loaded.feature_dim

    @grpc_errors
    async def OpenSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        session_id = session_id_from(request)
        params = sampling_from_proto(request.sampling)
        options = self.open_options(request)
        result = await self.run_for_session(
            session_id, functools.partial(self.worker.open, **options), session_id, list(request.prompt_token_ids),
            params,
        )
        reply = self.open_response(
            prefill_tokens=result.prefill_tokens, prefill_seconds=result.prefill_seconds,
            cached_tokens=result.cached_tokens,
        )
        self.metrics.prompt_tokens.labels("cached").inc(result.cached_tokens)
        self.metrics.prompt_tokens.labels("prefilled").inc(max(0, result.prefill_tokens - 1 - result.cached_tokens))
        if result.features is not None:
            reply.features.CopyFrom(features_to_proto(result.features))
        return reply

    def open_options(self, request: Any) -> dict[str, Any]:
        """Role-specific keyword arguments of worker.open, read from the open request."""
        return {}

    @grpc_errors
    async def CloseSession(self, request: Any, context: grpc.aio.ServicerContext) -> common_pb2.CloseSessionResponse:
        existed = await self.executor.run(self.worker.close, session_id_from(request))
        return common_pb2.CloseSessionResponse(existed=existed)

    async def evict_idle(self) -> None:
        evicted = await self.executor.run(self.worker.evict_idle)
        self.metrics.evicted.inc(len(evicted))
        if evicted:
            log.info("evicted %d idle sessions: %s", len(evicted), ", ".join(evicted))


def load_for(config: WorkerConfig, *, int8: bool = False) -> LoadedModel:
    """Load a worker's model and set up its CPU layers. `int8`: a draft's large linear layers in
    int8 (specd.int8_linear; never for an oracle, whose arithmetic is what it writes)."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    loaded = load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        layers=config.layers,
        max_context=config.max_context,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
    )
    if int8 and loaded.device.type == "cpu":
        use_int8_linear(loaded.model)
    use_cpu_linear(loaded.model, config.cpu_linear)
    if config.grouped_attention:
        use_grouped_attention(loaded.model)
    return loaded


async def serve_worker(
    config: WorkerConfig, on_ready: Callable[[ServiceHost], Awaitable[None] | None] | None = None
) -> None:
    """Serve one worker until SIGTERM/SIGINT, then shut down gracefully."""
    from specd.local import start_worker

    worker = await start_worker(config)
    worker.host.install_signal_handlers()
    if on_ready is not None:
        maybe = on_ready(worker.host)
        if maybe is not None:
            await maybe
    await worker.host.wait()


def features_to_proto(features: PositionFeatures) -> common_pb2.Features:
    rows = features.rows
    return common_pb2.Features(
        start=features.start, rows=rows.shape[0], dim=rows.shape[1], data=features_to_bytes(rows)
    )


def features_from_proto(message: common_pb2.Features) -> PositionFeatures | None:
    """None when the message is empty (a standalone draft's calls carry no features)."""
    if not message.dim:
        return None
    if message.start < 0:
        raise InvalidArgument(f"features start at a negative position ({message.start})")
    return PositionFeatures(message.start, features_from_bytes(message.data, message.rows, message.dim))
