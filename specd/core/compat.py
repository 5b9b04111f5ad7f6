"""Which drafts may serve which oracles: the check that keeps every pair lossless.

A draft's tokens are verified by id, so a draft and an oracle must share one token-id space:
the same vocabulary size and the same sha256 fingerprint of the token -> id mapping. A draft
that reads the oracle's features (specd.models.feature_draft) also needs features of its own
width, and one that reads several of the oracle's hidden states (ModelInfo.feature_layers) an
oracle that has each of them (ModelInfo.num_layers). Workers report these traits in ModelInfo;
the coordinator checks a pair before its first session and the control plane pairs only
compatible workers, both through `pair_problem`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from specd.core.errors import IncompatiblePair


class PairTraits(Protocol):
    """What pairing reads of a worker (the fields of specd.v1 ModelInfo of the same names)."""

    vocab_fingerprint: str
    vocab_size: int
    feature_dim: int  # a draft: the oracle features it reads (0: none); an oracle: the features it returns
    feature_layers: Sequence[int]  # a feature draft: the oracle hidden states it reads (empty: the final ones)
    num_layers: int  # an oracle: its decoder layers N, so hidden states 0..N (0: unknown)


def pair_problem(draft: PairTraits, oracle: PairTraits) -> str | None:
    """Why `draft` cannot serve `oracle` without changing its output, or None when it can."""
    if not draft.vocab_fingerprint or not oracle.vocab_fingerprint:
        return "a worker has not reported its vocabulary yet"
    if draft.vocab_size != oracle.vocab_size or draft.vocab_fingerprint != oracle.vocab_fingerprint:
        return (
            "draft and oracle do not share a vocabulary "
            f"(draft: {draft.vocab_size} tokens, fingerprint {draft.vocab_fingerprint[:12]}; "
            f"oracle: {oracle.vocab_size} tokens, fingerprint {oracle.vocab_fingerprint[:12]}); "
            "speculative decoding needs identical token ids, pick a draft from the oracle's model family"
        )
    if draft.feature_dim and draft.feature_dim != oracle.feature_dim:
        return (
            f"the draft reads oracle features of width {draft.feature_dim}, but this oracle's are "
            f"{oracle.feature_dim} wide; a feature draft pairs only with the oracle it was distilled from"
        )
    layers = list(draft.feature_layers) if draft.feature_dim else []
    if layers:
        reads = f"the draft reads hidden states {', '.join(map(str, layers))} of its oracle"
        if not oracle.num_layers:
            return f"{reads}, but this oracle does not report its layers (it may return its final state alone)"
        if max(layers) > oracle.num_layers:
            return (
                f"{reads}, but this oracle has {oracle.num_layers} layers (hidden states 0..{oracle.num_layers}); "
                "a feature draft pairs only with the oracle it was distilled from"
            )
    return None


def check_pair(draft: PairTraits, oracle: PairTraits) -> None:
    """Refuse a pair that `pair_problem` finds fault with (FAILED_PRECONDITION)."""
    problem = pair_problem(draft, oracle)
    if problem is not None:
        raise IncompatiblePair(problem)


def pair_id(draft: str, oracle: str) -> str:
    """The name of a pair: `draft+oracle`, or the oracle's alone when no draft serves it."""
    return f"{draft}+{oracle}" if draft else oracle
