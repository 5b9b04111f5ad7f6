"""specd.v1.OracleService: protobuf in, Verifier calls, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from oracle_service.config import OracleConfig
from specd.core.errors import SpecdError
from specd.rpc.features import features_to_proto
from specd.rpc.host import abort_with_error, grpc_errors
from specd.rpc.worker_servicer import WorkerServicerMixin, session_id_from
from specd.runtime.engine import OracleEngine
from specd.runtime.executor import ModelExecutor
from specd.runtime.verifier import Verifier, VerifyResult
from specd.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc

SERVICE_NAME = oracle_pb2.DESCRIPTOR.services_by_name["OracleService"].full_name


class OracleServicer(WorkerServicerMixin, oracle_pb2_grpc.OracleServiceServicer):
    role = common_pb2.WORKER_ROLE_ORACLE
    open_response = oracle_pb2.OpenOracleSessionResponse
    engine_type = OracleEngine
    worker: Verifier
    engine: OracleEngine

    def __init__(self, verifier: Verifier, executor: ModelExecutor, config: OracleConfig):
        super().__init__(verifier, executor, config)

    @grpc_errors
    async def GetTokenizer(
        self, request: oracle_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> oracle_pb2.TokenizerSpec:
        tokenizer = self.worker.loaded.tokenizer
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        return oracle_pb2.TokenizerSpec(
            tokenizer_json=tokenizer.backend_tokenizer.to_str(),
            chat_template=template or "",
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
            pad_token=tokenizer.pad_token or "",
            vocab_fingerprint=self.worker.loaded.vocab_fingerprint,
        )

    def feature_dim(self) -> int:
        """The width of each hidden state this oracle returns to feature drafts."""
        return int(self.worker.loaded.model.config.hidden_size)

    def num_layers(self) -> int:
        """Its decoder layers N: feature drafts may read its hidden states 0..N."""
        return self.worker.num_layers

    def open_options(self, request: oracle_pb2.OpenOracleSessionRequest) -> dict:
        return {
            "return_features": request.return_features, "cache_namespace": request.cache_namespace,
            "feature_layers": tuple(request.feature_layers),
        }

    @grpc_errors
    async def Verify(self, request: oracle_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> oracle_pb2.Verdict:
        session_id = session_id_from(request)
        result = await self.guard_session(
            session_id,
            self.engine.verify(
                session_id,
                list(request.draft_token_ids),
                [(list(d.token_ids), list(d.probs)) for d in request.draft_distributions],
                request.committed_length,
                list(request.draft_parents),
            ),
        )
        return self._verdict(result)

    async def Decode(
        self, request: oracle_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oracle_pb2.Verdict]:
        try:
            session_id = session_id_from(request)
            run = self.engine.decode(
                session_id, request.committed_length, request.max_tokens, list(request.stop_token_ids)
            )
            try:
                async for result in run:
                    yield self._verdict(result)
            except asyncio.CancelledError:  # the caller is gone: as for Verify, its session goes
                asyncio.ensure_future(self.executor.run(self.worker.close, session_id))
                raise
            finally:
                await run.aclose()
        except SpecdError as error:
            await abort_with_error(context, error)

    def _verdict(self, result: VerifyResult) -> oracle_pb2.Verdict:
        self.metrics.forward.labels("verify").observe(result.seconds)
        assert self.metrics.spec is not None
        self.metrics.spec.record(result.k, result.verdict.accepted)
        reply = oracle_pb2.Verdict(
            accepted=result.verdict.accepted,
            next_token_id=result.verdict.next_token,
            bonus=result.verdict.is_bonus(result.k),
            committed_length=result.committed_length,
            verify_seconds=result.seconds,
            accepted_path=result.path or [],
            step_sessions=result.step_sessions,
            row_seconds=result.row_seconds,
        )
        if result.features is not None:
            reply.features.CopyFrom(features_to_proto(result.features))
        return reply
