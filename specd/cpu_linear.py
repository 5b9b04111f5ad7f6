"""Linear layers that keep their speed as a verify block grows, on CPU.

On x86 CPUs torch's float32 matmul picks its kernel from the operands' memory layouts. With
the weight stored as nn.Linear stores it ([out, in]), a product of 1-3 rows is fast and one of
4 or more rows is several times slower per layer; with the weight stored transposed ([in, out])
it is the other way round for 2-3 rows. A model forward of 4-9 tokens (the oracle verifying
a block of k = 3-8) then costs ~1.9x a one-token step instead of ~1.5x.
`DualLayoutLinear` keeps both layouts and picks, per call, the one that is fast for that many
rows: the same arithmetic, up to float rounding order, for twice the weight memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Rows (tokens in a forward pass) for which the [out, in] layout is the faster one.
STOCK_LAYOUT_ROWS = (2, 3)
# "auto" keeps both layouts only while the doubled linear weights stay this small.
AUTO_LIMIT_BYTES = 1 << 30
CPU_LINEAR_MODES = ("auto", "dual", "stock")


class DualLayoutLinear(nn.Module):
    """nn.Linear's y = x W^T + b with W held as [out, in] and as a contiguous [in, out] copy."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows in STOCK_LAYOUT_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def use_dual_layout(model: nn.Module, mode: str = "auto") -> int:
    """Swap the float32 nn.Linear layers of an inference model on CPU for DualLayoutLinear.

    mode: "dual" always swaps, "stock" never does, "auto" swaps while the copies take at most
    AUTO_LIMIT_BYTES. Returns how many layers were swapped. Only for inference: the copies are
    made once and never updated.
    """
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"cpu linear mode must be one of {', '.join(CPU_LINEAR_MODES)}, got {mode!r}")
    linears = [
        item for item in _linears(model)
        if item[2].weight.device.type == "cpu" and item[2].weight.dtype == torch.float32
    ]
    extra = sum(linear.weight.numel() * linear.weight.element_size() for _, _, linear in linears)
    if mode == "stock" or not linears or (mode == "auto" and extra > AUTO_LIMIT_BYTES):
        if mode == "auto" and linears:
            log.info("keeping torch's linear layers: a second layout would take %.0f MB", extra / 1e6)
        return 0
    for parent, name, linear in linears:
        setattr(parent, name, DualLayoutLinear(linear))
    log.info("dual-layout linear layers: %d swapped, %.0f MB more weight memory", len(linears), extra / 1e6)
    return len(linears)
