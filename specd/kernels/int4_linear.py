"""4-bit linear layers for an oracle shipped as a Q4_1 GGUF file, on CPU.

The embedded oracle's linear layers come as Q4_1 blocks: each 32 weights of a row share a scale d
and a minimum m, and each weight is d·q + m with q in 0..15. Loading de-quantizes them to
float32, which every decode step then reads whole (540 MB for the default oracle). Those float32
values lie exactly on each block's lattice, so the blocks can be recovered from them: per block,
m is the smallest value, d the step to the largest over 15, and q each value's place. torch's
CPU int4 format (`_convert_weight_to_int4pack_for_cpu`, groups of 32, w = (q − 8)·scale + zero)
holds them exactly, with scale = d and zero = m + 8d, at an eighth of the bytes. `Int4Linear`
multiplies through `_weight_int4pack_mm_for_cpu` with bfloat16 activations (its float32 path is
a slow reference kernel), so the layer's arithmetic changes: about 3e-3 relative per layer. The
oracle's output is then that of this arithmetic, and speculation stays lossless with respect to
it. It is one of the kernels of a worker's weights plan (specd.kernels.weights, `--weights int4`).

Only layers whose weights are on such a lattice are swapped (a layer that never was Q4_1, like
the default oracle's output head, stays as it is), so the weights themselves never change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32  # Q4_1's block
LEVELS = 15
# A weight off its block's lattice by more than this share of the block's step: not Q4_1.
LATTICE_TOLERANCE = 1e-4


def q4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q [N, K] int32 in 0..15, d [N, K/32], m [N, K/32]) when every 32-block of each row lies on a Q4_1
    lattice; None otherwise."""
    rows, cols = weight.shape
    if cols % GROUP:
        return None
    blocks = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
    low = blocks.amin(-1, keepdim=True)
    step = (blocks.amax(-1, keepdim=True) - low) / LEVELS
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round((blocks - low) / safe).clamp(0, LEVELS)
    if bool(((q * step + low - blocks).abs() > LATTICE_TOLERANCE * safe).any()):
        return None
    return q.to(torch.int32).reshape(rows, cols), step.squeeze(-1), low.squeeze(-1)


def int4_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def int4_product(
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bias: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """y = x W^T + b for [rows, in] float inputs, W given as Q4_1 blocks (`q4_blocks`), through torch's CPU int4
    kernel: inputs in bfloat16, each block's scale and zero in bfloat16, outputs back in float32."""
    q, step, low = blocks
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    # [K/32, N, 2]: per group, each output row's scale and zero (w = (q - 8) * scale + zero)
    scales = torch.stack([step.t(), (low + 8 * step).t()], -1).contiguous().to(torch.bfloat16)
    bias = None if bias is None else bias.detach().float()

    def product(x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, scales).float()
        return y if bias is None else y + bias

    return product


class Int4Linear(nn.Module):
    """nn.Linear over Q4_1 blocks, as torch's CPU int4 kernel takes them."""

    def __init__(self, linear: nn.Linear, blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._product = int4_product(blocks, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q4_1 blocks of {GROUP}"
