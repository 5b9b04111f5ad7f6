"""Checks on user-supplied values, shared by every service that receives them."""

from __future__ import annotations

import math

from specd.core.errors import InvalidArgument, OutOfRange
from specd.core.sampling import SamplingParams

# Below it, logits / temperature overflow float32; 0 is greedy.
MIN_TEMPERATURE = 1e-3


def sampling_params(temperature: float, top_k: int, top_p: float, seed: int) -> SamplingParams:
    """Validate raw sampling fields; top_p 0 means unset (1.0)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:  # logits / temperature would overflow to inf and NaN
        raise InvalidArgument(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature:g}; use 0 for greedy"
        )
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if top_p == 0:
        top_p = 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=int(seed))


def prompt_ids(token_ids: list[int], vocab_size: int, max_context: int) -> list[int]:
    if not token_ids:
        raise InvalidArgument("the prompt is empty; send at least one token")
    if len(token_ids) >= max_context:
        raise OutOfRange(
            f"the prompt has {len(token_ids)} tokens but the context holds {max_context}; "
            "shorten the prompt to leave room for at least one generated token"
        )
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"token ids must be in [0, {vocab_size}); got {bad[:5]}")
    return list(token_ids)


def depth(k: int, max_depth: int) -> int:
    if k < 0:
        raise InvalidArgument(f"depth must be >= 0, got {k}")
    if k > max_depth:
        raise OutOfRange(f"depth {k} is over the maximum of {max_depth}")
    return k
