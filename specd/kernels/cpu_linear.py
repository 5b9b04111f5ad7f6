"""Linear layers that keep their speed as a verify block grows, on CPU.

A verify pass multiplies a few rows (the block's tokens) by every weight of the model, so its
cost is that of torch's float32 matmul for 1-9 rows, and which kernel is fast for that differs
from one CPU to the next:
- With MKL (torch's BLAS on x86) the kernel depends on the operands' memory layouts: the weight
  as nn.Linear stores it ([out, in]), a transposed copy ([in, out]) and MKL's packed GEMM (the
  weight re-laid out once for a given row count) each win for some row counts on some CPUs,
  and on others a kernel reads the weight once per row, so 2 rows cost twice one.
- oneDNN (torch's other CPU library) multiplies by a weight it re-laid out once, with kernels it
  generates for the CPU it runs on, and costs about the same for any block of a few rows.
The measurements behind this are in docs/design.md ("Verify blocks on a CPU").

So the layer is a plan, and `auto` measures which plan is faster on the machine it runs on:
- "onednn": every call through oneDNN's re-laid-out weight (one more copy of each weight);
- "packed": 1 row and more rows than the largest packed block (prefill) through the [in, out]
  copy, 2-3 rows through the [out, in] weight (torch's own), 4-9 rows through MKL packed
  copies for 4, 6 and 9 rows (a block of 5, 7 or 8 rows is padded with zero rows to the next
  one; rows of a product are independent, so padding changes no row); five copies in all;
- "dual": as "packed" without the packed copies (4-9 rows through the [in, out] copy);
- "stock": torch's nn.Linear.
Every plan is the same arithmetic up to float rounding order. In the "onednn" plan a row's
result does not depend on the other rows of its block, so a verified token gets the same
logits as it would in a one-token step.

Under "onednn" the layers a llama-style block multiplies by one input, one after the other (its
q, k and v projections; its gate and up projections), are also joined into one product
(`FusedGroup`): the weights stacked, one call instead of three or two. Each oneDNN call has a
fixed cost beyond its arithmetic, and a forward pass of the default oracle makes 90 fewer of
them. Each output column is the same dot product as before, so a fused layer's output matches
the separate layers' (the tests check it to float tolerance; measured bit for bit the same on the
default oracle: docs/design.md, "Verify blocks on a CPU").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

Product = Callable[[torch.Tensor], torch.Tensor]  # [rows, in] -> [rows, out]: a layer's y = x W^T + b

# Rows (tokens in a forward pass) for which the [out, in] layout is the faster one under MKL.
STOCK_LAYOUT_ROWS = (2, 3)
# Row counts with a packed weight copy; a block of r rows (r >= 4) uses the smallest one >= r.
PACKED_ROWS = (4, 6, 9)
# "auto" keeps the extra copies only while they take at most this much.
AUTO_LIMIT_BYTES = 3 << 30
CPU_LINEAR_MODES = ("auto", "onednn", "packed", "dual", "stock")
PLANS = ("onednn", "packed", "dual")
# Blocks "auto" times each plan on: verify blocks of 1-9 tokens, and a prompt's prefill.
TIMED_ROWS = (1, 2, 4, 8, 32)
TIMING_REPEATS = 2
# Extra copies of every linear weight each plan keeps.
PLAN_COPIES = {"onednn": 1, "packed": 1 + len(PACKED_ROWS), "dual": 1}
# Sibling layers that read the same input in a llama-style block, in the order it calls them.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def mkl_packed_available() -> bool:
    """Whether this torch build has MKL's packed float32 GEMM (x86 builds with MKL do)."""
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def onednn_available() -> bool:
    """Whether this torch build can multiply by a weight oneDNN re-laid out (x86 and ARM builds can)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), weight, None, "none", [], "")
        return out.shape == (1, 2)
    except (AttributeError, RuntimeError):
        return False


class CpuLinear(nn.Module):
    """nn.Linear's y = x W^T + b computed by a plan (module docstring); W stays as [out, in]."""

    def __init__(self, linear: nn.Linear, plan: str = "dual"):
        super().__init__()
        if plan not in PLANS:
            raise ValueError(f"cpu linear plan must be one of {', '.join(PLANS)}, got {plan!r}")
        self.plan = plan
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        weight = self.weight.detach()
        # Opaque re-laid-out weights, not parameters: they never leave the CPU and are not saved.
        self._onednn = torch.ops.mkldnn._reorder_linear_weight(weight) if plan == "onednn" else None
        self.weight_t = None if plan == "onednn" else nn.Parameter(weight.t().contiguous(), requires_grad=False)
        rows = PACKED_ROWS if plan == "packed" else ()
        self._packed = {r: torch.ops.mkl._mkl_reorder_linear_weight(weight, r) for r in rows}
        self._block_rows: dict[int, int] = {}  # rows of a call -> rows of the packed copy it uses
        for r in range(max(STOCK_LAYOUT_ROWS) + 1, max(rows, default=0) + 1):
            self._block_rows[r] = min(p for p in rows if p >= r)

    @property
    def packed_rows(self) -> tuple[int, ...]:
        return tuple(sorted(self._packed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self._onednn is not None:
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(rows, self.in_features), self._onednn, self.bias, "none", [], ""
            )
            return y.reshape(*x.shape[:-1], self.out_features)
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
            f"plan={self.plan}"
        )


def onednn_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """y = x W^T + b for [rows, in] float32 inputs through oneDNN's re-laid-out copy of `weight`."""
    relaid = torch.ops.mkldnn._reorder_linear_weight(weight)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, relaid, bias, "none", [], "")


def stacked(layers: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of linear layers that read one input, one under the other ([sum(out), in]), and their biases
    (zeros for a layer without; None when none has one): what one product for all of them multiplies by."""
    weight = torch.cat([layer.weight.detach() for layer in layers]) if len(layers) > 1 else layers[0].weight.detach()
    if all(layer.bias is None for layer in layers):
        return weight, None
    return weight, torch.cat([
        layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features) for layer in layers
    ])


class FusedGroup:
    """One product for linear layers that read the same input, shared by their `GroupedLinear`s.

    The first member called with an input computes every member's output and keeps them until each
    member has read its own; a member called with another input (or twice with the same one)
    computes the product again. So the result is right whatever calls the members, in any order,
    and the saving comes where a block calls them in turn on one tensor. The product is any kernel's
    over the members' `stacked` weights: oneDNN's here, others in specd.kernels.weights."""

    def __init__(self, product: Product, sizes: list[int], in_features: int):
        self._product, self.sizes, self.in_features = product, sizes, in_features
        self._pass = threading.local()  # the kept outputs, per thread: models may run on several

    def joined(self, rows: torch.Tensor) -> torch.Tensor:
        """Every member's output side by side, [rows, sum(sizes)], for a 2-D input [rows, in_features]."""
        return self._product(rows)

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        kept = self._pass
        if getattr(kept, "input", None) is not x or member not in kept.unread:
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            y = self._product(x.reshape(rows, self.in_features))  # [rows, sum(out)]
            kept.input, kept.outputs, kept.unread = x, y.split(self.sizes, dim=-1), set(range(len(self.sizes)))
        out = kept.outputs[member]
        kept.unread.discard(member)
        if not kept.unread:  # hold no tensor between passes
            kept.input, kept.outputs = None, ()
        return out.reshape(*x.shape[:-1], self.sizes[member])


class GroupedLinear(nn.Module):
    """A linear layer whose product comes from its FusedGroup; keeps its own weight for reading when given
    one (the float32 plan's layers do; a reduced-precision plan's layers keep none)."""

    plan = "onednn"
    packed_rows: tuple[int, ...] = ()

    def __init__(
        self, in_features: int, out_features: int, group: FusedGroup, member: int,
        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, plan: str = "onednn",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = weight, bias
        self.group, self.member, self.plan = group, member, plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.member)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, member {self.member} of a fused "
            f"group, plan={self.plan}"
        )


def fuse_groups(model: nn.Module) -> int:
    """Join each FUSED_GROUPS set of "onednn" CpuLinear siblings with one input width into a
    FusedGroup; returns how many groups it made."""
    made = 0
    for parent in list(model.modules()):
        for names in FUSED_GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if not all(isinstance(layer, CpuLinear) and layer.plan == "onednn" for layer in layers):
                continue
            if len({layer.in_features for layer in layers}) != 1:
                continue
            group = FusedGroup(
                onednn_product(*stacked(layers)), [layer.out_features for layer in layers], layers[0].in_features
            )
            for member, (name, layer) in enumerate(zip(names, layers)):
                setattr(parent, name, GroupedLinear(
                    layer.in_features, layer.out_features, group, member, weight=layer.weight, bias=layer.bias,
                ))
            made += 1
    return made


def linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) for every plain nn.Linear of the model: what the CPU plans swap."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def auto_plans(weight_bytes: int, limit: int | None = None) -> list[str]:
    """The plans "auto" chooses from: "onednn" where this torch build has it, and "dual", those whose
    copies fit in `limit` bytes (AUTO_LIMIT_BYTES). "packed" is left to be asked for by name: its
    copies take seconds to make for the default oracle, and oneDNN serves 4-9 rows as well."""
    limit = AUTO_LIMIT_BYTES if limit is None else limit
    plans = (["onednn"] if onednn_available() else []) + ["dual"]
    return [p for p in plans if weight_bytes * PLAN_COPIES[p] <= limit]


def time_plans(layers: dict[str, list[CpuLinear]], rows: tuple[int, ...] = TIMED_ROWS) -> dict[str, float]:
    """Seconds each plan's layers take to multiply blocks of `rows` rows by every weight in turn (as a
    forward pass does, so weights come from memory, not from a warm cache): the sum over the block
    sizes of the fastest of TIMING_REPEATS tries, the plans taking turns so that other work on the
    machine weighs on each alike."""
    sizes = {layer.in_features for plan_layers in layers.values() for layer in plan_layers}
    inputs = {(n, r): torch.randn(r, n) for n in sizes for r in rows}
    best = {(plan, r): float("inf") for plan in layers for r in rows}
    with torch.inference_mode():
        for _ in range(TIMING_REPEATS):
            for plan, plan_layers in layers.items():
                for r in rows:
                    started = time.perf_counter()
                    for layer in plan_layers:
                        layer(inputs[(layer.in_features, r)])
                    best[(plan, r)] = min(best[(plan, r)], time.perf_counter() - started)
    return {plan: sum(best[(plan, r)] for r in rows) for plan in layers}


def use_cpu_linear(model: nn.Module, mode: str = "auto") -> int:
    """Swap the float32 nn.Linear layers of an inference model on CPU for CpuLinear of one plan.

    mode: a plan ("onednn" where this build has oneDNN, "packed" where it has MKL, else either is
    "dual"; "dual"), "stock" (swaps nothing), or "auto": of `auto_plans`, the one `time_plans`
    finds fastest on this machine ("stock" when none fits). Under "onednn", sibling layers that
    read one input are then joined (`fuse_groups`). Returns how many layers were swapped. Only
    for inference: the copies are made once and never updated.
    """
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"cpu linear mode must be one of {', '.join(CPU_LINEAR_MODES)}, got {mode!r}")
    linears = [
        item for item in linear_layers(model)
        if item[2].weight.device.type == "cpu" and item[2].weight.dtype == torch.float32
    ]
    weight_bytes = sum(linear.weight.numel() * linear.weight.element_size() for _, _, linear in linears)
    plan = mode
    if mode == "packed" and not mkl_packed_available():
        plan = "dual"
    if mode == "onednn" and not onednn_available():
        log.warning("this torch build cannot run oneDNN's linear layers; keeping two layouts instead")
        plan = "dual"
    plans = auto_plans(weight_bytes) if mode == "auto" else [plan]
    if not plans or plan == "stock" or not linears:
        if linears and mode == "auto":
            log.info("keeping torch's linear layers: a second layout would take %.0f MB", weight_bytes / 1e6)
        return 0
    layers = {p: [CpuLinear(linear, p) for _, _, linear in linears] for p in plans}
    if len(plans) > 1:
        timings = time_plans(layers)
        plan = min(plans, key=timings.__getitem__)
        log.info(
            "CPU linear plans timed on blocks of %s rows: %s",
            ", ".join(map(str, TIMED_ROWS)), ", ".join(f"{p} {1000 * s:.0f} ms" for p, s in timings.items()),
        )
    else:
        plan = plans[0]
    for (parent, name, _), layer in zip(linears, layers[plan]):
        setattr(parent, name, layer)
    fused = fuse_groups(model) if plan == "onednn" else 0
    log.info(
        "CPU linear layers: %d swapped (plan %s%s), %.0f MB more weight memory",
        len(linears), plan, f", {fused} fused groups" if fused else "", PLAN_COPIES[plan] * weight_bytes / 1e6,
    )
    return len(linears)
