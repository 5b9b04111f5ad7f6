"""Depth-policy specs as operators write them (specctl, the admin API, the coordinator's settings):
'goodput' with optional options ('goodput:k_max=6,smoothing=0.2'), 'heuristic' or 'fixed:K'.

The caller passes the pair's maximum depth, which bounds every policy: fixed:K must lie in 0..k_max,
and a goodput spec's own k_max=N (N >= 1) may lower it, never raise it (the policy gets min(N, k_max)),
so one spec such as 'goodput:k_max=8' serves pairs of any depth.
"""

from __future__ import annotations

from typing import Any

from coordinator.depth.goodput import GoodputDepth
from coordinator.depth.policy import DepthPolicy, FixedDepth, HeuristicDepth

POLICY_NAMES = ("goodput", "heuristic", "fixed:K")


GOODPUT_OPTIONS = {
    "k_max": int, "smoothing": float, "prior_acceptance": float, "window": float, "shrink": float, "carry": float,
    "probe_every": int, "probe_k": int, "lookup_prior": float, "confidence_stop": int, "tree_width": int,
}


def _goodput_options(text: str) -> dict[str, Any]:
    """'smoothing=0.2,probe_every=8' -> keyword arguments of GoodputDepth. A `k_max` option may lower the pair's
    maximum depth, never raise it (make_policy takes the smaller)."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in GOODPUT_OPTIONS or not value:
            raise ValueError(f"bad goodput option {item!r}; known: {', '.join(f'{n}=...' for n in GOODPUT_OPTIONS)}")
        try:
            options[name] = GOODPUT_OPTIONS[name](value)
        except ValueError:
            raise ValueError(f"bad goodput option {item!r}: {value!r} is not a number") from None
    if not 0 < options.get("smoothing", 0.5) <= 1 or not 0 <= options.get("prior_acceptance", 0.5) <= 1:
        raise ValueError("goodput smoothing must be in (0, 1] and prior_acceptance in [0, 1]")
    if not 0 <= options.get("lookup_prior", 0.5) <= 1:
        raise ValueError("goodput lookup_prior must be in [0, 1]")
    if options.get("confidence_stop", 0) not in (0, 1):
        raise ValueError("goodput confidence_stop must be 0 (off) or 1 (on)")
    if not 0 <= options.get("tree_width", 0) <= 16:
        raise ValueError("goodput tree_width must be in 0..16 (0 or 1: chains only)")
    if options.get("probe_every", 1) < 1 or options.get("probe_k", 1) < 1:
        raise ValueError("goodput probe_every and probe_k must be at least 1")
    if options.get("k_max", 1) < 1:
        raise ValueError("goodput k_max must be at least 1")
    if options.get("window", 2) <= 1 or options.get("shrink", 0) < 0 or options.get("carry", 0) < 0:
        raise ValueError("goodput window must be > 1, shrink and carry >= 0")
    return options


def make_policy(spec: str, k_max: int, state: dict[str, Any] | None = None) -> DepthPolicy:
    """Build a policy from its spec: 'goodput' (optionally 'goodput:k_max=6,smoothing=0.2,probe_every=8'),
    'heuristic' or 'fixed:K', for a pair whose maximum depth is `k_max`; `state` (a snapshot()) seeds
    what it learns."""
    spec = spec.strip().lower()
    policy: Any
    if spec.startswith("fixed:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad depth policy {spec!r}: fixed needs an integer, e.g. fixed:4") from None
        if not 0 <= k <= k_max:
            raise ValueError(f"fixed depth {k} is outside 0..{k_max}")
        return FixedDepth(k)
    if spec == "heuristic":
        policy = HeuristicDepth(k_max=k_max)
    elif spec == "goodput" or spec.startswith("goodput:"):
        options = _goodput_options(spec.removeprefix("goodput").lstrip(":"))
        policy = GoodputDepth(k_max=min(k_max, options.pop("k_max", k_max)), **options)
    else:
        raise ValueError(f"unknown depth policy {spec!r}; use one of {', '.join(POLICY_NAMES)}")
    if state:
        policy.restore(state)
    return policy
