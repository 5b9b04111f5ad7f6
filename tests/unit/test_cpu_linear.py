"""CPU linear layers: same outputs as nn.Linear for every plan and block size, on a whole model too."""

from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from oracle_service.config import OracleConfig
from specd.kernels import cpu_linear
from specd.kernels.cpu_linear import (
    FUSED_GROUPS,
    PACKED_ROWS,
    CpuLinear,
    FusedGroup,
    GroupedLinear,
    auto_plans,
    mkl_packed_available,
    onednn_available,
    onednn_product,
    stacked,
    time_plans,
    use_cpu_linear,
)
from specd.models.tiny import build_model
from specd.runtime.kv import KVSession

needs_mkl = pytest.mark.skipif(not mkl_packed_available(), reason="this torch build has no MKL packed GEMM")
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


def _plans() -> list[str]:
    """The plans this torch build can run ("packed" without MKL would be "dual")."""
    return ["dual"] + (["packed"] if mkl_packed_available() else []) + (["onednn"] if onednn_available() else [])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 10, 17])
def test_matches_nn_linear_for_every_plan_and_row_count(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(48, 80, bias=bias)
    for plan in _plans():
        layer = CpuLinear(linear, plan)
        x_t = torch.randn(48, rows).t()  # not contiguous
        for x in (torch.randn(1, rows, 48), torch.randn(rows, 48), torch.randn(2, rows, 48), x_t):
            torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        assert layer.weight.shape == linear.weight.shape and not layer.weight.requires_grad
        assert layer.plan == plan


@needs_onednn
def test_onednn_rows_do_not_depend_on_their_block():
    """A token verified in a block gets exactly the result of a one-token step."""
    torch.manual_seed(0)
    layer = CpuLinear(nn.Linear(64, 96), "onednn")
    block = torch.randn(9, 64)
    full = layer(block)
    for rows in range(1, 10):
        assert torch.equal(layer(block[:rows]), full[:rows])
    assert torch.equal(layer(block[4:5]), full[4:5])


@needs_onednn
@pytest.mark.parametrize("biases", [(False, False, False), (True, False, True)])
def test_a_fused_group_gives_each_member_its_own_product(biases):
    torch.manual_seed(1)
    linears = [nn.Linear(64, out, bias=bias) for out, bias in zip((96, 32, 32), biases)]
    group = FusedGroup(onednn_product(*stacked(linears)), [linear.out_features for linear in linears], linears[0].in_features)
    members = [
        GroupedLinear(linear.in_features, linear.out_features, group, i, weight=linear.weight, bias=linear.bias)
        for i, linear in enumerate(linears)
    ]
    alone = [CpuLinear(linear, "onednn") for linear in linears]
    for rows in (1, 2, 5, 9, 33):
        x = torch.randn(1, rows, 64)
        for order in ([0, 1, 2], [2, 0, 1], [1, 1, 0, 2]):  # a block's order, another, one member twice
            for i in order:
                out = members[i](x)
                assert out.shape == (1, rows, linears[i].out_features)
                torch.testing.assert_close(out, alone[i](x), rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(out, linears[i](x), rtol=1e-5, atol=1e-5)
        y = torch.randn(rows, 64)
        torch.testing.assert_close(members[0](x), alone[0](x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(members[1](y), alone[1](y), rtol=1e-6, atol=1e-6)  # another input: its own product
    x = torch.randn(3, 64)
    for member in members:
        member(x)
    assert group._pass.input is None  # every member read its output: nothing held between passes


@needs_onednn
def test_a_fused_group_keeps_each_threads_pass_apart():
    torch.manual_seed(2)
    linears = [nn.Linear(32, 48, bias=False), nn.Linear(32, 16, bias=False)]
    group = FusedGroup(onednn_product(*stacked(linears)), [linear.out_features for linear in linears], linears[0].in_features)
    members = [
        GroupedLinear(linear.in_features, linear.out_features, group, i, weight=linear.weight, bias=linear.bias)
        for i, linear in enumerate(linears)
    ]
    x, y = torch.randn(4, 32), torch.randn(4, 32)
    first = members[0](x)
    other = threading.Thread(target=lambda: [member(y) for member in members[:1]])  # leaves its pass half read
    other.start()
    other.join()
    torch.testing.assert_close(first, linears[0](x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(members[1](x), linears[1](x), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_packed_blocks_do_not_depend_on_padding():
    """A row's result is the same whether its block is padded or not, and whatever else is in it."""
    torch.manual_seed(0)
    layer = CpuLinear(nn.Linear(64, 96, bias=False), "packed")
    block = torch.randn(9, 64)
    full = layer(block)
    for rows in range(4, 10):
        assert torch.equal(layer(block[:rows]), full[:rows])
    mixed = block.clone()
    mixed[5:] = torch.randn(4, 64)
    assert torch.equal(layer(mixed)[:5], full[:5])
    assert layer.packed_rows == PACKED_ROWS


@pytest.mark.parametrize("mode", ["dual", "packed", "onednn", "auto"])
def test_a_model_keeps_its_logits_and_greedy_path(mode):
    reference = build_model(384, seed=3, layers=2, hidden=64, max_context=256).eval()
    model = build_model(384, seed=3, layers=2, hidden=64, max_context=256).eval()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert use_cpu_linear(model, mode) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    head = model.get_output_embeddings()
    plans = {"packed": "packed" if mkl_packed_available() else "dual", "onednn": "onednn" if onednn_available() else "dual"}
    assert head.plan == plans.get(mode, mode) or mode == "auto" and head.plan in auto_plans(1)
    assert head.packed_rows == (PACKED_ROWS if head.plan == "packed" else ())
    torch.testing.assert_close(head.weight, reference.get_output_embeddings().weight)
    grouped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, GroupedLinear)}
    assert grouped == ({name for names in FUSED_GROUPS for name in names} if head.plan == "onednn" else set())

    prompt = [5, 17, 42, 99, 7, 3]
    sessions = [KVSession(m, torch.device("cpu")) for m in (reference, model)]
    for session in sessions:
        session.forward(prompt)
    for rows in (1, 2, 3, 4, 6, 9, 12):
        block = list(range(20, 20 + rows))
        ref_logits, logits = (s.forward(block) for s in sessions)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        ref_out = reference.generate(ids, max_new_tokens=24, do_sample=False)
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert out.tolist() == ref_out.tolist()


def _weight_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)


def test_modes(monkeypatch):
    def fresh() -> nn.Module:
        return build_model(384, seed=3, layers=1, hidden=32, max_context=64)

    def head_plan(model: nn.Module) -> str:
        return model.get_output_embeddings().plan

    assert use_cpu_linear(fresh(), "stock") == 0
    size = _weight_bytes(fresh())
    monkeypatch.setattr(cpu_linear, "AUTO_LIMIT_BYTES", size - 1)
    assert use_cpu_linear(fresh(), "auto") == 0  # even one copy would exceed the limit
    monkeypatch.undo()
    model = fresh()
    assert use_cpu_linear(model, "dual") > 0 and head_plan(model) == "dual"
    model = fresh()
    assert use_cpu_linear(model, "packed") > 0 and head_plan(model) == ("packed" if mkl_packed_available() else "dual")
    with pytest.raises(ValueError, match="cpu linear mode"):
        use_cpu_linear(fresh(), "fast")
    with pytest.raises(ValidationError):
        OracleConfig(cpu_linear="fast")
    assert OracleConfig(cpu_linear="onednn").cpu_linear == "onednn"


@needs_onednn
def test_auto_takes_the_plan_it_timed_fastest(monkeypatch):
    def fresh() -> nn.Module:
        return build_model(384, seed=3, layers=1, hidden=32, max_context=64)

    assert auto_plans(_weight_bytes(fresh())) == ["onednn", "dual"]
    for fastest in ("onednn", "dual"):
        timed: list[list[str]] = []

        def fake(layers, fastest=fastest, timed=timed):
            timed.append(list(layers))
            assert all(layer.plan == plan for plan, plan_layers in layers.items() for layer in plan_layers)
            return {plan: 0.0 if plan == fastest else 1.0 for plan in layers}

        monkeypatch.setattr(cpu_linear, "time_plans", fake)
        model = fresh()
        assert use_cpu_linear(model, "auto") > 0
        assert timed == [["onednn", "dual"]]
        assert {m.plan for m in model.modules() if isinstance(m, CpuLinear)} == {fastest}
    monkeypatch.undo()
    timings = time_plans({plan: [CpuLinear(nn.Linear(32, 48), plan)] for plan in ("onednn", "dual")}, rows=(1, 4))
    assert set(timings) == {"onednn", "dual"} and all(t > 0 for t in timings.values())
