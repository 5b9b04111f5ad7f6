"""Clients for the draft and oracle workers, translating domain values to protobuf and back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from specd.core.stopping import StopRule
from specd.rpc.host import channel_options
from specd.rpc.security import WORKER, Security
from specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc, oracle_pb2, oracle_pb2_grpc


@dataclass(frozen=True)
class TimedProposal:
    tokens: list[int]
    distributions: list[common_pb2.TokenDistribution]
    compute_seconds: float
    wall_seconds: float
    lookup_positions: list[int] = field(default_factory=list)
    lookup_lengths: list[int] = field(default_factory=list)  # per looked-up position (Proposal.lookup_lengths)
    confidences: list[float] = field(default_factory=list)  # the draft's, per token (Proposal.confidences)
    model_steps: int = 0  # positions the draft's model computed (Proposal.model_steps)
    parents: list[int] = field(default_factory=list)  # a draft tree's (Proposal.parents); empty: a chain


@dataclass(frozen=True)
class TimedVerdict:
    accepted: int
    next_token: int
    committed_length: int
    compute_seconds: float
    wall_seconds: float
    features: common_pb2.Features | None = None  # sessions opened with return_features
    path: list[int] = field(default_factory=list)  # a draft tree's accepted tokens (Verdict.accepted_path)
    step_sessions: int = 1  # Verdict.step_sessions: the load the round met
    row_seconds: float = 0.0  # Verdict.row_seconds


@dataclass(frozen=True)
class FeatureReads:
    """What a draft reads of its oracle."""

    dim: int  # the width of each oracle hidden state it reads (0: a standalone draft, tokens alone)
    layers: list[int]  # the hidden states it reads (ModelInfo.feature_layers); empty: the final ones


def join_features(parts: list[common_pb2.Features]) -> common_pb2.Features | None:
    """Consecutive feature blocks (as verdicts return them) as one block; None when there are none."""
    parts = [part for part in parts if part.rows]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return common_pb2.Features(
        start=parts[0].start,
        rows=sum(part.rows for part in parts),
        dim=parts[0].dim,
        data=b"".join(part.data for part in parts),
    )


class WorkerClient:
    def __init__(self, address: str, max_message_bytes: int = 16 << 20, delay_seconds: float = 0.0):
        self.address = address
        security = Security.from_env(WORKER)  # the coordinator calls workers with the worker credential
        self.channel = security.aio_channel(address, options=channel_options(max_message_bytes))
        self.metadata = security.call_metadata()
        # An added round trip per session call, to rehearse a distant worker (benchmarks, tests).
        self.delay_seconds = delay_seconds

    async def _delay(self) -> None:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)

    async def info(self, timeout: float | None = 10.0) -> common_pb2.ModelInfo:
        return await self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=timeout, metadata=self.metadata)

    async def close_session(self, session_id: str, timeout: float | None = 5.0) -> bool:
        reply = await self.stub.CloseSession(
            common_pb2.CloseSessionRequest(session_id=session_id), timeout=timeout, metadata=self.metadata
        )
        return reply.existed

    async def close(self) -> None:
        await self.channel.close()


class DraftClient(WorkerClient):
    def __init__(self, address: str, max_message_bytes: int = 16 << 20, delay_seconds: float = 0.0):
        super().__init__(address, max_message_bytes, delay_seconds)
        self.stub = draft_pb2_grpc.DraftServiceStub(self.channel)
        self._reads: FeatureReads | None = None

    async def feature_reads(self, timeout: float | None = 10.0) -> FeatureReads:
        """What the draft reads of the oracle (ModelInfo.feature_dim, feature_layers); asked once per client."""
        if self._reads is None:
            info = await self.info(timeout)
            self._reads = FeatureReads(info.feature_dim, list(info.feature_layers))
        return self._reads

    async def open_session(
        self, session_id: str, prompt: list[int], sampling: common_pb2.SamplingParams, timeout: float | None,
        features: common_pb2.Features | None = None, cache_namespace: str = "",
    ) -> None:
        await self.stub.OpenSession(
            draft_pb2.OpenDraftSessionRequest(
                session_id=session_id, prompt_token_ids=prompt, sampling=sampling, features=features,
                cache_namespace=cache_namespace,
            ),
            timeout=timeout,
            metadata=self.metadata,
        )

    async def propose(
        self, session_id: str, append: list[int], committed_length: int, k: int, timeout: float | None,
        features: common_pb2.Features | None = None, stop: StopRule | None = None, tree_width: int = 0,
    ) -> TimedProposal:
        """k tokens, or with `stop` at most k (possibly none); tree_width > 1 allows a draft tree."""
        started = time.perf_counter()
        await self._delay()
        reply = await self.stub.Propose(
            draft_pb2.ProposeRequest(
                session_id=session_id, append_token_ids=append, committed_length=committed_length, depth=k,
                features=features,
                stop=None if stop is None else draft_pb2.StopRule(
                    min_survival=stop.min_survival, calibration=stop.calibration,
                    lookup_acceptance=stop.lookup_acceptance, extend_survival=stop.extend_survival,
                    lookup_by_length=stop.lookup_by_length, alternative_calibration=stop.alternative_calibration,
                ),
                tree_width=tree_width,
            ),
            timeout=timeout,
            metadata=self.metadata,
        )
        return TimedProposal(
            tokens=list(reply.token_ids),
            distributions=list(reply.distributions),
            compute_seconds=reply.draft_seconds,
            wall_seconds=time.perf_counter() - started,
            lookup_positions=list(reply.lookup_positions),
            lookup_lengths=list(reply.lookup_lengths),
            confidences=list(reply.confidences),
            model_steps=reply.model_steps,
            parents=list(reply.parents),
        )


class OracleClient(WorkerClient):
    def __init__(self, address: str, max_message_bytes: int = 16 << 20, delay_seconds: float = 0.0):
        super().__init__(address, max_message_bytes, delay_seconds)
        self.stub = oracle_pb2_grpc.OracleServiceStub(self.channel)

    async def tokenizer(self, timeout: float | None = 30.0) -> oracle_pb2.TokenizerSpec:
        return await self.stub.GetTokenizer(oracle_pb2.GetTokenizerRequest(), timeout=timeout, metadata=self.metadata)

    async def open_session(
        self, session_id: str, prompt: list[int], sampling: common_pb2.SamplingParams, timeout: float | None,
        return_features: bool = False, cache_namespace: str = "", feature_layers: list[int] | None = None,
    ) -> oracle_pb2.OpenOracleSessionResponse:
        """Open and prefill. The reply says how much of the prompt came from the prefix cache and, with
        return_features, carries the prompt's features for a feature draft: the hidden states feature_layers
        (empty: the final ones)."""
        return await self.stub.OpenSession(
            oracle_pb2.OpenOracleSessionRequest(
                session_id=session_id, prompt_token_ids=prompt, sampling=sampling, return_features=return_features,
                cache_namespace=cache_namespace, feature_layers=feature_layers or [],
            ),
            timeout=timeout,
            metadata=self.metadata,
        )

    async def verify(
        self,
        session_id: str,
        draft_tokens: list[int],
        distributions: list[common_pb2.TokenDistribution],
        committed_length: int,
        timeout: float | None,
        parents: list[int] | None = None,
    ) -> TimedVerdict:
        started = time.perf_counter()
        await self._delay()
        reply = await self.stub.Verify(
            oracle_pb2.VerifyRequest(
                session_id=session_id,
                draft_token_ids=draft_tokens,
                draft_distributions=distributions,
                committed_length=committed_length,
                draft_parents=parents or [],
            ),
            timeout=timeout,
            metadata=self.metadata,
        )
        return _timed(reply, time.perf_counter() - started)

    async def decode(
        self, session_id: str, committed_length: int, max_tokens: int, stop_tokens: list[int], timeout: float | None,
    ) -> AsyncIterator[TimedVerdict]:
        """A run of up to max_tokens oracle-alone rounds in one call (ending after a stop token), each round's
        verdict as the oracle commits it; a round's wall time runs from the one before it (the call, for the first)."""
        started = time.perf_counter()
        await self._delay()
        call = self.stub.Decode(
            oracle_pb2.DecodeRequest(
                session_id=session_id, committed_length=committed_length, max_tokens=max_tokens,
                stop_token_ids=stop_tokens,
            ),
            timeout=timeout,
            metadata=self.metadata,
        )
        try:
            async for reply in call:
                now = time.perf_counter()
                yield _timed(reply, now - started)
                started = now
        finally:
            call.cancel()  # a no-op once the run has ended


def _timed(reply: oracle_pb2.Verdict, wall_seconds: float) -> TimedVerdict:
    return TimedVerdict(
        accepted=reply.accepted,
        next_token=reply.next_token_id,
        committed_length=reply.committed_length,
        compute_seconds=reply.verify_seconds,
        wall_seconds=wall_seconds,
        features=reply.features if reply.HasField("features") else None,
        path=list(reply.accepted_path),
        step_sessions=max(1, reply.step_sessions),
        row_seconds=reply.row_seconds,
    )
