"""Int8 linear layers for a draft on CPU.

A draft's arithmetic decides only how often the oracle accepts its guesses, never what the
oracle writes: the verifier accepts a greedy token when it is the oracle's own argmax, and a
sampled one by the proposal distribution q the draft sends with it, whatever computed q. So a
draft may trade a little precision for speed where the oracle may not.

On a CPU a draft step multiplies one to a few rows by every weight of the draft, so its cost is
mostly reading the weights: for the default feature draft 36 MB of float32 per step (its 8192-row
output head, one decoder layer and the layer that joins token and feature; measured share of a
step: docs/design.md, "A draft's layers in int8"). `Int8Linear` keeps each weight as int8 with
one scale per output row (a quarter of float32's bytes) and multiplies through torch's quantized
CPU kernels (fbgemm on x86), quantizing each input row to 8 bits on the fly with a scale of its
own ("dynamic" quantization). The inputs use 7 of their 8 bits, so that the kernels' 16-bit pairwise
sums cannot saturate on CPUs without VNNI.

The kernel itself picks one scale for a whole input block, which would make a row's result depend
on the other rows of its block: a session's proposals would change with what else a batched draft
step holds (specd.runtime.engine). So each row is first divided by its own largest magnitude, and a
fixed row holding +1 and -1 joins the block, which pins the block's range to [-1, 1] whatever the
other rows; the output rows are multiplied back. A row's result is then the same, bit for bit,
alone or in any block.

One scale per input row suits inputs of one kind (a normalised hidden state), not the feature
draft's join of an embedding and a feature, whose scales differ widely: with that layer in int8
acceptance fell (docs/design.md, "A draft's layers in int8"); models list such layers in
`int8_exempt`.

The quantized tensor functions these layers rely on are deprecated in torch; where they are
missing, `use_int8_linear` leaves the layers as they are and says so.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from specd.kernels.cpu_linear import linear_layers

log = logging.getLogger(__name__)

# Smaller layers gain little from a quarter of the bytes.
MIN_WEIGHT_ELEMENTS = 1 << 16


class Int8Linear(nn.Module):
    """nn.Linear's y = x W^T + b with W as int8 per output row and x quantized per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(
                weight, scales, torch.zeros_like(scales, dtype=torch.long), axis=0, dtype=torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self._range_row = torch.zeros(1, self.in_features)  # pins the block's range to [-1, 1]
        self._range_row[0, 0], self._range_row[0, -1] = 1.0, -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        peak = torch.linalg.vector_norm(flat, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)
        block = torch.cat([flat / peak, self._range_row])
        y = torch.ops.quantized.linear_dynamic(block, self._packed, True)[:-1].mul_(peak)  # True: inputs in 7 bits
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output row"


def int8_available() -> bool:
    """Whether this torch build runs the quantized CPU kernels."""
    try:
        layer = Int8Linear(nn.Linear(4, 2))
        return tuple(layer(torch.ones(1, 4)).shape) == (1, 2)
    except Exception:
        return False


def use_int8_linear(model: nn.Module, min_elements: int = MIN_WEIGHT_ELEMENTS) -> int:
    """Swap a CPU float model's nn.Linear layers of at least `min_elements` weights for Int8Linear,
    except those whose names the model lists in `int8_exempt` (layers whose input a per-block scale
    would serve badly). Only for drafts (module docstring) and inference. Returns how many layers
    were swapped."""
    exempt = set(getattr(model, "int8_exempt", ()))
    linears = [
        (parent, name, child)
        for parent, name, child in linear_layers(model)
        if child.weight.device.type == "cpu"
        and child.weight.is_floating_point()
        and child.weight.numel() >= min_elements
        and name not in exempt
    ]
    if not linears:
        return 0
    if not int8_available():
        log.warning("this torch build has no quantized CPU kernels; the draft keeps float weights")
        return 0
    saved = 0
    for parent, name, linear in linears:
        setattr(parent, name, Int8Linear(linear))
        saved += linear.weight.numel() * (linear.weight.element_size() - 1)
    log.info("draft linear layers in int8: %d swapped, %.0f MB less weight to read per step", len(linears), saved / 1e6)
    return len(linears)
