"""A worker's weights on CPU (`--weights`): in what form its linear layers keep and multiply them.

Every decode step of a model on a CPU reads all of its linear weights, so the bytes per weight set
what one stream can do, and the kernel sets how the cost grows with the rows of a pass (a verify
block, a batch of sessions, a prompt chunk). The kernels:
- "float32": the weights as loaded, through the float32 plan of specd.kernels.cpu_linear
  (`--cpu-linear`).
- "float16": the weights rounded to float16 (half the bytes), multiplied through fbgemm's fp16
  kernel (`torch.ops.quantized.linear_dynamic_fp16`), which widens each weight to float32 as it
  reads it: inputs, products and sums stay float32. A GGUF's Q4_1 and Q8_0 values keep 11
  significant bits (within 2^-12 of their size).
- "int4": a layer whose weights lie on Q4_1 lattices (a Q4_1 GGUF's) as its 4-bit blocks, through
  torch's CPU int4 kernel (specd.kernels.int4_linear; bfloat16 inputs and block scales). It reads
  an eighth of float32's bytes, but its cost grows with each row: from about 32 rows a pass
  (large batches, prompt chunks) float16 is faster.
In each kernel a row's result does not depend on the other rows of its pass (tests/unit/test_weights.py),
and an oracle on CPU attends row by row (specd.kernels.attention.row_exact_attention), so a token gets
the very logits of its one-token step in a verify block, a batch or a prompt chunk, and speculation is
exact against the worker's own output at k = 0. That matters most under int4, which rounds each
layer's input to bfloat16 (8 significant bits): with torch's block attention, whose last bits
depend on the block, such rounding turned them into different tokens (on the default oracle the
speculative output left the k = 0 output at token 28 of 32).

Plans (`--weights`):
- "float32", "float16": every linear layer through that kernel;
- "int4": Q4_1 layers through int4, the others through float16;
- "auto": for a model whose weights came quantized (a GGUF file), each linear layer, or each group
  of sibling layers that read one input (q, k, v; gate, up), through the kernel of `AUTO_KERNELS`
  that costs least per row (per token) over blocks of 1 to 64 rows on this machine, each block size
  counting alike, timed at start-up on every layer in a sweep (so weights come from memory, as in a
  forward pass); for other models, "float32". `AUTO_KERNELS` holds the kernels that held the
  quality bar on the default oracle (docs/weights.md).
Under "float16" the output head's table also serves the input embedding in float16 (rows widened
on lookup), so no float32 copy of the vocabulary stays.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from specd.kernels.cpu_linear import (
    FUSED_GROUPS,
    FusedGroup,
    GroupedLinear,
    Product,
    onednn_available,
    onednn_product,
    stacked,
)
from specd.kernels.int4_linear import int4_available, int4_product, q4_blocks
from specd.kernels.int8_linear import Int8Linear

log = logging.getLogger(__name__)

KERNELS = ("float32", "float16", "int4")
WEIGHTS_PLANS = ("auto", *KERNELS)
# The kernels "auto" chooses among: those that held the quality bar on the default oracle (docs/weights.md).
AUTO_KERNELS = ("float32", "float16", "int4")
# Blocks "auto" times each kernel on: one stream's decode steps and verify blocks, batches, prompt chunks.
TIMED_ROWS = (1, 2, 4, 8, 16, 32, 64)
TIMING_REPEATS = 2
BYTES_PER_WEIGHT = {"float32": 4.0, "float16": 2.0, "int4": 0.5 + 4 / 32}  # int4: two bfloat16 per block of 32


def float16_available() -> bool:
    """Whether this torch build has fbgemm's fp16 linear kernel (x86 builds do)."""
    try:
        product = float16_product(torch.ones(2, 2), None)
        return tuple(product(torch.ones(1, 2)).shape) == (1, 2)
    except (AttributeError, RuntimeError):
        return False


def float16_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """y = x W^T + b for [rows, in] float32 inputs, W rounded to float16, through fbgemm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fbgemm warns when it saturates values beyond float16's range
        packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float().contiguous(), None if bias is None else bias.detach().float()
        )
    return lambda x: torch.ops.quantized.linear_dynamic_fp16(x.float().contiguous(), packed)


def kernel_product(kernel: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Product | None:
    """The kernel's product for one weight, or None where the kernel cannot hold it (int4 off a Q4_1 lattice)."""
    if kernel == "float16":
        return float16_product(weight, bias)
    if kernel == "float32":
        return onednn_product(weight.detach().float().contiguous(), None if bias is None else bias.detach().float())
    if kernel == "int4":
        blocks = q4_blocks(weight)
        return None if blocks is None else int4_product(blocks, bias)
    raise ValueError(f"weights kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


class PlannedLinear(nn.Module):
    """nn.Linear's y = x W^T + b through a kernel's product; the float32 weight is not kept."""

    def __init__(self, in_features: int, out_features: int, product: Product, kernel: str):
        super().__init__()
        self.in_features, self.out_features, self.plan = in_features, out_features, kernel
        self.product = product  # y = x W^T + b for 2-D float inputs [rows, in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        y = self.product(x.reshape(rows, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.plan}"


class HalfEmbedding(nn.Module):
    """An embedding table kept in float16; looked-up rows are widened to float32."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = embedding.weight.detach().to(torch.float16)
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx).float()


@dataclass
class Unit:
    """Linear layers multiplied as one: a group of siblings that read one input, or a single layer."""

    parent: nn.Module
    names: tuple[str, ...]
    layers: list[nn.Linear]

    def shape(self) -> tuple:
        return tuple(layer.out_features for layer in self.layers), self.layers[0].in_features

    def swap(self, kernel: str, product: Product) -> None:
        """Put the layers under `product` (the kernel's, over their `stacked` weights)."""
        if len(self.layers) == 1:
            layer = self.layers[0]
            setattr(self.parent, self.names[0], PlannedLinear(layer.in_features, layer.out_features, product, kernel))
            return
        group = FusedGroup(product, [layer.out_features for layer in self.layers], self.layers[0].in_features)
        for member, (name, layer) in enumerate(zip(self.names, self.layers)):
            setattr(self.parent, name, GroupedLinear(layer.in_features, layer.out_features, group, member, plan=kernel))


def linear_units(model: nn.Module) -> list[Unit]:
    """The model's float nn.Linear layers on CPU, sibling groups (FUSED_GROUPS) joined."""
    units: list[Unit] = []
    for parent in model.modules():
        children = {
            name: child for name, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.is_floating_point()
        }
        for names in FUSED_GROUPS:
            layers = [children.get(name) for name in names]
            if all(layers) and len({layer.in_features for layer in layers}) == 1:
                units.append(Unit(parent, names, layers))
                for name in names:
                    del children[name]
        units += [Unit(parent, (name,), [child]) for name, child in children.items()]
    return units


def time_kernels(units: list[Unit], kernels: list[str], rows: tuple[int, ...] = TIMED_ROWS) -> dict[tuple, dict[str, float]]:
    """Per unit shape, each kernel's seconds per row (per token) for blocks of `rows` rows, summed over the block
    sizes, so that each load counts alike, from one stream's decode steps to a full batch: of each block, the
    fastest of TIMING_REPEATS tries, each try a sweep through every unit in model order (as a forward pass
    reads them, so weights come from memory, not from a warm cache), one kernel after the other. A kernel that
    cannot hold some unit of a shape (int4 off a Q4_1 lattice) is left out of that shape's figures."""
    inputs = {(n, r): torch.randn(r, n) for n in {unit.layers[0].in_features for unit in units} for r in rows}
    best: dict[tuple[str, int, int], float] = {}
    with torch.inference_mode():
        for kernel in kernels:  # one kernel's copies at a time: the start-up peak holds one set beside the model
            products = [kernel_product(kernel, *stacked(unit.layers)) for unit in units]
            for _ in range(TIMING_REPEATS):
                for r in rows:
                    for i, (unit, product) in enumerate(zip(units, products)):
                        if product is None:
                            continue
                        started = time.perf_counter()
                        product(inputs[(unit.layers[0].in_features, r)])
                        took = time.perf_counter() - started
                        best[(kernel, i, r)] = min(best.get((kernel, i, r), took), took)
            del products
    totals: dict[tuple, dict[str, float]] = {}
    for i, unit in enumerate(units):
        shape = totals.setdefault(unit.shape(), dict.fromkeys(kernels, 0.0))
        for kernel in kernels:
            shape[kernel] += sum(best.get((kernel, i, r), math.inf) / r for r in rows)
    return {shape: {k: t for k, t in figures.items() if t < math.inf} for shape, figures in totals.items()}


def available_kernels() -> list[str]:
    return [
        k for k, ok in (("float32", onednn_available), ("float16", float16_available), ("int4", int4_available)) if ok()
    ]


def choose_kernels(units: list[Unit], plan: str, candidates: tuple[str, ...] = AUTO_KERNELS) -> list[str]:
    """Each unit's kernel under `plan` (module docstring); "auto" times the candidates this build has (`time_kernels`)
    and gives each shape its cheapest."""
    if plan in ("float32", "float16"):
        return [plan] * len(units)
    if plan == "int4":
        return ["int4"] * len(units)  # float16 where a unit is off a Q4_1 lattice (use_weights)
    if plan != "auto":
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_PLANS)}, got {plan!r}")
    kernels = [k for k in candidates if k in available_kernels()]
    if len(kernels) < 2:
        return [(kernels or ["float32"])[0]] * len(units)
    timings = time_kernels(units, kernels)
    chosen = {shape: min(t, key=t.__getitem__) for shape, t in timings.items()}
    for (outs, ins), t in timings.items():
        log.info(
            "weights %s x %d, per row in blocks of %s rows, all layers of that shape: %s -> %s", "+".join(map(str, outs)), ins,
            ", ".join(map(str, TIMED_ROWS)), ", ".join(f"{k} {1e3 * s:.1f} ms" for k, s in t.items()),
            chosen[(outs, ins)],
        )
    return [chosen[unit.shape()] for unit in units]


def use_weights(model: nn.Module, plan: str) -> dict[str, int]:
    """Put the model's CPU float linear layers under a weights plan (module docstring). Layers whose kernel is
    "float32" stay nn.Linear, for specd.kernels.cpu_linear to take. Returns how many layers each kernel got."""
    units = linear_units(model)
    kernels = choose_kernels(units, plan)
    if "float16" in kernels and not float16_available():
        raise RuntimeError("this torch build has no fbgemm fp16 kernel: use --weights float32")
    if "int4" in kernels and not int4_available():
        raise RuntimeError("this torch build has no int4 CPU kernels: use --weights float32 or float16")
    counts = dict.fromkeys(KERNELS, 0)
    weights = dict.fromkeys(KERNELS, 0)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_kernel = "float32"
    for unit, kernel in zip(units, kernels):
        if kernel != "float32":
            weight, bias = stacked(unit.layers)
            product = kernel_product(kernel, weight, bias)
            if product is None:  # int4 off a Q4_1 lattice
                kernel, product = "float16", float16_product(weight, bias)
            unit.swap(kernel, product)
        counts[kernel] += len(unit.layers)
        weights[kernel] += sum(layer.weight.numel() for layer in unit.layers)
        if any(layer is head for layer in unit.layers):
            head_kernel = kernel
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head_kernel == "float16" and type(embedding) is nn.Embedding and embedding.weight.device.type == "cpu":
        model.set_input_embeddings(HalfEmbedding(embedding))
    # What is left (norms, small layers) may be views into the mapped weights file; copies of their own let the
    # whole mapping go.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    log.info(
        "weights plan %s: %s", plan,
        ", ".join(
            f"{k} {counts[k]} layers ({weights[k] * BYTES_PER_WEIGHT[k] / 1e6:.0f} MB)" for k in KERNELS if counts[k]
        ),
    )
    return counts


def weights_kernels(model: nn.Module) -> dict[str, int]:
    """How many of the model's linear layers multiply through each kernel (for status and the benchmark)."""
    counts = dict.fromkeys((*KERNELS, "int8"), 0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            counts["float32"] += 1
        elif isinstance(module, Int8Linear):  # a draft's (specd.kernels.int8_linear)
            counts["int8"] += 1
        elif hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "plan"):
            counts[module.plan if module.plan in counts else "float32"] += 1
    return counts


def resolve_plan(plan: str, quantized_source: bool) -> str:
    """"auto" keeps "float32" for a model whose weights came in float; other plans stand."""
    if plan not in WEIGHTS_PLANS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_PLANS)}, got {plan!r}")
    return plan if plan != "auto" or quantized_source else "float32"

