"""Continuous batching on the oracle (specd.runtime.engine, specd.runtime.batch): a session's rows in a shared
forward pass are decided exactly as when it runs alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from specd.core.sampling import SamplingParams
from specd.kernels.cpu_linear import onednn_available
from specd.runtime.engine import OracleEngine, StepStats
from specd.runtime.executor import ModelExecutor
from specd.runtime.loading import load_worker_model
from specd.runtime.model_spec import ModelSpec
from specd.runtime.verifier import Verifier, VerifyResult

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
LONG_PROMPT = [(7 * i) % 300 + 1 for i in range(150)]


def make_verifier(tiny_dir: Path) -> Verifier:
    loaded = load_worker_model(ModelSpec(str(tiny_dir / "oracle"), cpu_linear="onednn" if onednn_available() else "stock"))
    return Verifier(loaded, max_sessions=16, session_ttl_seconds=60, max_depth=16)


def open_sessions(verifier: Verifier) -> None:
    verifier.open("chain", list(range(1, 20)), GREEDY, return_features=True)
    verifier.open("tree", list(range(30, 41)), GREEDY, return_features=True)
    verifier.open("k0", [5, 9, 13], GREEDY, return_features=True)
    verifier.open("sampled", list(range(50, 75)), SAMPLED, return_features=True)


# (session, draft tokens, proposal distributions, parents): every kind of work a step can hold
ROUND = [
    ("chain", [21, 22, 23], [], []),
    ("tree", [41, 42, 43, 44, 45], [], [-1, -1, 0, 1, 1]),
    ("k0", [], [], []),
    ("sampled", [80, 81], [([80, 3], [0.75, 0.25]), ([81], [1.0])], []),
]


def same(a: VerifyResult, b: VerifyResult, bitwise: bool) -> None:
    assert (a.verdict, a.committed_length, a.path) == (b.verdict, b.committed_length, b.path)
    assert a.features is not None and b.features is not None and a.features.start == b.features.start
    if bitwise:
        assert torch.equal(a.features.rows, b.features.rows)
    else:
        torch.testing.assert_close(a.features.rows, b.features.rows)


async def test_a_batched_step_equals_each_session_alone(tiny_dir):
    """Mixed depths, a tree, a k = 0 step, a sampled chain and a new prompt's chunks in one pass; under the
    oneDNN plan each session's results are bit for bit those of passes of its own."""
    bitwise = onednn_available()
    alone = make_verifier(tiny_dir)
    open_sessions(alone)
    expected = [alone.verify(sid, tokens, dists, 0, parents) for sid, tokens, dists, parents in ROUND]
    expected_open = alone.open("long", LONG_PROMPT, GREEDY, return_features=True)

    batched = make_verifier(tiny_dir)
    open_sessions(batched)
    steps: list[StepStats] = []
    engine = OracleEngine(batched, ModelExecutor("test-engine"), prefill_chunk_tokens=64, on_step=steps.append)
    results = await asyncio.gather(
        *(engine.verify(sid, tokens, dists, 0, parents) for sid, tokens, dists, parents in ROUND),
        engine.open("long", LONG_PROMPT, GREEDY, return_features=True),
    )
    # One step held all four blocks and the prompt's first chunk; the prompt's other chunks followed.
    assert steps[0].sessions == 5 and steps[0].prefill_rows == 64
    assert [s.prefill_rows for s in steps[1:]] == [64, len(LONG_PROMPT) - 1 - 128]
    for got, want in zip(results[:4], expected):
        same(got, want, bitwise)
        assert got.step_sessions == 5 and got.row_seconds >= 0  # the load each round met, for the depth policy
    opened = results[4]
    assert opened.features is not None and expected_open.features is not None
    if bitwise:
        assert torch.equal(opened.features.rows, expected_open.features.rows)
    # The sessions go on as they would have alone: a second round after the batched one.
    follow = [("chain", [5], [], []), ("long", [1, 2], [], [])]
    want = [alone.verify(sid, tokens, dists, 0, parents) for sid, tokens, dists, parents in follow]
    got = await asyncio.gather(*(engine.verify(sid, tokens, dists, 0, parents) for sid, tokens, dists, parents in follow))
    for a, b in zip(got, want):
        same(a, b, bitwise)
    await engine.stop()


async def test_sessions_join_and_leave_between_steps(tiny_dir):
    verifier = make_verifier(tiny_dir)
    engine = OracleEngine(verifier, ModelExecutor("test-engine"))
    await engine.open("a", [1, 2, 3, 4], GREEDY)
    first = await engine.verify("a", [5, 6], [], 0)
    await engine.open("b", [9, 8, 7], GREEDY)  # joins after a's first round
    a2, b1 = await asyncio.gather(engine.verify("a", [], [], first.committed_length), engine.verify("b", [1], [], 3))
    assert a2.committed_length == first.committed_length + 1 and b1.committed_length >= 4
    verifier.close("a")  # leaves; b goes on alone
    b2 = await engine.verify("b", [], [], b1.committed_length)
    assert b2.committed_length == b1.committed_length + 1
    await engine.stop()


async def test_two_rounds_of_one_session_never_share_a_step(tiny_dir):
    """A caller that sends a session's next block before the last one's verdict gets them in order, one step each."""
    verifier = make_verifier(tiny_dir)
    steps: list[StepStats] = []
    engine = OracleEngine(verifier, ModelExecutor("test-engine"), on_step=steps.append)
    await engine.open("s", [1, 2, 3], GREEDY)
    steps.clear()
    first, second = await asyncio.gather(engine.verify("s", [], [], 3), engine.verify("s", [], [], 4))
    assert (first.committed_length, second.committed_length) == (4, 5)
    assert [s.sessions for s in steps] == [1, 1]
    await engine.stop()


async def test_a_mistake_fails_its_own_job_only(tiny_dir):
    from specd.core.errors import FailedPrecondition, NotFound

    verifier = make_verifier(tiny_dir)
    engine = OracleEngine(verifier, ModelExecutor("test-engine"))
    await engine.open("ok", [1, 2, 3], GREEDY)
    results = await asyncio.gather(
        engine.verify("ok", [4], [], 3), engine.verify("missing", [1], [], 0), engine.verify("ok", [4], [], 99),
        return_exceptions=True,
    )
    assert isinstance(results[0], VerifyResult)
    assert isinstance(results[1], NotFound) and isinstance(results[2], FailedPrecondition)
    await engine.stop()


async def test_a_long_prompt_holds_other_rounds_back_by_one_chunk_at_most(tiny_dir):
    verifier = make_verifier(tiny_dir)
    steps: list[StepStats] = []
    engine = OracleEngine(verifier, ModelExecutor("test-engine"), prefill_chunk_tokens=16, on_step=steps.append)
    await engine.open("short", [1, 2, 3], GREEDY)
    steps.clear()
    # Steps done when each job reached the model thread's notice (the model thread reads this flag after each
    # step): counted there, a step that starts between the caller's reading and its job's arrival is not charged.
    arrivals: list[int] = []
    notice = engine._arrived.set

    def noted() -> None:
        arrivals.append(len(steps))
        notice()

    engine._arrived.set = noted
    opening = asyncio.ensure_future(engine.open("long", LONG_PROMPT, GREEDY))
    committed = 3
    waited: list[int] = []  # steps that ran between a round's arrival and its verdict
    while not opening.done():
        committed = (await engine.verify("short", [], [], committed)).committed_length
        waited.append(len(steps) - arrivals[-1])
    await opening
    # The prompt took ceil(149 / 16) = 10 chunks, at most one per step; a round waited for the step in
    # progress when it arrived (one chunk) and then ran in the next.
    assert len([s for s in steps if s.prefill_rows]) == 10
    assert all(s.prefill_rows <= 16 for s in steps)
    assert waited and max(waited) <= 2
    await engine.stop()


@pytest.mark.parametrize("batching", [False])
async def test_without_batching_each_step_serves_one_session(tiny_dir, batching):
    verifier = make_verifier(tiny_dir)
    steps: list[StepStats] = []
    engine = OracleEngine(verifier, ModelExecutor("test-engine"), batching=batching, on_step=steps.append)
    for sid in ("a", "b", "c"):
        await engine.open(sid, [1, 2, 3], GREEDY)
    steps.clear()
    await asyncio.gather(*(engine.verify(sid, [4], [], 3) for sid in ("a", "b", "c")))
    assert [s.sessions for s in steps] == [1, 1, 1]
    await engine.stop()


def test_the_step_window_keeps_the_least_squares_slope_and_load_as_steps_come_and_go(monkeypatch):
    from specd.runtime import engine as engine_module

    now = [0.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: now[0])
    window = engine_module.StepWindow(seconds=5.0)
    assert window.row_seconds() == 0.0 and window.load(3).rows_per_step == 0.0
    steps = [(rows, 0.02 + 0.001 * rows + 0.0001 * (i % 3)) for i, rows in enumerate([1, 4, 9, 4, 16, 1, 8, 2])]
    for i, (rows, seconds) in enumerate(steps):
        now[0] = float(i)
        window.add(rows, seconds)
    recent = steps[-6:]  # steps 2..7 are within 5 s of t = 7
    mean_r = sum(r for r, _ in recent) / 6
    mean_s = sum(s for _, s in recent) / 6
    slope = sum((r - mean_r) * (s - mean_s) for r, s in recent) / sum((r - mean_r) ** 2 for r, _ in recent)
    assert window.row_seconds() == pytest.approx(slope, rel=1e-9)
    load = window.load(2)
    assert load.queued == 2 and load.rows_per_step == pytest.approx(mean_r) and load.step_seconds == pytest.approx(mean_s)
    now[0] = 100.0
    assert window.load(0).rows_per_step == 0.0 and window.row_seconds() == 0.0


@pytest.mark.parametrize("weights", ["float32", "float16"])  # layers of their own; fused groups' one product
def test_the_lean_llama_layers_give_the_bits_of_transformers_own(tiny_dir, monkeypatch, weights):
    """With row-by-row attention an oracle's packed passes run `_llama_layers` in place of each layer's own forward:
    a prompt, one-token steps, a verify block and a batch of two sessions give the very same hidden states both
    ways."""
    from specd.runtime import batch as packed
    from specd.runtime.kv import SessionCache

    loaded = load_worker_model(ModelSpec(str(tiny_dir / "oracle"), weights=weights))
    assert packed.use_packed_attention(loaded.model)
    packed.use_row_exact_attention(loaded.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights other than ones, as a trained model's
        for name, param in loaded.model.named_parameters():
            if "norm" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))

    def run() -> list[torch.Tensor]:
        cache, other, out = SessionCache(), SessionCache(), []
        with torch.inference_mode():
            out += packed.packed_forward(loaded.model, [packed.Segment(cache, list(range(1, 40)), list(range(39)))])
            for step in range(3):
                out += packed.packed_forward(loaded.model, [packed.Segment(cache, [50 + step], [39 + step])])
            out += packed.packed_forward(loaded.model, [packed.Segment(cache, [7, 8, 9, 10], [42, 43, 44, 45])])
            out += packed.packed_forward(loaded.model, [  # a batch: another session's prompt beside a tree
                packed.Segment(other, list(range(60, 70)), list(range(10))),
                packed.Segment(cache, [11, 12, 13], [46, 47, 47], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool()),
            ])
        return out

    lean = run()
    own_forward = packed.PackedPass.layers
    monkeypatch.setattr(packed.PackedPass, "layers", lambda self, *args, lean=False: own_forward(self, *args))
    assert all(torch.equal(a, b) for a, b in zip(lean, run(), strict=True))
