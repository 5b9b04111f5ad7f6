"""Int4 layers for Q4_1-block weights: recovered exactly from the de-quantized floats, close to the float layer,
only where the weights lie on Q4_1 lattices; and speculation stays exact against an oracle run this way."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from oracle_service.config import OracleConfig
from specd.kernels.int4_linear import GROUP, Int4Linear, int4_available, q4_blocks
from specd.kernels.weights import PlannedLinear, use_weights

pytestmark = pytest.mark.skipif(not int4_available(), reason="this torch build has no int4 CPU kernels")
LIMITS = {"max_sessions": 4, "session_ttl_seconds": 60.0, "max_depth": 8}


def on_q4_lattice(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """What de-quantizing Q4_1 blocks gives: each 32 weights of a row d·q + m, q in 0..15 (both ends used)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // GROUP, GROUP)
    low = blocks.amin(-1, keepdim=True)
    step = (blocks.amax(-1, keepdim=True) - low) / 15
    q = torch.randint(0, 16, blocks.shape, generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    return (q * step + low).reshape(rows, cols)


def test_blocks_are_recovered_exactly_and_the_layer_stays_close():
    torch.manual_seed(1)
    linear = nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(on_q4_lattice(linear.weight))
    q, step, low = q4_blocks(linear.weight)
    rebuilt = (q.reshape(96, 4, GROUP).float() * step[..., None] + low[..., None]).reshape(96, 128)
    torch.testing.assert_close(rebuilt, linear.weight.detach(), rtol=0, atol=1e-6)
    layer = Int4Linear(linear, (q, step, low))
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected, got = linear(x), layer(x)
    assert float((got - expected).norm() / expected.norm()) < 0.02  # bfloat16 activations


def test_a_row_is_the_same_alone_or_in_any_block():
    """As for the oneDNN plan: a session's rows in a batched pass compute what they compute alone."""
    torch.manual_seed(2)
    linear = nn.Linear(576, 1536)
    with torch.no_grad():
        linear.weight.copy_(on_q4_lattice(linear.weight))
    layer = Int4Linear(linear, q4_blocks(linear.weight))
    x = torch.randn(9, 576)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        shuffled = layer(x.flip(0)).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, shuffled)


def test_only_layers_on_q4_lattices_are_swapped():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(48, 8))
    with torch.no_grad():
        model[0].weight.copy_(on_q4_lattice(model[0].weight))
    assert q4_blocks(model[1].weight) is None and q4_blocks(model[2].weight) is None  # off-lattice; 48 % 32 != 0
    assert use_weights(model, "int4") == {"float32": 0, "float16": 2, "int4": 1}
    assert all(isinstance(layer, PlannedLinear) for layer in model)
    assert [layer.plan for layer in model] == ["int4", "float16", "float16"]


def test_the_weights_setting():
    assert OracleConfig().weights == "auto"
    assert OracleConfig(weights="int4").model_spec().weights == "int4"
    with pytest.raises(ValidationError):
        OracleConfig(weights="int8")

