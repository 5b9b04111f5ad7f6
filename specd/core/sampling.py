"""Sampling primitives shared by the draft and the oracle: logit warping and keyed randomness.

Warping (temperature, top-k, top-p) must be applied to the draft's logits and the oracle's
logits in exactly the same way, otherwise speculative sampling targets the wrong distribution.
Both services call `warp_probs`; neither re-implements it.

Randomness is counter-based: every uniform number is a pure function of
(seed, absolute position in the sequence, stream). A round therefore consumes no hidden
generator state, and the same seed with the same depth schedule reproduces the output.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters. temperature == 0 means greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Stream(enum.IntEnum):
    """Independent random streams; each position draws at most one number from each."""

    DRAFT = 1  # the draft samples its proposal at a position
    ACCEPT = 2  # the oracle's accept test min(1, p/q) at a position
    ORACLE = 3  # the oracle samples its own (recovered or bonus) token at a position


def keyed_uniform(seed: int, position: int, stream: Stream) -> float:
    """A uniform number in [0, 1) determined by (seed, position, stream) alone."""
    digest = hashlib.blake2b(
        struct.pack("<QQB", seed & 0xFFFFFFFFFFFFFFFF, position, int(stream)), digest_size=8
    ).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits into the sampling distribution: temperature, then top-k, then top-p.

    logits: [n, vocab] -> probs: [n, vocab] (float32, rows sum to 1).
    Must not be called for greedy params (temperature 0); greedy uses argmax directly.
    """
    if params.greedy:
        raise ValueError("warp_probs is for sampled decoding; greedy uses argmax")
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
        # already reaches top_p. The most likely token is always kept.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


def sample_from(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample of one token from probs [vocab] using the uniform u in [0, 1)."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    total = float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=torch.float64, device=cdf.device), right=True))
    # Rounding can put u*total at the very end; fall back to the last token with mass.
    if index >= probs.shape[-1] or probs[index] <= 0:
        index = int(torch.nonzero(probs > 0)[-1])
    return index
