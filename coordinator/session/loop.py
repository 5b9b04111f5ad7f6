"""The speculative session loop: one generation, round by round, over gRPC.

    open draft + oracle sessions (prompt prefilled once on each)
    repeat:  k = policy.choose_k()
             k > 0: draft.Propose(tokens committed since last time, k, policy.stop_rule())
                    -> d_1..d_m, q (m = k, or fewer where the stop rule ends the block)
             oracle.Verify(d_1..d_k, q) -> m accepted + the oracle's own token
             commit d_1..d_m + that token; both workers roll their caches back to it
    close both sessions (always: on completion, error, cancellation or deadline)

With prompt lookup on (SessionRequest.lookup_ngram), a round whose last tokens occurred earlier
in the session may skip the draft: the loop copies what followed them then (specd.core.lookup) and
has the oracle verify that block, of the depth the policy sets for such rounds
(`lookup_depth()`, 0 when a copy would not pay). The draft catches up on those tokens at its next
Propose.

A feature draft (ModelInfo.feature_dim > 0) reads the oracle's final hidden states: its
session opens after the oracle's, with the prompt's features, and each Propose carries the
features of the positions committed since the previous one (returned by the verdicts).

For greedy sessions the policy may let the draft branch (DepthPolicy.tree_width): the block is
then a draft tree (specd.core.tree), which the oracle verifies in the same one pass, and the round
commits the tokens on the path it accepted plus its own.

Per-token traffic is these two RPCs; nothing here touches Ray.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc

from coordinator.depth import DepthPolicy
from coordinator.session.clients import DraftClient, OracleClient, join_features
from coordinator.session.stats import RoundObservation, SpeculationStats
from specd.core.errors import FailedPrecondition
from specd.core.lookup import NgramIndex
from specd.v1 import common_pb2

log = logging.getLogger(__name__)
# Statuses that mean the caller itself is wrong or out of time: never hidden by a fallback.
_CALLER_ERRORS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass
class SessionRequest:
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    max_context: int = 1 << 30
    max_depth: int = 16
    deadline: float | None = None  # time.monotonic() value after which the session gives up
    lookup_ngram: tuple[int, int] | None = None  # (min n, max n) of prompt lookup; None: off
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)


RoundHook = Callable[["SpeculativeSession", RoundObservation, int], None]


class SpeculativeSession:
    def __init__(
        self,
        request: SessionRequest,
        draft: DraftClient | None,
        oracle: OracleClient,
        policy: DepthPolicy,
        on_round: RoundHook | None = None,
    ):
        self.request = request
        self.on_round = on_round
        self.draft = draft
        self.oracle = oracle
        self.policy = policy
        self.stats = SpeculationStats(
            draft_worker=draft.address if draft else "", oracle_worker=oracle.address
        )
        self.generated: list[int] = []
        self.finish: Finish | None = None
        self.current_k = 0
        self._committed_length = len(request.prompt)
        self._draft_pending: list[int] = []  # committed tokens the draft has not been told about
        self._features_pending: list[common_pb2.Features] = []  # their features, for a feature draft
        self._feature_draft = False
        self._draft_open = False
        self._oracle_open = False
        self.draft_error = ""
        self._lookup: NgramIndex | None = None
        if request.lookup_ngram is not None:
            self._lookup = NgramIndex(*request.lookup_ngram)
            self._lookup.extend(request.prompt)

    @property
    def session_id(self) -> str:
        return self.request.session_id

    def _timeout(self) -> float | None:
        if self.request.deadline is None:
            return None
        remaining = self.request.deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError("the request's deadline passed")
        return remaining

    async def open(self) -> None:
        started = time.perf_counter()
        try:
            await self._open()
        finally:
            self.stats.open_seconds = time.perf_counter() - started

    async def _open(self) -> None:
        sid, prompt, sampling = self.session_id, self.request.prompt, self.request.sampling
        if self.draft is not None:
            try:
                self._feature_draft = await self.draft.feature_dim(self._timeout()) > 0
            except grpc.aio.AioRpcError as error:
                self._draft_lost(error)
                self.draft = None
        if self._feature_draft:
            await self._open_in_turn(sid, prompt, sampling)
            return
        opens = [self.oracle.open_session(sid, prompt, sampling, self._timeout())]
        if self.draft is not None:
            opens.append(self.draft.open_session(sid, prompt, sampling, self._timeout()))
        results = await asyncio.gather(*opens, return_exceptions=True)
        self._oracle_open = not isinstance(results[0], BaseException)
        self._draft_open = self.draft is not None and not isinstance(results[-1], BaseException)
        if not self._oracle_open:
            raise results[0]
        self.stats.cached_prompt_tokens = results[0].cached_tokens
        if self.draft is not None and not self._draft_open:
            self._draft_lost(results[-1])

    async def _open_in_turn(self, sid: str, prompt: list[int], sampling: common_pb2.SamplingParams) -> None:
        """A feature draft needs the prompt's features, so it opens after the oracle has prefilled."""
        assert self.draft is not None
        opened = await self.oracle.open_session(sid, prompt, sampling, self._timeout(), return_features=True)
        self._oracle_open = True
        self.stats.cached_prompt_tokens = opened.cached_tokens
        try:
            await self.draft.open_session(sid, prompt, sampling, self._timeout(), opened.features)
        except grpc.aio.AioRpcError as error:
            self._draft_lost(error)
        else:
            self._draft_open = True

    def _draft_lost(self, error: BaseException) -> None:
        """A draft failure never fails the request: the session goes on with the oracle alone."""
        if not isinstance(error, grpc.aio.AioRpcError) or error.code() in _CALLER_ERRORS:
            raise error
        log.warning("session %s continues without its draft: %s %s", self.session_id, error.code().name, error.details())
        self._draft_open = False
        self.draft_error = f"{error.code().name}: {error.details()}"

    async def close(self) -> None:
        """Free the session on both workers; safe to call more than once, never raises."""
        closes = []
        if self._oracle_open:
            closes.append(self.oracle.close_session(self.session_id))
        if self._draft_open and self.draft is not None:
            closes.append(self.draft.close_session(self.session_id))
        self._oracle_open = self._draft_open = False
        if closes:
            results = await asyncio.shield(asyncio.gather(*closes, return_exceptions=True))
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("closing session %s: %s", self.session_id, result)

    def _depth_limit(self) -> int:
        remaining = self.request.max_tokens - len(self.generated)
        room = self.request.max_context - self._committed_length - 1
        return max(0, min(self.request.max_depth, remaining - 1, room))

    async def rounds(self) -> AsyncIterator[list[int]]:
        """Yield the tokens each round commits until max_tokens, EOS or the context runs out.
        The stats' clocks (first token, total) include the time open() took."""
        started = last_round_end = time.perf_counter()
        opened = self.stats.open_seconds
        while self.finish is None:
            if self._committed_length + 1 > self.request.max_context:
                self.finish = Finish.LENGTH
                break
            block, lengths = self._lookup_block()
            if block:
                k = len(block)
            else:
                k = min(self.policy.choose_k(), self._depth_limit()) if self._draft_open else 0
            self.current_k = k
            tokens, obs = await self._round(k, block, lengths)
            # Everything since the last round's RPCs ended that is not this round's RPCs: the
            # loop's own work, including handing the last tokens to the stream.
            now = time.perf_counter()
            rpcs = obs.draft_seconds + obs.verify_seconds + obs.network_seconds
            obs = replace(obs, loop_seconds=max(0.0, now - last_round_end - rpcs))
            last_round_end = now
            self.stats.record(obs)
            self.policy.observe(obs)
            tokens = self._apply_limits(tokens)
            if not self.generated:
                self.stats.time_to_first_token_seconds = opened + time.perf_counter() - started
            self.generated.extend(tokens)
            self.stats.total_seconds = opened + time.perf_counter() - started
            if self.on_round is not None:
                self.on_round(self, obs, len(tokens))
            if tokens:
                yield tokens

    def _lookup_block(self) -> tuple[list[int], list[int]]:
        """A copy of what followed the session's last tokens when they occurred before, and the length of
        the match behind each copied token, as long as the policy wants lookup blocks (empty: no match,
        or a copy would not pay). Under the policy's stop rule the copy ends where the block's
        survival, the product of its tokens' expected acceptance by match length, drops below
        min_survival."""
        if self._lookup is None:
            return [], []
        tail = self._lookup.tokens[-self._lookup.max_n :]
        found = self._lookup.match(tail)
        if found is None:  # the common case: no match, and no need to ask the policy
            return [], []
        depth = min(self.policy.lookup_depth(), self._depth_limit())
        stop = self.policy.stop_rule() if depth else None
        block: list[int] = []
        lengths: list[int] = []
        survival = 1.0
        while found is not None and len(block) < depth:
            guess, length = found
            if stop is not None:
                survival *= stop.lookup_expected(length)
                if survival < stop.min_survival:
                    break
            block.append(guess)
            lengths.append(length)
            found = self._lookup.match(tail + block)
        return block, lengths

    async def _round(
        self, k: int, lookup_block: list[int] | None = None, lookup_lengths: list[int] | None = None
    ) -> tuple[list[int], RoundObservation]:
        """One round: a block from the draft (k > 0), a copied block (lookup_block, with the length of the
        match behind each token), or none (k = 0)."""
        draft_tokens: list[int] = []
        distributions: list[common_pb2.TokenDistribution] = []
        draft_compute = draft_wall = 0.0
        lookup_positions: tuple[int, ...] = ()
        lengths: tuple[int, ...] = ()
        confidences: tuple[float, ...] = ()
        asked = 0
        model_steps: int | None = None
        parents: list[int] = []
        if lookup_block:
            draft_tokens = list(lookup_block)
            lookup_positions = tuple(range(len(draft_tokens)))
            lengths = tuple(lookup_lengths or ())
            if self.request.sampling.temperature > 0:  # each copied token is a one-token proposal q
                distributions = [common_pb2.TokenDistribution(token_ids=[t], probs=[1.0]) for t in draft_tokens]
        elif k > 0:
            assert self.draft is not None
            try:
                proposal = await self.draft.propose(
                    self.session_id, self._draft_pending, self._committed_length, k, self._timeout(),
                    join_features(self._features_pending), self.policy.stop_rule(),
                    self.policy.tree_width() if self.request.sampling.temperature == 0 else 0,
                )
            except grpc.aio.AioRpcError as error:
                self._draft_lost(error)
            else:
                asked = k
                self._draft_pending = []
                self._features_pending = []
                draft_tokens, distributions = proposal.tokens, proposal.distributions
                draft_compute, draft_wall = proposal.compute_seconds, proposal.wall_seconds
                lookup_positions = tuple(proposal.lookup_positions)
                lengths = tuple(proposal.lookup_lengths)
                confidences = tuple(proposal.confidences)
                model_steps = proposal.model_steps
                parents = proposal.parents
        verdict = await self.oracle.verify(
            self.session_id, draft_tokens, distributions, self._committed_length, self._timeout(), parents
        )
        kept = [draft_tokens[i] for i in verdict.path] if parents else draft_tokens[: verdict.accepted]
        committed = kept + [verdict.next_token]
        self._committed_length += len(committed)
        if verdict.committed_length != self._committed_length:  # each side counts on its own: a free check
            raise FailedPrecondition(
                f"session {self.session_id} out of sync: the oracle holds {verdict.committed_length} committed "
                f"tokens, the session loop counts {self._committed_length}"
            )
        self._draft_pending.extend(committed)
        if self._lookup is not None:
            self._lookup.extend(committed)
        if verdict.features is not None and self._draft_open:
            self._features_pending.append(verdict.features)
        return committed, RoundObservation(
            k=len(draft_tokens),
            accepted=verdict.accepted,
            draft_seconds=draft_compute,
            verify_seconds=verdict.compute_seconds,
            draft_network_seconds=max(0.0, draft_wall - draft_compute),
            oracle_network_seconds=max(0.0, verdict.wall_seconds - verdict.compute_seconds),
            lookup_positions=lookup_positions,
            lookup_lengths=lengths,
            lookup_led=bool(lookup_block),
            asked=asked,
            confidences=confidences,
            model_steps=model_steps,
            parents=tuple(parents),
            path=tuple(verdict.path),
            step_sessions=verdict.step_sessions,
            row_seconds=verdict.row_seconds,
        )

    def _apply_limits(self, tokens: list[int]) -> list[int]:
        """Cut a round's tokens at EOS (excluded from the output) or at max_tokens."""
        for i, token in enumerate(tokens):
            if token in self.request.eos_token_ids:
                self.finish = Finish.EOS
                return tokens[:i]
        remaining = self.request.max_tokens - len(self.generated)
        if len(tokens) >= remaining:
            self.finish = Finish.LENGTH
            return tokens[:remaining]
        return tokens


async def run_to_completion(session: SpeculativeSession) -> list[int]:
    """Open, run every round, always close. Returns the generated tokens."""
    try:
        await session.open()
        async for _ in session.rounds():
            pass
        return session.generated
    finally:
        await session.close()
