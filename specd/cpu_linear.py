"""Linear layers that keep their speed as a verify block grows, on CPU.

On x86 CPUs torch's float32 matmul picks its kernel from the operands' memory layouts. With
the weight stored as nn.Linear stores it ([out, in]), a product of 1-3 rows is fast and one of
4 or more rows is several times slower per layer; with the weight stored transposed ([in, out])
it is the other way round for 2-3 rows. Even with the better layout, 4-9 rows still cost about
1.6x one row on the large layers. MKL's packed GEMM (the weight re-laid out once for a given
row count, then multiplied with cblas_sgemm_compute) costs about the same for a block of 4-9
rows as the best kernel does for one row.

`CpuLinear` keeps the layouts a mode asks for and picks, per call, the fast one for that many
rows:
- 1 row, and more rows than the largest packed block (prefill): the [in, out] copy;
- 2-3 rows: the [out, in] weight (torch's own);
- 4 to 9 rows ("packed" mode): packed copies for 4, 6 and 9 rows; a block of 5, 7 or 8 rows is
  padded with zero rows to the next one. Rows of a product are independent, so padding changes
  no row. On the default oracle a forward pass of 4-9 tokens then costs 1.3-1.6x a one-token
  step instead of 1.6-1.9x.
Every path is the same arithmetic up to float rounding order. Memory: "dual" keeps one extra
copy of every float32 linear weight, "packed" four.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Rows (tokens in a forward pass) for which the [out, in] layout is the faster one.
STOCK_LAYOUT_ROWS = (2, 3)
# Row counts with a packed weight copy; a block of r rows (r >= 4) uses the smallest one >= r.
PACKED_ROWS = (4, 6, 9)
# "auto" keeps the extra copies only while they take at most this much.
AUTO_LIMIT_BYTES = 3 << 30
CPU_LINEAR_MODES = ("auto", "packed", "dual", "stock")


def mkl_packed_available() -> bool:
    """Whether this torch build has MKL's packed float32 GEMM (x86 builds with MKL do)."""
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


class CpuLinear(nn.Module):
    """nn.Linear's y = x W^T + b with W held as [out, in], as a contiguous [in, out] copy, and
    (packed_rows) as MKL packed copies for blocks of those many rows."""

    def __init__(self, linear: nn.Linear, packed_rows: tuple[int, ...] = ()):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        # Opaque MKL tensors, not parameters: they never leave the CPU and are not saved.
        self._packed = {rows: torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows) for rows in packed_rows}
        self._block_rows: dict[int, int] = {}  # rows of a call -> rows of the packed copy it uses
        for rows in range(max(STOCK_LAYOUT_ROWS) + 1, max(packed_rows, default=0) + 1):
            self._block_rows[rows] = min(p for p in packed_rows if p >= rows)

    @property
    def packed_rows(self) -> tuple[int, ...]:
        return tuple(sorted(self._packed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows in STOCK_LAYOUT_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        block = self._block_rows.get(rows)
        if block is None:
            y = torch.matmul(x, self.weight_t)
        else:
            flat = x.reshape(rows, self.in_features)
            if rows < block:
                flat = nn.functional.pad(flat, (0, 0, 0, block - rows))
            y = torch.ops.mkl._mkl_linear(flat, self._packed[block], self.weight, None, block)
            y = y[:rows].reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"packed_rows={self.packed_rows}"
        )


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def use_cpu_linear(model: nn.Module, mode: str = "auto") -> int:
    """Swap the float32 nn.Linear layers of an inference model on CPU for CpuLinear.

    mode: "packed" keeps the [in, out] copy and packed copies for verify blocks (where MKL is
    there; else as "dual"), "dual" the [in, out] copy only, "stock" swaps nothing, "auto" is
    "packed" while its copies take at most AUTO_LIMIT_BYTES, else "dual" under the same limit,
    else "stock". Returns how many layers were swapped. Only for inference: the copies are made
    once and never updated.
    """
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"cpu linear mode must be one of {', '.join(CPU_LINEAR_MODES)}, got {mode!r}")
    linears = [
        item for item in _linears(model)
        if item[2].weight.device.type == "cpu" and item[2].weight.dtype == torch.float32
    ]
    weight_bytes = sum(linear.weight.numel() * linear.weight.element_size() for _, _, linear in linears)
    packed = mkl_packed_available()
    if mode == "auto":
        if packed and weight_bytes * (1 + len(PACKED_ROWS)) <= AUTO_LIMIT_BYTES:
            mode = "packed"
        elif weight_bytes <= AUTO_LIMIT_BYTES:
            mode = "dual"
        else:
            mode = "stock"
            if linears:
                log.info("keeping torch's linear layers: a second layout would take %.0f MB", weight_bytes / 1e6)
    if mode == "stock" or not linears:
        return 0
    rows = PACKED_ROWS if mode == "packed" and packed else ()
    for parent, name, linear in linears:
        setattr(parent, name, CpuLinear(linear, rows))
    copies = 1 + len(rows)
    log.info(
        "CPU linear layers: %d swapped (packed blocks of %s rows), %.0f MB more weight memory",
        len(linears), ", ".join(map(str, rows)) or "no", copies * weight_bytes / 1e6,
    )
    return len(linears)
