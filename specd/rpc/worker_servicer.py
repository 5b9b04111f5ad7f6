"""gRPC side of a worker: the RPCs both workers share.

Servicers translate protobuf to domain calls on a ModelWorker and back. Model work goes through
the worker's engine (specd.runtime.engine), which batches every session's work on the worker's
single model thread. A call cancelled by its client (or by its deadline) while it opens or
advances a session closes that session.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from specd.core import validation
from specd.core.errors import InvalidArgument
from specd.core.memory import resident_mb
from specd.kernels.weights import weights_kernels
from specd.rpc.features import features_to_proto
from specd.rpc.host import grpc_errors
from specd.rpc.metrics import WorkerMetrics
from specd.rpc.settings import WorkerConfig
from specd.runtime.engine import Engine
from specd.runtime.executor import ModelExecutor
from specd.runtime.worker import ModelWorker
from specd.v1 import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    engine_type: type[Engine]

    def __init__(self, worker: ModelWorker, executor: ModelExecutor, config: WorkerConfig):
        self.worker = worker
        self.executor = executor
        self.config = config
        self.metrics = WorkerMetrics("draft" if self.role == common_pb2.WORKER_ROLE_DRAFT else "oracle")
        self.metrics.running.set_function(lambda: len(worker.sessions))
        self.engine = self.engine_type(
            worker, executor, max_batch_rows=config.max_batch_rows, prefill_chunk_tokens=config.prefill_chunk_tokens,
            batching=config.batching, on_step=self.metrics.record_step,
        )
        self.metrics.queued.set_function(lambda: self.engine.queued)
        # ModelInfo.weights: its linear layers per weights kernel
        self.weights = ", ".join(f"{k} {n}" for k, n in weights_kernels(worker.loaded.model).items() if n)

    async def guard_session(self, session_id: str, work: Awaitable[T]) -> T:
        """Await work on a session; if the call is cancelled meanwhile, free the session."""
        try:
            return await work
        except asyncio.CancelledError:
            asyncio.ensure_future(self.executor.run(self.worker.close, session_id))
            raise

    async def open_session(self, session_id: str, prompt: list[int], params: Any, options: dict[str, Any]) -> Any:
        """Open and prefill a session (an OpenResult) through the engine."""
        return await self.guard_session(session_id, self.engine.open(session_id, prompt, params, **options))

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
            feature_layers=self.feature_layers(),
            num_layers=self.num_layers(),
            load=self.load(),
            resident_mb=resident_mb(),
            weights=self.weights,
        )

    def load(self) -> common_pb2.WorkerLoad:
        """ModelInfo.load: how busy the worker's engine is."""
        load = self.engine.load()
        return common_pb2.WorkerLoad(
            queued=load.queued, rows_per_step=load.rows_per_step, step_seconds=load.step_seconds,
            busy_fraction=load.busy_fraction,
        )

    def feature_dim(self) -> int:
        """ModelInfo.feature_dim: what a draft reads (0: tokens alone); oracles override it."""
        return self.worker.loaded.feature_dim

    def feature_layers(self) -> list[int]:
        """ModelInfo.feature_layers: the oracle hidden states a feature draft reads (empty: the final ones)."""
        return list(self.worker.loaded.feature_layers)

    def num_layers(self) -> int:
        """ModelInfo.num_layers: what oracles report (their hidden states 0..N); 0 for drafts."""
        return 0

    @grpc_errors
    async def OpenSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        session_id = session_id_from(request)
        params = sampling_from_proto(request.sampling)
        options = self.open_options(request)
        result = await self.open_session(session_id, list(request.prompt_token_ids), params, options)
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

    async def stop(self) -> None:
        """Stop the engine loop; queued work is dropped."""
        await self.engine.stop()

    async def evict_idle(self) -> None:
        evicted = await self.executor.run(self.worker.evict_idle)
        self.metrics.evicted.inc(len(evicted))
        if evicted:
            log.info("evicted %d idle sessions: %s", len(evicted), ", ".join(evicted))
