"""The session KV cache: the same logits as transformers' DynamicCache, with appends that copy nothing."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from specd.models.tiny import build_model
from specd.runtime import kv
from specd.runtime.kv import KVSession, SessionCache

CPU = torch.device("cpu")


def test_forward_and_rollback_match_a_dynamic_cache(monkeypatch):
    monkeypatch.setattr(kv, "SPARE_POSITIONS", 8)  # small room, so the buffers grow several times
    model = build_model(384, seed=2, layers=2, hidden=64, heads=4, kv_heads=2, max_context=512)
    reference, session = KVSession(model, CPU), KVSession(model, CPU)
    reference.cache = DynamicCache()
    assert isinstance(session.cache, SessionCache)
    steps = [
        ("forward", list(range(3, 40))),
        ("forward", [7]),
        ("forward", [8, 9, 10, 11]),
        ("rollback", 39),
        ("forward", list(range(50, 80))),
        ("rollback", 0),
        ("forward", [1, 2, 3]),
        ("forward", list(range(100, 190))),
        ("rollback", 60),
        ("forward", [5, 6]),
    ]
    for action, argument in steps:
        if action == "rollback":
            for s in (reference, session):
                s.rollback(argument)
        else:
            expected, logits = reference.forward(argument), session.forward(argument)
            assert torch.equal(logits, expected)
        assert session.cache.get_seq_length() == reference.cache.get_seq_length() == session.cached_length


def test_appends_write_into_the_room_left():
    model = build_model(384, seed=2, layers=1, hidden=32, heads=4, kv_heads=2, max_context=1024)
    session = KVSession(model, CPU)
    session.forward(list(range(10)))
    layer = session.cache.layers[0]
    buffer = layer._key_buffer.data_ptr()
    room = layer._key_buffer.shape[-2]
    assert room >= 10 + kv.SPARE_POSITIONS
    for token in range(room - 10):  # fills the room exactly: no new buffer
        session.forward([token])
    assert layer._key_buffer.data_ptr() == buffer
    assert layer.keys.data_ptr() == buffer and layer.keys.shape[-2] == room
    session.forward([1])  # one more: a larger buffer, holding everything before
    assert layer._key_buffer.data_ptr() != buffer and layer._key_buffer.shape[-2] > room + 1
    assert session.cache.get_seq_length() == room + 1
