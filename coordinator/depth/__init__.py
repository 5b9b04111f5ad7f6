"""Depth policies: how many tokens (k) the draft proposes in each round, learned from what the rounds observe.

policy.py (the protocol, fixed k, the heuristic, E(k)), goodput.py (the default: the k of best expected
tokens per second, and the stop rule), estimators.py (what goodput learns with), spec.py (policies by
name). Each module's docstring carries its part of the mathematics; docs/depth-policy.md is the guide.
"""

from __future__ import annotations

from coordinator.depth.goodput import GoodputDepth, GoodputState
from coordinator.depth.policy import DepthPolicy, FixedDepth, HeuristicDepth, expected_tokens, speedup_bound
from coordinator.depth.spec import POLICY_NAMES, make_policy

__all__ = [
    "POLICY_NAMES", "DepthPolicy", "FixedDepth", "GoodputDepth", "GoodputState", "HeuristicDepth", "expected_tokens",
    "make_policy", "speedup_bound",
]
