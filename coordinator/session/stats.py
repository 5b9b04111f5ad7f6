"""Speculation statistics for one request, with the terms of specd.core.verification:

drafted = draft tokens proposed; accepted = draft tokens the oracle kept;
acceptance rate = accepted / drafted;
mean acceptance length = 1 + accepted / rounds that drafted (tokens committed per such round,
counting the oracle's own recovered or bonus token).
For a draft tree (specd.core.tree) drafted counts every token of the tree and accepted those on the
accepted path, so a tree's acceptance rate is lower than a chain's for the same tokens per round;
per-position counts are by depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specd.core import tree
from specd.core.verification import acceptance_rate, mean_acceptance_length
from specd.v1 import generation_pb2


@dataclass(frozen=True)
class RoundObservation:
    """What one round measured; fed to the depth policy and the statistics."""

    k: int
    accepted: int
    draft_seconds: float  # the draft's compute for the whole block (0 when k == 0)
    verify_seconds: float  # the oracle's compute for k+1 positions
    draft_network_seconds: float = 0.0  # the Propose RPC's wall time minus the draft's compute
    oracle_network_seconds: float = 0.0  # the Verify RPC's wall time minus the oracle's compute
    loop_seconds: float = 0.0  # the rest of the round's wall time: the session loop's own work
    lookup_positions: tuple[int, ...] = ()  # draft positions proposed by prompt lookup (0 = first)
    lookup_lengths: tuple[int, ...] = ()  # per entry of lookup_positions: the match's length (empty: unknown)
    lookup_led: bool = False  # the session loop's own lookup proposed the block; the draft was not asked
    asked: int | None = None  # the most tokens asked of the draft (None: exactly k; 0: not asked)
    confidences: tuple[float, ...] = ()  # the draft's confidence per proposed token (Proposal.confidences)
    model_steps: int | None = None  # positions the draft's model computed (None: one per modelled token)
    parents: tuple[int, ...] = ()  # a draft tree's (specd.core.tree); empty for a chain
    path: tuple[int, ...] = ()  # a draft tree's accepted tokens, root side first
    step_sessions: int = 1  # sessions in the oracle's pass that verified this round
    row_seconds: float = 0.0  # what one more row adds to such a pass (the oracle's recent step-cost curve)
    run: bool = False  # an oracle-alone round of a decode run: its network time is the stream's, not a round trip

    @property
    def row_externality_seconds(self) -> float:
        """What one more drafted row of this round costs the other sessions of its pass: each waits row_seconds."""
        return self.row_seconds * max(0, self.step_sessions - 1)

    @property
    def depth(self) -> int:
        """The block's depth: k for a chain, the deepest token's depth for a tree."""
        return max(tree.depths(list(self.parents))) if self.parents else self.k

    def tested_top_choices(self) -> list[tuple[int, float, bool]]:
        """(token index, confidence, accepted) for each tested token the draft proposed as its top choice:
        a chain's tokens up to the first rejection; in a tree the first child of the root and of each
        accepted token."""
        if not self.parents:
            tested = min(self.accepted + 1, self.k)
            return [(i, c, i < self.accepted) for i, c in enumerate(self.confidences[:tested])]
        return [(i, p, hit) for i, p, hit, first in self._tested_in_tree() if first]

    def tested_alternatives(self) -> list[tuple[float, bool]]:
        """(probability, accepted) for each tested alternative of a tree (a model-proposed child other than
        the first)."""
        if not self.parents:
            return []
        copied = set(self.lookup_positions)
        return [(p, hit) for i, p, hit, first in self._tested_in_tree() if not first and i not in copied]

    def tested_lookups(self) -> list[tuple[int, bool]]:
        """(match length, accepted) for each tested token that prompt lookup proposed."""
        length = dict(zip(self.lookup_positions, self.lookup_lengths))
        if not self.parents:
            tested = min(self.accepted + 1, self.k)
            return [(n, i < self.accepted) for i, n in length.items() if i < tested]
        return [(length[i], hit) for i, _, hit, _ in self._tested_in_tree() if i in length]

    def _tested_in_tree(self) -> list[tuple[int, float, bool, bool]]:
        """(index, draft probability, accepted, first child) for the children of the root and of accepted tokens."""
        reached = {tree.ROOT, *self.path}
        on_path = set(self.path)
        seen: set[int] = set()
        out = []
        for i, parent in enumerate(self.parents):
            if parent in reached and i < len(self.confidences):
                out.append((i, self.confidences[i], i in on_path, parent not in seen))
            seen.add(parent)
        return out

    @property
    def draft_asked(self) -> bool:
        """Whether the draft was asked for this round's block (which a stop rule may have left empty)."""
        return not self.lookup_led and (self.k if self.asked is None else self.asked) > 0

    @property
    def wall_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds + self.network_seconds + self.loop_seconds

    @property
    def lookup_accepted(self) -> int:
        """Accepted draft tokens that prompt lookup proposed (in a tree: those on the accepted path)."""
        if self.parents:
            on_path = set(self.path)
            return sum(position in on_path for position in self.lookup_positions)
        return sum(position < self.accepted for position in self.lookup_positions)

    @property
    def network_seconds(self) -> float:
        return self.draft_network_seconds + self.oracle_network_seconds


@dataclass
class SpeculationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds_with_draft: int = 0
    depth_per_round: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    network_seconds: float = 0.0
    total_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    open_seconds: float = 0.0  # opening both sessions: the prompt's prefill on the oracle and the draft
    cached_prompt_tokens: int = 0  # prompt positions the oracle took from its prefix cache
    draft_worker: str = ""
    oracle_worker: str = ""
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    migrations: int = 0  # times the session moved to another oracle
    draft_error: str = ""  # why the session went on without its draft

    def record(self, obs: RoundObservation) -> None:
        self.rounds += 1
        self.depth_per_round.append(obs.k)
        self.draft_seconds += obs.draft_seconds
        self.verify_seconds += obs.verify_seconds
        self.network_seconds += obs.network_seconds
        if obs.k == 0:
            return
        self.rounds_with_draft += 1
        self.drafted += obs.k
        self.accepted += obs.accepted
        self.lookup_drafted += len(obs.lookup_positions)
        self.lookup_accepted += obs.lookup_accepted
        depth = obs.depth
        while len(self.drafted_per_position) < depth:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for position in range(depth):
            self.drafted_per_position[position] += 1
            if position < obs.accepted:
                self.accepted_per_position[position] += 1

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self.accepted, self.drafted)

    @property
    def mean_acceptance_length(self) -> float:
        return mean_acceptance_length(self.accepted, self.rounds_with_draft)

    def to_proto(self) -> generation_pb2.SpeculationStats:
        return generation_pb2.SpeculationStats(
            rounds=self.rounds,
            drafted=self.drafted,
            accepted=self.accepted,
            acceptance_rate=self.acceptance_rate,
            mean_acceptance_length=self.mean_acceptance_length,
            depth_per_round=self.depth_per_round,
            accepted_per_position=self.accepted_per_position,
            drafted_per_position=self.drafted_per_position,
            draft_seconds=self.draft_seconds,
            verify_seconds=self.verify_seconds,
            network_seconds=self.network_seconds,
            total_seconds=self.total_seconds,
            time_to_first_token_seconds=self.time_to_first_token_seconds,
            draft_worker=self.draft_worker,
            oracle_worker=self.oracle_worker,
            lookup_drafted=self.lookup_drafted,
            lookup_accepted=self.lookup_accepted,
            open_seconds=self.open_seconds,
            cached_prompt_tokens=self.cached_prompt_tokens,
            migrations=self.migrations,
            draft_error=self.draft_error,
        )

    def summary(self) -> dict:
        return {
            "rounds": self.rounds,
            "rounds_with_draft": self.rounds_with_draft,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "lookup_drafted": self.lookup_drafted,
            "lookup_accepted": self.lookup_accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "depth_per_round": self.depth_per_round,
            "accepted_per_position": self.accepted_per_position,
            "drafted_per_position": self.drafted_per_position,
            "draft_seconds": round(self.draft_seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
            "network_seconds": round(self.network_seconds, 4),
            "total_seconds": round(self.total_seconds, 4),
            "time_to_first_token_seconds": round(self.time_to_first_token_seconds, 4),
            "open_seconds": round(self.open_seconds, 4),
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "migrations": self.migrations,
        }
