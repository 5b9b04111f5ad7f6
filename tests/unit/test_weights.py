"""Weights plans (specd.kernels.weights): each kernel close to float32 within its tolerance for 1 to 64 rows, a
row the same alone or in any block, the GGUF's own blocks recovered exactly, and speculation exact against a
worker run under each plan on tiny models (greedy, and the sampled distribution by chi-square); the default
oracle under its default plan: tests/integration/test_default_pair.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from specd.core.sampling import SamplingParams
from specd.kernels.cpu_linear import stacked
from specd.kernels.int4_linear import GROUP, int4_available, q4_blocks
from specd.kernels.weights import (
    AUTO_KERNELS,
    HalfEmbedding,
    PlannedLinear,
    choose_kernels,
    float16_available,
    kernel_product,
    linear_units,
    resolve_plan,
    use_weights,
    weights_kernels,
)
from specd.models.loader import load_model
from specd.runtime.drafter import Drafter
from specd.runtime.verifier import Verifier
from tests.service.test_stop_rule import assert_pairs_follow, oracle_pair_distribution
from tests.unit.test_int4_linear import on_q4_lattice

pytestmark = pytest.mark.skipif(
    not (float16_available() and int4_available()), reason="this torch build lacks fbgemm fp16 or int4 CPU kernels"
)
LIMITS = {"max_sessions": 8, "session_ttl_seconds": 60.0, "max_depth": 8}
# Relative error of a kernel's product against float32 on the same weights (docs/weights.md): float16 rounds each
# weight within 2^-12 of its size; int4 rounds inputs and block scales to bfloat16 (8 significant bits).
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "int4": 2e-2}
ROWS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64)


def lattice_linear(rows: int, cols: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.copy_(on_q4_lattice(linear.weight, seed))
    return linear


@pytest.mark.parametrize("kernel", ["float32", "float16", "int4"])
def test_each_kernel_is_float32_within_its_tolerance_and_a_row_is_the_same_in_any_block(kernel):
    linear = lattice_linear(96, 128, seed=3)
    product = kernel_product(kernel, linear.weight, linear.bias)
    x = torch.randn(64, 128)
    with torch.no_grad():
        full, reference = product(x), linear(x)
    for rows in ROWS:
        with torch.no_grad():
            block, expected = product(x[:rows]), reference[:rows]
        assert torch.equal(block, full[:rows]), f"{kernel}: a block of {rows} rows changed its rows"
        error = float((block - expected).norm() / expected.norm())
        assert error < TOLERANCE[kernel], f"{kernel} at {rows} rows: relative error {error:.2e}"
    with torch.no_grad():
        for i in (0, 7, 40, 63):
            assert torch.equal(product(x[i : i + 1]), full[i : i + 1])


def test_int4_is_only_for_weights_on_q4_lattices():
    assert kernel_product("int4", nn.Linear(64, 8).weight, None) is None
    with pytest.raises(ValueError):
        kernel_product("int2", nn.Linear(64, 8).weight, None)


def test_a_gguf_q4_1_block_decodes_to_the_same_weights_through_the_int4_path():
    """The embedded oracle's first key projection: its raw Q4_1 blocks (d, m as float16, 32 nibbles) against what
    q4_blocks recovers from the float32 de-quantization the loader makes."""
    gguf = pytest.importorskip("gguf")
    from specd.models.sources import embedded_gguf_path

    try:
        reader = gguf.GGUFReader(embedded_gguf_path())
    except Exception as exc:  # the embedded oracle is optional for unit tests
        pytest.skip(f"no embedded GGUF: {exc}")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, 20)  # per block: d, m (float16), 16 bytes of nibbles
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    nibbles = raw[:, 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int32)  # weights 0-15, then 16-31
    rows = int(tensor.shape[1])
    dequantized = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(rows, -1)
    weight = torch.from_numpy(np.ascontiguousarray(dequantized, dtype=np.float32))
    recovered_q, step, low = q4_blocks(weight)
    rebuilt = (recovered_q.reshape(rows, -1, GROUP).float() * step[..., None] + low[..., None]).reshape(rows, -1)
    expected = torch.from_numpy((q * d[:, None] + m[:, None]).astype(np.float32).reshape(rows, -1))
    assert torch.equal(weight, expected)  # the float32 path, from the raw blocks
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-6)  # the int4 path's blocks, the same weights


def tiny_on_lattice(tiny_dir):
    oracle = load_model(str(tiny_dir / "oracle"))
    with torch.no_grad():
        for module in oracle.model.modules():
            if type(module) is nn.Linear and module.in_features % GROUP == 0 and module.out_features < 256:
                module.weight.copy_(on_q4_lattice(module.weight))
    return oracle


def test_plans_swap_what_they_say_and_fuse_siblings(tiny_dir):
    oracle = tiny_on_lattice(tiny_dir)
    units = linear_units(oracle.model)
    assert any(unit.names == ("q_proj", "k_proj", "v_proj") for unit in units)
    counts = use_weights(oracle.model, "int4")
    assert counts["int4"] > 0 and counts["float16"] > 0 and counts["float32"] == 0
    assert weights_kernels(oracle.model) == {**counts, "int8": 0}
    assert isinstance(oracle.model.get_output_embeddings(), PlannedLinear)
    assert not any(type(m) is nn.Linear for m in oracle.model.modules())

    halved = load_model(str(tiny_dir / "oracle"))
    assert use_weights(halved.model, "float16")["float16"] > 0
    assert isinstance(halved.model.get_input_embeddings(), HalfEmbedding)  # the head went float16: so does the table


def test_auto_times_only_the_kernels_that_held_the_quality_bar(tiny_dir):
    oracle = tiny_on_lattice(tiny_dir)
    units = linear_units(oracle.model)
    chosen = choose_kernels(units, "auto")
    assert set(chosen) <= set(AUTO_KERNELS)
    assert all(k in ("float32", "float16") for unit, k in zip(units, chosen) if q4_blocks(stacked(unit.layers)[0]) is None)
    assert choose_kernels(units, "auto", candidates=("float16",)) == ["float16"] * len(units)
    assert resolve_plan("auto", quantized_source=False) == "float32"
    assert resolve_plan("auto", quantized_source=True) == "auto"
    assert resolve_plan("int4", quantized_source=False) == "int4"


@pytest.mark.parametrize("plan", ["float16", "int4"])
def test_speculation_is_exact_against_the_worker_under_each_plan(tiny_dir, plan):
    oracle = tiny_on_lattice(tiny_dir)
    use_weights(oracle.model, plan)
    verifier = Verifier(oracle, **LIMITS)
    drafter = Drafter(load_model(str(tiny_dir / "unrelated")), **LIMITS)
    prompt, greedy = [5, 17, 42, 8, 99, 3], SamplingParams()
    verifier.open("alone", prompt, greedy)
    alone: list[int] = []
    for _ in range(24):
        alone += verifier.verify("alone", [], [], 0).verdict.committed([])
    for k in (1, 3, 6):
        session = f"spec{k}"
        verifier.open(session, prompt, greedy)
        drafter.open(session, prompt, greedy)
        spec: list[int] = []
        append: list[int] = []
        while len(spec) < 24:
            proposal = drafter.propose(session, append, 0, k)
            append = verifier.verify(session, proposal.tokens, [], 0).verdict.committed(proposal.tokens)
            spec += append
        assert spec[:24] == alone, f"k={k}"


@pytest.mark.parametrize("plan", ["float16", "int4"])
def test_sampled_output_keeps_the_distribution_of_the_worker_under_each_plan(tiny_dir, plan):
    """The first two tokens of speculative sampling against the planned oracle, over 800 seeds, follow that
    oracle's own distribution (chi-square over the pairs)."""
    oracle = tiny_on_lattice(tiny_dir)
    use_weights(oracle.model, plan)
    draft = load_model(str(tiny_dir / "unrelated"))
    params = SamplingParams(temperature=2.0, top_k=3)
    prompt = [5, 17, 42, 8, 99, 3]
    verifier, drafter = Verifier(oracle, **LIMITS), Drafter(draft, **LIMITS)
    vocab = oracle.vocab_size
    trials = 800
    counts = np.zeros((vocab, vocab))
    for seed in range(trials):
        session, trial = f"t{seed}", dataclasses.replace(params, seed=seed)
        verifier.open(session, prompt, trial)
        drafter.open(session, prompt, trial)
        out: list[int] = []
        appended: list[int] = []
        while len(out) < 2:
            proposal = drafter.propose(session, appended, 0, 2)
            rows = [(d.token_ids, d.probs) for d in proposal.distributions]
            appended = verifier.verify(session, proposal.tokens, rows, 0).verdict.committed(proposal.tokens)
            out += appended
        counts[out[0], out[1]] += 1
        drafter.close(session)
        verifier.close(session)
    assert_pairs_follow(counts, oracle_pair_distribution(oracle, params, prompt), trials)
