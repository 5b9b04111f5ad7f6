"""The coordinator's request path: get an assignment from the control plane, run the session
loop against the assigned workers, record metrics, report back.

Ray is touched once at the start of a session (acquire), every `report_interval_seconds` at
most while it runs (fire-and-forget progress) and once at the end (release).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from coordinator.admission import Admission
from coordinator.config import CoordinatorConfig
from coordinator.control_plane.client import PlaneClient
from coordinator.control_plane.scheduling import Assignment
from coordinator.depth import DepthPolicy, FixedDepth, make_policy
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.generation import (
    Delta,
    GenerationRequest,
    Pair,
    TextCodec,
    stream_generation,
    validate_request,
)
from coordinator.session.loop import SpeculativeSession
from coordinator.session.stats import RoundObservation
from specd.core import validation
from specd.core.compat import check_pair
from specd.core.errors import ResourceExhausted, SpecdError, Unavailable
from specd.rpc.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)
# Oracles a request tries after one refused it for want of room, before RESOURCE_EXHAUSTED.
MAX_FULL_ORACLES = 3
PAIR_INFO_TIMEOUT_SECONDS = 5.0


class OracleFull(Exception):
    """The assigned oracle holds its max_sessions: the session should go to another one."""

    def __init__(self, oracle: str):
        super().__init__(oracle)
        self.oracle = oracle


class Coordinator:
    def __init__(self, plane: PlaneClient, config: CoordinatorConfig, metrics: CoordinatorMetrics | None = None):
        self.plane = plane
        self.config = config
        self.metrics = metrics or CoordinatorMetrics()
        self._oracles: dict[str, OracleClient] = {}
        self._drafts: dict[str, DraftClient] = {}
        self._codecs: dict[str, TextCodec] = {}
        self._checked_pairs: set[tuple[str, str]] = set()
        self.admission = Admission(
            config.max_concurrent_sessions, config.max_waiting, self.metrics.running, self.metrics.waiting
        )
        self.moving: frozenset[str] = frozenset()  # workers drained with migration, as of the last poll
        self._poll: asyncio.Task | None = None

    def start(self) -> None:
        """Poll the control plane for workers drained with migration (sessions check it between rounds)."""
        if self._poll is None:
            self._poll = asyncio.ensure_future(self._poll_moving())

    async def _poll_moving(self) -> None:
        while True:
            try:
                self.moving = frozenset(await self.plane.call("migrating"))
            except Exception as error:  # the control plane restarting: keep the last answer
                log.info("polling for drained workers: %s", error)
            await asyncio.sleep(self.config.health_interval_seconds)

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        for client in [*self._oracles.values(), *self._drafts.values()]:
            await client.close()

    async def _pair(self, a: Assignment) -> Pair:
        oracle = self._oracles.get(a.oracle_address)
        if oracle is None:
            oracle = self._oracles[a.oracle_address] = OracleClient(
                a.oracle_address, self.config.max_message_bytes, self.config.oracle_delay_ms / 1000
            )
        draft = None
        if a.draft_address:
            draft = self._drafts.get(a.draft_address)
            if draft is None:
                draft = self._drafts[a.draft_address] = DraftClient(
                    a.draft_address, self.config.max_message_bytes, self.config.draft_delay_ms / 1000
                )
        oracle_info = await oracle.info(PAIR_INFO_TIMEOUT_SECONDS)
        if draft is not None and (a.draft_address, a.oracle_address) not in self._checked_pairs:
            check_pair(await draft.info(), oracle_info)  # never run a pair that would be lossy
            self._checked_pairs.add((a.draft_address, a.oracle_address))
        codec = self._codecs.get(oracle_info.vocab_fingerprint)
        if codec is None:
            codec = self._codecs[oracle_info.vocab_fingerprint] = TextCodec(await oracle.tokenizer())
        return Pair.build(oracle, draft, codec, oracle_info, a.max_depth, a.pair_id)

    def _policy(self, a: Assignment, depth: int | None) -> DepthPolicy:
        if depth is not None:
            return FixedDepth(min(depth, a.max_depth))
        return make_policy(a.policy, max(a.max_depth, 1), a.policy_state)

    def _round_hook(self, pair_id: str, started: float):
        last = {"time": started, "report": 0.0}
        metrics, plane, interval = self.metrics, self.plane, self.config.report_interval_seconds

        def on_round(session: SpeculativeSession, obs: RoundObservation, delivered: int) -> None:
            now = time.perf_counter()
            metrics.spec.record(
                obs.k, obs.accepted, pair_id,
                lookup_drafted=len(obs.lookup_positions), lookup_accepted=obs.lookup_accepted,
            )
            metrics.depth.labels(pair_id).set(obs.k)
            metrics.depth_chosen.labels(pair_id).observe(obs.k)
            if delivered and len(session.generated) > delivered:  # tokens after the first
                for _ in range(delivered):
                    metrics.itl.observe((now - last["time"]) / delivered)
            last["time"] = now
            if now - last["report"] >= interval:
                last["report"] = now
                s = session.stats
                plane.tell("report", session.session_id, obs.k, len(session.generated), s.drafted, s.accepted)

        return on_round

    async def generate(self, request: GenerationRequest, depth: int | None = None) -> AsyncIterator[Delta]:
        validate_request(request, self.config.max_tokens_limit)
        log.info("request %s from tenant %s", request.request_id, request.tenant)
        if depth is not None:
            validation.depth(depth, self.config.max_depth)
        started = time.perf_counter()
        async with self.admission.slot():
            full: list[str] = []  # oracles that refused the session for want of room
            while True:
                attempt = self._generate(request, depth, started, full)
                try:
                    async for delta in attempt:
                        yield delta
                    return
                except OracleFull as error:
                    full.append(error.oracle)
                    if len(full) >= MAX_FULL_ORACLES:
                        raise ResourceExhausted(
                            f"{len(full)} oracles had no room for another session; retry later",
                            retry_after_seconds=self.admission.retry_after_seconds(),
                        ) from None
                finally:
                    await attempt.aclose()  # its release runs now, also when this request ends early

    async def _generate(
        self, request: GenerationRequest, depth: int | None, started: float, full: list[str]
    ) -> AsyncIterator[Delta]:
        """One attempt on one pair; raises OracleFull when the oracle refuses to open the session (it holds its
        max_sessions), before anything was generated, so the caller tries another."""
        session_id = uuid.uuid4().hex
        policy: DepthPolicy | None = None
        summary: dict = {}
        first = True
        opened = False
        assignment: Assignment | None = None
        failed: list[str] = list(full)  # oracles this session must not go to (full, or failed it)
        try:  # the release below also covers an assignment made while this request was being cancelled
            chosen = await self._reassign(session_id, request, depth, failed)
            assignment, pair = chosen if chosen is not None else (None, None)
            if assignment is None and full:
                raise ResourceExhausted(
                    f"every usable oracle is full ({', '.join(full)} refused the session); retry later",
                    retry_after_seconds=self.admission.retry_after_seconds(),
                )
            if assignment is None or pair is None:
                raise Unavailable("no healthy oracle worker is available; `specctl status` shows the workers")
            policy = self._policy(assignment, depth)
            hook = self._round_hook(assignment.pair_id, started)

            async def reassign(address: str, exclude: bool) -> tuple[OracleClient, DraftClient | None] | None:
                """Another compatible pair for the session; `exclude`: not on its oracle (it failed, or is drained)."""
                nonlocal assignment
                assert assignment is not None
                if exclude:
                    failed.append(assignment.oracle_name)
                self.plane.tell("release", session_id, None, {})
                assignment = None
                assert pair is not None
                moved = await self._reassign(session_id, request, depth, failed, pair.codec)
                if moved is None:
                    return None
                assignment, new_pair = moved
                self.metrics.migrations.inc()
                return new_pair.oracle, new_pair.draft

            async for delta in stream_generation(
                request, pair, policy, session_id, hook, lookup_ngram=self.config.lookup_ngram, reassign=reassign,
                moving=lambda address: address in self.moving,
            ):
                opened = True
                if first and delta.token_ids:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                    first = False
                if delta.finish is not None and delta.stats is not None:
                    summary = delta.stats.summary()
                    self.metrics.requests.labels(delta.finish.value).inc()
                    self.metrics.tenant_requests.labels(request.tenant, delta.finish.value).inc()
                    self.metrics.generation_tokens.inc(delta.completion_tokens)
                    self.metrics.prompt_tokens.inc(delta.prompt_tokens)
                    self.metrics.e2e.observe(time.perf_counter() - started)
                yield delta
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not opened and assignment is not None:
                raise OracleFull(assignment.oracle_name) from error
            raise
        finally:  # also when the request was cancelled during its acquire: releasing an unknown session is harmless
            state = policy.snapshot() if policy is not None and depth is None else {}
            self.plane.tell("release", session_id, summary, state)

    async def _reassign(
        self, session_id: str, request: GenerationRequest, depth: int | None, failed: list[str],
        codec: TextCodec | None = None,
    ) -> tuple[Assignment, Pair] | None:
        """An assignment for a session: a usable oracle not in `failed` (each one tried and found unreachable joins
        it), a draft for it, and with `codec` (a session leaving a failed oracle) the same vocabulary; None when there
        is none."""
        while True:
            assignment = await self.plane.call("acquire", session_id, request.request_id, depth != 0, failed)
            if assignment is None:
                return None
            try:
                pair = await self._pair(assignment)
            except grpc.aio.AioRpcError as error:
                log.warning("oracle %s cannot take session %s: %s", assignment.oracle_name, session_id, error.code().name)
            except SpecdError as error:  # an incompatible pair: the client hears of it, unless the session is moving
                if codec is None:
                    self.plane.tell("release", session_id, None, {})
                    raise
                log.warning("pair %s cannot take session %s: %s", assignment.pair_id, session_id, error)
            else:
                if codec is None or pair.codec is codec:  # the same vocabulary: the session's tokens mean the same there
                    return assignment, pair
            failed.append(assignment.oracle_name)
            self.plane.tell("release", session_id, None, {})
