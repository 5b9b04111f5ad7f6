"""Depth policies: how many tokens (k) the draft proposes in the next round.

A policy is anything with `choose_k()` and `observe(round)`; the session loop calls both and
never branches on which policy it has. "Fixed k" is just another implementation. With a
constant acceptance alpha and a draft step costing c oracle steps, a round of depth k commits
E(k) = 1 + alpha + ... + alpha^k tokens on average and the speedup is S(k) = E(k) / (k c + 1)
(Leviathan et al. 2023); with acceptance a_j per position, E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j.
"""

from __future__ import annotations

from typing import Any, Protocol

from coordinator.session.stats import RoundObservation
from specd.core.stopping import StopRule

# alone_rounds() of a policy that never asks the draft: every round, for good.
ALWAYS = 1 << 30
# The most oracle-alone rounds one decode run holds: between runs the session loop looks again for drains and moves.
MAX_RUN_TOKENS = 32


class DepthPolicy(Protocol):
    name: str

    def choose_k(self) -> int:
        """The depth for the next round, in 0..k_max (0 = the oracle decodes alone)."""
        ...

    def lookup_depth(self) -> int:
        """The depth of a block copied by prompt lookup, when one is on offer (0 = ask the draft)."""
        ...

    def stop_rule(self) -> StopRule | None:
        """How the draft may end a block of choose_k() tokens early (None: it proposes all of them)."""
        ...

    def tree_width(self) -> int:
        """Alternatives per position a greedy block may offer as a draft tree (0: chains only)."""
        ...

    def alone_rounds(self) -> int:
        """After choose_k() gave 0: for how many rounds in a row, that one first, 0 stays the choice (1: it
        decides round by round). The loop runs them as one decode run on the oracle, without asking again in
        between; each round's observation still comes to observe()."""
        ...

    def observe(self, round: RoundObservation) -> None:
        """Learn from a finished round."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Learned state, to carry from session to session of the same pair."""
        ...


class FixedDepth:
    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"fixed depth must be >= 0, got {k}")
        self.k = k
        self.name = f"fixed:{k}"

    def choose_k(self) -> int:
        return self.k

    def lookup_depth(self) -> int:
        return self.k

    def stop_rule(self) -> StopRule | None:
        return None

    def tree_width(self) -> int:
        return 0

    def alone_rounds(self) -> int:
        return ALWAYS if self.k == 0 else 1

    def observe(self, round: RoundObservation) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {}


class HeuristicDepth:
    """+2 after a round where every draft token was accepted, -1 otherwise (HF transformers' rule)."""

    def __init__(self, k_max: int = 8, start: int = 4, k_min: int = 1):
        self.k_max, self.k_min = k_max, k_min
        self.k = max(k_min, min(start, k_max))
        self.name = "heuristic"

    def choose_k(self) -> int:
        return self.k

    def lookup_depth(self) -> int:
        return self.k

    def stop_rule(self) -> StopRule | None:
        return None

    def tree_width(self) -> int:
        return 0

    def alone_rounds(self) -> int:
        return 1

    def observe(self, round: RoundObservation) -> None:
        if round.k == 0:
            return
        step = 2 if round.accepted == round.k else -1
        self.k = max(self.k_min, min(self.k_max, self.k + step))

    def snapshot(self) -> dict[str, Any]:
        return {"k": self.k}

    def restore(self, state: dict[str, Any]) -> None:
        if "k" in state:
            self.k = max(self.k_min, min(self.k_max, int(state["k"])))


def expected_tokens(acceptance: list[float], k: int) -> float:
    """E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j: tokens committed by a round of depth k."""
    total, survive = 1.0, 1.0
    for a in acceptance[:k]:
        survive *= a
        total += survive
    return total


def speedup_bound(alpha: float, cost_ratio: float, k: int) -> float:
    """S(k) = E(k) / (k c + 1) for a constant acceptance alpha (used in docs and tests)."""
    return expected_tokens([alpha] * k, k) / (k * cost_ratio + 1)
