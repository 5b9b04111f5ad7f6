"""Dual-layout linear layers: same outputs as nn.Linear for every block size, on a whole model too."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from specd import cpu_linear
from specd.config import OracleConfig
from specd.cpu_linear import DualLayoutLinear, use_dual_layout
from specd.kv import KVSession
from specd.tiny import build_model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_matches_nn_linear_for_every_row_count(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(48, 80, bias=bias)
    dual = DualLayoutLinear(linear)
    for x in (torch.randn(1, rows, 48), torch.randn(rows, 48)):
        torch.testing.assert_close(dual(x), linear(x), rtol=1e-5, atol=1e-5)
    assert dual.weight.shape == linear.weight.shape and not dual.weight_t.requires_grad


def test_a_model_keeps_its_logits_and_greedy_path():
    reference = build_model(384, seed=3, layers=2, hidden=64, max_context=256).eval()
    model = build_model(384, seed=3, layers=2, hidden=64, max_context=256).eval()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert use_dual_layout(model, "dual") == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    head = model.get_output_embeddings()
    torch.testing.assert_close(head.weight, reference.get_output_embeddings().weight)
    torch.testing.assert_close(head.weight_t.t(), head.weight)

    prompt = [5, 17, 42, 99, 7, 3]
    sessions = [KVSession(m, torch.device("cpu")) for m in (reference, model)]
    for session in sessions:
        session.forward(prompt)
    for block in ([11], [12, 13], [14, 15, 16], list(range(20, 29))):  # 1, 2, 3 and 9 rows
        ref_logits, logits = (s.forward(block) for s in sessions)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        ref_out = reference.generate(ids, max_new_tokens=24, do_sample=False)
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert out.tolist() == ref_out.tolist()


def test_modes(monkeypatch):
    model = build_model(384, seed=3, layers=1, hidden=32, max_context=64)
    assert use_dual_layout(model, "stock") == 0
    monkeypatch.setattr(cpu_linear, "AUTO_LIMIT_BYTES", 1024)
    assert use_dual_layout(model, "auto") == 0  # the copies would exceed the limit
    monkeypatch.undo()
    assert use_dual_layout(model, "auto") > 0
    with pytest.raises(ValueError, match="cpu linear mode"):
        use_dual_layout(model, "fast")
    with pytest.raises(ValidationError):
        OracleConfig(cpu_linear="fast")
