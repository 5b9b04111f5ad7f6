"""Checks on user-supplied values, shared by every service that receives them."""

from __future__ import annotations

import math

from specd.core.errors import InvalidArgument, OutOfRange
from specd.core.sampling import SamplingParams

# Below it, logits / temperature overflow float32; 0 is greedy.
MIN_TEMPERATURE = 1e-3
# The most hidden states one oracle session may ask for (each widens its features by the hidden size).
MAX_FEATURE_LAYERS = 8


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


def feature_layers(layers: list[int] | tuple[int, ...], num_layers: int, return_features: bool) -> tuple[int, ...]:
    """The hidden states an oracle session returns (specd.runtime.batch.Segment numbers them: 0 the embeddings,
    i the output of decoder layer i, num_layers the final state after the norm). Empty, and (num_layers,)
    alike, mean the final one alone, as before sessions could ask for others: both come back as ()."""
    layers = tuple(int(i) for i in layers)
    if not layers:
        return ()
    if not return_features:
        raise InvalidArgument("feature_layers asks which hidden states to return; it needs return_features")
    if len(layers) > MAX_FEATURE_LAYERS:
        raise InvalidArgument(f"a session may ask for at most {MAX_FEATURE_LAYERS} hidden states, got {len(layers)}")
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise InvalidArgument(
            f"feature layers {bad} are not hidden states of this oracle: it has {num_layers} layers, so 0..{num_layers} "
            f"(0: the embeddings, {num_layers}: the final state)"
        )
    if len(set(layers)) != len(layers):
        raise InvalidArgument(f"feature layers {list(layers)} name a hidden state more than once")
    return () if layers == (num_layers,) else layers
