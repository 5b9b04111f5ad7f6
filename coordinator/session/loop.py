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

A feature draft (ModelInfo.feature_dim > 0) reads the oracle's final hidden states, or those of
the layers it names (ModelInfo.feature_layers), which the oracle's session is opened to return:
its session opens after the oracle's, with the prompt's features, and each Propose carries the
features of the positions committed since the previous one (returned by the verdicts).

For greedy sessions the policy may let the draft branch (DepthPolicy.tree_width): the block is
then a draft tree (specd.core.tree), which the oracle verifies in the same one pass, and the round
commits the tokens on the path it accepted plus its own.

When the oracle fails (its calls fail as UNAVAILABLE, NOT_FOUND or the like, or it stops answering
within the call deadline, which follows its measured verify times), the session moves: `reassign`
(the coordinator's) names another oracle and a draft, the session opens on both with the prompt
and every committed token, and the round that failed runs again there with the same depth. The
output does not change: greedy tokens are the oracle's own, and a seeded sampled session's draws
are keyed by position. A draft that fails is dropped, whatever its error: the session goes on
with the oracle alone from the committed tokens.

Rounds the policy leaves to the oracle alone (k = 0) several at a time (DepthPolicy.alone_rounds; all
of them for a session without a draft) go as one decode run: oracle.Decode(n) streams the
n rounds' tokens as it commits them, with no round trip per token. Each is committed, counted and
handed on as it arrives, so a run that fails midway loses nothing: the session moves with what it has.

Per-token traffic is these RPCs; nothing here touches Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc

from coordinator.depth import DepthPolicy
from coordinator.depth.policy import ALWAYS, MAX_RUN_TOKENS
from coordinator.session.clients import DraftClient, OracleClient, TimedVerdict, join_features
from coordinator.session.stats import RoundObservation, SpeculationStats
from specd.core.errors import FailedPrecondition, Unavailable
from specd.core.lookup import NgramIndex
from specd.v1 import common_pb2, oracle_pb2

log = logging.getLogger(__name__)
# An oracle answering with one of these has failed, not the request: the session moves to another. NOT_FOUND: it
# lost the session (it restarted); DEADLINE_EXCEEDED counts only before the request's own deadline.
_ORACLE_FAILURES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
)
DEFAULT_MIGRATION_LIMIT = 3
# Call deadlines: a verify may take SLOW_FACTOR times the slowest of the oracle's recent verifies, and never less than
# the floor; opening (a prefill) gets a floor of its own.
VERIFY_DEADLINE_FLOOR_SECONDS = 5.0
OPEN_DEADLINE_FLOOR_SECONDS = 30.0
SLOW_FACTOR = 20.0
CLOSE_TIMEOUT_SECONDS = 2.0


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
    migration_limit: int = DEFAULT_MIGRATION_LIMIT  # moves to another oracle after a failure
    cache_namespace: str = ""  # the workers' prefix-cache partition (the tenant's)


RoundHook = Callable[["SpeculativeSession", RoundObservation, int], None]
# Another pair (an oracle, and a draft or None) for a session leaving the oracle at the given address, that oracle
# excluded when the flag says so (it failed, or is drained); None when there is none.
Reassign = Callable[[str, bool], Awaitable["tuple[OracleClient, DraftClient | None] | None"]]
# Whether the worker at an address is being drained with migration.
Moving = Callable[[str], bool]


class SpeculativeSession:
    def __init__(
        self,
        request: SessionRequest,
        draft: DraftClient | None,
        oracle: OracleClient,
        policy: DepthPolicy,
        on_round: RoundHook | None = None,
        reassign: Reassign | None = None,
        moving: Moving | None = None,
    ):
        self.request = request
        self.on_round = on_round
        self.reassign = reassign
        self.moving = moving
        self.draft = draft
        self.oracle = oracle
        self.policy = policy
        self.stats = SpeculationStats(
            draft_worker=draft.address if draft else "", oracle_worker=oracle.address
        )
        self.generated: list[int] = []
        self.committed: list[int] = []  # every token committed after the prompt (generated, and any cut after it)
        self.finish: Finish | None = None
        self.current_k = 0
        self._committed_length = len(request.prompt)
        self._draft_pending: list[int] = []  # committed tokens the draft has not been told about
        self._features_pending: list[common_pb2.Features] = []  # their features, for a feature draft
        self._feature_draft = False
        self._feature_layers: list[int] = []  # the oracle hidden states a feature draft reads (empty: the final ones)
        self._draft_open = False
        self._oracle_open = False
        self._verify_walls: deque[float] = deque(maxlen=16)  # the oracle's recent verify times, for call deadlines
        self._lookup: NgramIndex | None = None
        if request.lookup_ngram is not None:
            self._lookup = NgramIndex(*request.lookup_ngram)
            self._lookup.extend(request.prompt)

    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def draft_error(self) -> str:
        return self.stats.draft_error

    def _timeout(self) -> float | None:
        if self.request.deadline is None:
            return None
        remaining = self.request.deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError("the request's deadline passed")
        return remaining

    def _call_timeout(self, floor: float) -> float:
        """A call's deadline: the request's, or sooner when the oracle takes far longer than it has been taking."""
        limit = max(floor, SLOW_FACTOR * max(self._verify_walls, default=0.0))
        remaining = self._timeout()
        return limit if remaining is None else min(limit, remaining)

    def _oracle_failed(self, error: BaseException) -> bool:
        """Whether an error from the oracle means the oracle failed (the session should move), not the request."""
        if not isinstance(error, grpc.aio.AioRpcError) or error.code() not in _ORACLE_FAILURES:
            return False
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.request.deadline is not None:
            return time.monotonic() < self.request.deadline  # its call deadline, not the request's
        return True

    async def open(self) -> None:
        started = time.perf_counter()
        try:
            await self._open_moving(first=True)
        finally:
            self.stats.open_seconds = time.perf_counter() - started

    async def _open_moving(self, first: bool) -> None:
        """Open on the current pair; when the oracle fails, move to another and open there. RESOURCE_EXHAUSTED at the
        first open goes to the caller (the coordinator picks another oracle before anything is generated)."""
        while True:
            try:
                await self._open(self.request.prompt + self.committed)
                return
            except grpc.aio.AioRpcError as error:
                full = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not first
                if not (full or self._oracle_failed(error)):
                    raise
                await self._move(error)

    async def _move(self, error: grpc.aio.AioRpcError) -> None:
        """Leave the failed oracle (and the draft) for the pair `reassign` names; raises UNAVAILABLE past the
        request's migration limit or when there is no other oracle."""
        failed = self.oracle.address
        cause = f"the oracle {failed} failed ({error.code().name}: {error.details()})"
        if self.reassign is None or self.stats.migrations >= self.request.migration_limit:
            raise Unavailable(
                f"{cause} after {self.stats.migrations} of at most {self.request.migration_limit} moves to another "
                f"oracle; {len(self.generated)} tokens had been generated"
            ) from error
        await self._leave(wait_for_oracle=False)
        pair = await self.reassign(failed, True)
        if pair is None:
            raise Unavailable(
                f"{cause} and no other healthy oracle can take the session; {len(self.generated)} tokens had been "
                "generated"
            ) from error
        self._switch(pair, cause)

    async def _leave_drained(self) -> None:
        """Between rounds: leave workers an operator drains with migration (`specctl drain --migrate`) for the
        pair `reassign` names, the oracle's session closed first. Stays where it is past the migration limit or
        when no other pair can take it."""
        if self.moving is None or self.reassign is None or self.stats.migrations >= self.request.migration_limit:
            return
        oracle_moves = self.moving(self.oracle.address)
        if not oracle_moves and not (self._draft_open and self.draft is not None and self.moving(self.draft.address)):
            return
        pair = await self.reassign(self.oracle.address, oracle_moves)
        if pair is None:
            return
        await self._leave(wait_for_oracle=True)
        self._switch(pair, f"its {'oracle' if oracle_moves else 'draft'} is being drained")
        await self._open_moving(first=False)

    def _switch(self, pair: tuple[OracleClient, DraftClient | None], cause: str) -> None:
        self.oracle, self.draft = pair
        self.stats.migrations += 1
        self.stats.oracle_worker = self.oracle.address
        self.stats.draft_worker = self.draft.address if self.draft else ""
        self._draft_pending, self._features_pending, self._feature_draft = [], [], False
        self._feature_layers = []
        self._verify_walls.clear()
        log.warning(
            "session %s moves to oracle %s after %d committed tokens: %s",
            self.session_id, self.oracle.address, len(self.committed), cause,
        )

    async def _leave(self, wait_for_oracle: bool) -> None:
        """Close both sessions; a failed oracle's close runs in the background (nobody waits on it)."""
        if self._oracle_open:
            closing = self._quiet_close(self.oracle, self.session_id)
            if wait_for_oracle:
                await closing
            else:
                asyncio.ensure_future(closing)
        if self._draft_open and self.draft is not None:
            await self._quiet_close(self.draft, self.session_id)
        self._oracle_open = self._draft_open = False

    @staticmethod
    async def _quiet_close(worker: OracleClient | DraftClient, session_id: str) -> None:
        try:
            await worker.close_session(session_id, CLOSE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            log.info("closing session %s on %s: %s", session_id, worker.address, error.code().name)

    async def _open(self, prompt: list[int]) -> None:
        """Open on both workers with `prompt` (after a move: the prompt and every committed token)."""
        sid, sampling = self.session_id, self.request.sampling
        if self.draft is not None:
            try:
                reads = await self.draft.feature_reads(self._call_timeout(VERIFY_DEADLINE_FLOOR_SECONDS))
                self._feature_draft, self._feature_layers = reads.dim > 0, reads.layers
            except grpc.aio.AioRpcError as error:
                self._draft_lost(error)
                self.draft = None
        if self._feature_draft:
            await self._open_in_turn(sid, prompt, sampling)
            return
        timeout = self._call_timeout(OPEN_DEADLINE_FLOOR_SECONDS)
        ns = self.request.cache_namespace
        opens = [self.oracle.open_session(sid, prompt, sampling, timeout, cache_namespace=ns)]
        if self.draft is not None:
            opens.append(self.draft.open_session(sid, prompt, sampling, timeout, cache_namespace=ns))
        results = await asyncio.gather(*opens, return_exceptions=True)
        self._oracle_open = not isinstance(results[0], BaseException)
        self._draft_open = self.draft is not None and not isinstance(results[-1], BaseException)
        if not self._oracle_open:
            if self._draft_open:
                await self._leave(wait_for_oracle=False)
            raise results[0]
        self._opened(results[0])
        if self.draft is not None and not self._draft_open:
            self._draft_lost(results[-1])

    def _opened(self, reply: oracle_pb2.OpenOracleSessionResponse) -> None:
        if not self.stats.migrations:  # the prompt's own open
            self.stats.cached_prompt_tokens = reply.cached_tokens

    async def _open_in_turn(self, sid: str, prompt: list[int], sampling: common_pb2.SamplingParams) -> None:
        """A feature draft needs the prompt's features (of the hidden states it reads), so it opens after the oracle
        has prefilled."""
        assert self.draft is not None
        timeout = self._call_timeout(OPEN_DEADLINE_FLOOR_SECONDS)
        ns = self.request.cache_namespace
        opened = await self.oracle.open_session(
            sid, prompt, sampling, timeout, return_features=True, cache_namespace=ns, feature_layers=self._feature_layers
        )
        self._oracle_open = True
        self._opened(opened)
        try:
            await self.draft.open_session(
                sid, prompt, sampling, self._call_timeout(OPEN_DEADLINE_FLOOR_SECONDS), opened.features,
                cache_namespace=ns,
            )
        except grpc.aio.AioRpcError as error:
            self._draft_lost(error)
        else:
            self._draft_open = True

    def _draft_lost(self, error: BaseException) -> None:
        """A draft failure never fails the request, whatever its status (a desync included): the session goes on
        with the oracle alone from the committed tokens. The draft session is closed in the background."""
        if not isinstance(error, grpc.aio.AioRpcError):
            raise error
        log.warning("session %s continues without its draft: %s %s", self.session_id, error.code().name, error.details())
        if self._draft_open and self.draft is not None:
            asyncio.ensure_future(self._quiet_close(self.draft, self.session_id))
        self._draft_open = False
        self.stats.draft_error = f"{error.code().name}: {error.details()}"

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
        again: tuple[int, list[int], list[int]] | None = None  # a round to run again after a move
        while self.finish is None:
            if self._committed_length + 1 > self.request.max_context:
                self.finish = Finish.LENGTH
                break
            if again is None:
                await self._leave_drained()
            if again is not None:
                k, block, lengths = again
                k = k if block or self._draft_open else 0
            else:
                block, lengths = self._lookup_block()
                if block:
                    k = len(block)
                else:
                    k = min(self.policy.choose_k(), self._depth_limit()) if self._draft_open else 0
            self.current_k = k
            run = self._alone_run() if k == 0 and not block else 1
            try:
                if run > 1:
                    async with contextlib.aclosing(self._decode_run(run)) as decoded:
                        async for tokens, obs in decoded:
                            tokens, last_round_end = self._account(tokens, obs, last_round_end, started, opened)
                            if tokens:
                                yield tokens
                    again = None
                    continue
                tokens, obs = await self._round(k, block, lengths)
            except grpc.aio.AioRpcError as error:
                if not self._oracle_failed(error):
                    raise
                await self._move(error)
                await self._open_moving(first=False)
                # The same depth on the new oracle: the same draws. A decode run's rounds are each committed as
                # they come: the rest of it runs as new rounds.
                again = (k, block, lengths) if run == 1 else None
                continue
            again = None
            tokens, last_round_end = self._account(tokens, obs, last_round_end, started, opened)
            if tokens:
                yield tokens

    def _account(
        self, tokens: list[int], obs: RoundObservation, last_round_end: float, started: float, opened: float
    ) -> tuple[list[int], float]:
        """Record a finished round (its stats, the policy's observation, the hook); returns the tokens it adds to
        the output (`_apply_limits`) and when its RPCs were done with (the next round's loop time starts there)."""
        # Everything since the last round's RPCs ended that is not this round's RPCs: the loop's own work,
        # including handing the last tokens to the stream.
        now = time.perf_counter()
        rpcs = obs.draft_seconds + obs.verify_seconds + obs.network_seconds
        obs = replace(obs, loop_seconds=max(0.0, now - last_round_end - rpcs))
        self.stats.record(obs)
        self.policy.observe(obs)
        tokens = self._apply_limits(tokens)
        if not self.generated:
            self.stats.time_to_first_token_seconds = opened + time.perf_counter() - started
        self.generated.extend(tokens)
        self.stats.total_seconds = opened + time.perf_counter() - started
        if self.on_round is not None:
            self.on_round(self, obs, len(tokens))
        return tokens, now

    def _alone_run(self) -> int:
        """How many oracle-alone rounds, this one first, can go to the oracle as one decode run: as many as the
        policy commits to (all, without a draft), within max_tokens, the context and MAX_RUN_TOKENS; 1 while a
        block copied by prompt lookup would pay at any round (the policy's lookup_depth(), which weighs it
        against the oracle alone in runs)."""
        if self._lookup is not None and self.policy.lookup_depth() > 0:
            return 1
        rounds = self.policy.alone_rounds() if self._draft_open else ALWAYS
        remaining = self.request.max_tokens - len(self.generated)
        room = self.request.max_context - self._committed_length
        return max(1, min(rounds, remaining, room, MAX_RUN_TOKENS))

    async def _decode_run(self, n: int) -> AsyncIterator[tuple[list[int], RoundObservation]]:
        """Up to n oracle-alone rounds in one Decode call (ending after an end-of-sequence token), each committed
        and yielded as it comes. Each token must come within the call deadline a single round would have: an
        oracle that stops answering fails the run as a round's call would."""
        run = self.oracle.decode(
            self.session_id, self._committed_length, n, sorted(self.request.eos_token_ids), self._timeout()
        )
        try:
            while True:
                limit = self._call_timeout(VERIFY_DEADLINE_FLOOR_SECONDS)
                try:
                    verdict = await asyncio.wait_for(anext(run), limit)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    self._timeout()  # raises when it is the request's own deadline that passed
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                        details=f"no token of a decode run within {limit:.1f} s",
                    ) from None
                self._verify_walls.append(verdict.wall_seconds)
                committed = self._commit(verdict, [], [])
                yield committed, RoundObservation(
                    k=0,
                    accepted=0,
                    draft_seconds=0.0,
                    verify_seconds=verdict.compute_seconds,
                    oracle_network_seconds=max(0.0, verdict.wall_seconds - verdict.compute_seconds),
                    step_sessions=verdict.step_sessions,
                    row_seconds=verdict.row_seconds,
                    run=True,
                )
        finally:
            await run.aclose()

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
                    self.session_id, self._draft_pending, self._committed_length, k,
                    self._call_timeout(VERIFY_DEADLINE_FLOOR_SECONDS),
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
            self.session_id, draft_tokens, distributions, self._committed_length,
            self._call_timeout(VERIFY_DEADLINE_FLOOR_SECONDS), parents,
        )
        self._verify_walls.append(verdict.wall_seconds)
        committed = self._commit(verdict, draft_tokens, parents)
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

    def _commit(self, verdict: TimedVerdict, draft_tokens: list[int], parents: list[int]) -> list[int]:
        """Commit what a verdict keeps of the block, and the oracle's own token; returns those tokens."""
        kept = [draft_tokens[i] for i in verdict.path] if parents else draft_tokens[: verdict.accepted]
        committed = kept + [verdict.next_token]
        self.committed.extend(committed)
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
        return committed

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
