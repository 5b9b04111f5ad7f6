"""Grouped attention for multi-token blocks: the same logits as transformers' SDPA, no KV copy."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_attention

from specd.kernels.attention import GROUPED_SDPA, use_grouped_attention
from specd.models.feature_draft import FeatureDraftModel
from specd.models.tiny import build_model
from specd.runtime.feature_session import FeatureSession
from specd.runtime.kv import KVSession

CPU = torch.device("cpu")
PROMPT = [5, 17, 42, 99, 7, 3, 250, 31]


def _model(kv_heads: int = 2) -> torch.nn.Module:
    return build_model(384, seed=5, layers=2, hidden=64, heads=8, kv_heads=kv_heads, max_context=256)


def _refuse_kv_copies(monkeypatch) -> None:
    def repeat_kv(hidden_states, n_rep):
        if n_rep > 1:
            raise AssertionError(f"key/value heads copied {n_rep} times")
        return hidden_states

    monkeypatch.setattr(sdpa_attention, "repeat_kv", repeat_kv)


def test_blocks_over_a_cache_keep_their_logits():
    reference, model = _model(), _model()
    assert use_grouped_attention(model)
    assert model.config._attn_implementation == GROUPED_SDPA
    sessions = [KVSession(m, CPU) for m in (reference, model)]
    for session in sessions:
        session.forward(PROMPT)
    for rows in (1, 2, 3, 5, 9, 16):
        block = [(20 + 7 * i) % 384 for i in range(rows)]
        ref_logits, logits = (s.forward(block) for s in sessions)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
        if rows % 2:  # keep some blocks, roll others back, as verification does
            for session in sessions:
                session.rollback(session.cached_length - rows + 1)


def test_blocks_attend_without_copying_the_cache(monkeypatch):
    reference, model = _model(), _model()
    use_grouped_attention(model)
    sessions = [KVSession(m, CPU) for m in (reference, model)]
    for session in sessions:
        session.forward(PROMPT)
    _refuse_kv_copies(monkeypatch)
    with pytest.raises(AssertionError, match="copied 4 times"):
        sessions[0].forward([11, 12, 13])  # transformers' own path copies for a masked block
    assert sessions[1].forward([11, 12, 13]).shape == (3, 384)
    assert sessions[1].forward([14]).shape == (1, 384)  # one token: transformers' path, no copy either


def test_padded_batches_generate_the_same():
    reference, model = _model(kv_heads=4), _model(kv_heads=4)
    use_grouped_attention(model)
    ids = torch.tensor([[0, 0, 0, 9, 8, 7, 6], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.inference_mode():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.tolist() == expected.tolist()


def test_only_grouped_sdpa_models_on_a_cpu_are_switched():
    assert not use_grouped_attention(_model(kv_heads=0))  # as many key/value heads as query heads
    eager = _model()
    eager.set_attn_implementation("eager")
    assert not use_grouped_attention(eager)
    assert eager.config._attn_implementation == "eager"
    model = _model()
    assert use_grouped_attention(model)
    assert not use_grouped_attention(model)  # already switched


def test_a_feature_draft_catches_up_the_same():
    oracle = _model()
    reference = FeatureDraftModel(oracle, None).eval()
    draft = copy.deepcopy(reference)
    assert use_grouped_attention(draft)
    assert reference.config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    features = torch.randn(len(PROMPT) - 1, 64)
    lasts = []
    for model in (reference, draft):
        session = FeatureSession(model, CPU)
        session.receive(0, features[:3])
        session.catch_up(PROMPT[:4])
        session.receive(3, features[3:])
        session.catch_up(PROMPT)  # four positions after cached ones: a masked block
        g, logits = session.last
        lasts.append((g, logits, session.step(g, 5)[1]))
    for ref, mine in zip(*lasts):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-4)


def test_a_feature_draft_computes_only_the_logits_asked_for():
    draft = FeatureDraftModel(_model(), None).eval()
    torch.manual_seed(1)
    features, ids = torch.randn(1, 6, 64), torch.tensor([PROMPT[1:7]])
    positions = torch.arange(6)[None]
    with torch.inference_mode():
        g, logits = draft(features, ids, positions)
        g_last, last = draft(features, ids, positions, logits="last")
        g_none, none = draft(features, ids, positions, logits="none")
    assert logits.shape == (1, 6, 384) and last.shape == (1, 1, 384) and none is None
    assert torch.equal(g_last, g) and torch.equal(g_none, g)
    torch.testing.assert_close(last[0, 0], logits[0, -1])


def test_row_exact_attention_gives_each_row_its_one_token_result():
    """A row of a causal block, of a tree, or of a prompt chunk gets bit for bit what a one-token step over a cache of
    exactly the keys it sees gets (torch's block attention does not: its last bits depend on the block)."""
    from specd.kernels.attention import row_exact_attention, rows_keys_of

    torch.manual_seed(3)
    kv_heads, groups, dim, cached, rows = 3, 3, 16, 11, 5
    keys, values = torch.randn(1, kv_heads, cached + rows, dim), torch.randn(1, kv_heads, cached + rows, dim)
    query = torch.randn(1, kv_heads * groups, rows, dim)
    causal = torch.ones(rows, cached + rows, dtype=torch.bool)
    causal[:, cached:] = torch.ones(rows, rows, dtype=torch.bool).tril()
    tree = causal.clone()
    tree[3, cached + 1] = tree[4, cached + 2] = False  # rows 3 and 4 skip a sibling: their keys are not a prefix
    for mask in (causal, tree):
        rows_keys = rows_keys_of(mask[None, None], rows)
        assert rows_keys[0] == cached + 1 and isinstance(rows_keys[2], int)
        block = row_exact_attention(query, keys, values, rows_keys, 0.25)
        for j in range(rows):
            seen = torch.nonzero(mask[j]).flatten()
            alone = row_exact_attention(
                query[:, :, j : j + 1].contiguous(), keys[:, :, seen].contiguous(), values[:, :, seen].contiguous(),
                [None], 0.25,
            )
            assert torch.equal(block[:, j], alone[:, 0])
            expected = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, j : j + 1], keys[:, :, seen].repeat_interleave(groups, 1),
                values[:, :, seen].repeat_interleave(groups, 1), scale=0.25,
            )
            torch.testing.assert_close(block[:, j], expected[:, :, 0], rtol=1e-5, atol=1e-6)
    assert rows_keys_of(None, 1) == [None]
