"""Depth policies: how many tokens (k) the draft proposes in the next round.

A policy is anything with `choose_k()` and `observe(round)`; the session loop calls both
and never branches on which policy it has. "Fixed k" is just another implementation.
"""

from __future__ import annotations

from typing import Protocol

from coordinator.stats import RoundObservation


class DepthPolicy(Protocol):
    name: str

    def choose_k(self) -> int:
        """The depth for the next round, in 0..k_max (0 = the oracle decodes alone)."""
        ...

    def observe(self, round: RoundObservation) -> None:
        """Learn from a finished round."""
        ...


class FixedDepth:
    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"fixed depth must be >= 0, got {k}")
        self.k = k
        self.name = f"fixed:{k}"

    def choose_k(self) -> int:
        return self.k

    def observe(self, round: RoundObservation) -> None:
        pass
