"""Continuous batching on the draft (specd.runtime.engine's DraftEngine, specd.runtime.draft_pass): the draft steps
of every session share forward passes, a session leaves when its block ends, and each session's proposal is the one
it makes alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from specd.core import tree
from specd.core.sampling import SamplingParams
from specd.core.stopping import StopRule
from specd.kernels.cpu_linear import onednn_available
from specd.kernels.int8_linear import int8_available, use_int8_linear
from specd.runtime.batch import Segment
from specd.runtime.draft_pass import DraftRows
from specd.runtime.drafter import Drafter, DraftProposal
from specd.runtime.engine import DraftEngine, StepStats
from specd.runtime.executor import ModelExecutor
from specd.runtime.kv import SessionCache
from specd.runtime.loading import load_worker_model
from specd.runtime.model_spec import ModelSpec
from specd.runtime.verifier import Verifier
from specd.runtime.worker import PositionFeatures

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
LIMITS = {"max_sessions": 16, "session_ttl_seconds": 60.0, "max_depth": 16}
CPU_LINEAR = "onednn" if onednn_available() else "stock"
# Expects every position accepted half the time and computes a further one only while the whole block's chance
# stays at 0.2: a block of 3 tokens, whatever k.
SHORT_STOP = StopRule(0.0, calibration=(0.5,), extend_survival=0.2)


def drafter(tiny_dir: Path, name: str, *, lookup: tuple[int, int] | None = None, int8: bool = False) -> Drafter:
    loaded = load_worker_model(ModelSpec(str(tiny_dir / name), cpu_linear="stock" if int8 else CPU_LINEAR))
    if int8:
        assert use_int8_linear(loaded.model, min_elements=0) > 0
    return Drafter(loaded, lookup_ngram=lookup, proposal_top_n=16, **LIMITS)


def prompt_features(tiny_dir: Path, prompts: dict[str, list[int]]) -> dict[str, PositionFeatures]:
    """The oracle's features for each prompt, as a feature draft's session is opened with them."""
    verifier = Verifier(load_worker_model(ModelSpec(str(tiny_dir / "oracle"), cpu_linear=CPU_LINEAR)), **LIMITS)
    features = {}
    for sid, prompt in prompts.items():
        result = verifier.open(sid, prompt, GREEDY, return_features=True)
        assert result.features is not None
        features[sid] = result.features
    return features


def same(a: DraftProposal, b: DraftProposal) -> None:
    assert (a.tokens, a.parents, a.looked_up, a.model_steps) == (b.tokens, b.parents, b.looked_up, b.model_steps)
    assert [(d.token_ids, d.probs) for d in a.distributions] == [(d.token_ids, d.probs) for d in b.distributions]
    assert a.confidences == b.confidences


async def batched(
    worker: Drafter, opens: dict, rounds: list[tuple], steps: list[StepStats], **settings
) -> list[DraftProposal]:
    engine = DraftEngine(worker, ModelExecutor("test-draft-engine"), on_step=steps.append, **settings)
    try:
        await asyncio.gather(*(engine.open(sid, prompt, params, features=f) for sid, (prompt, params, f) in opens.items()))
        steps.clear()
        return list(await asyncio.gather(*(engine.propose(*args, **kwargs) for args, kwargs in rounds)))
    finally:
        await engine.stop()


def alone(worker: Drafter, opens: dict, rounds: list[tuple]) -> list[DraftProposal]:
    for sid, (prompt, params, f) in opens.items():
        worker.open(sid, prompt, params, features=f)
    return [worker.propose(*args, **kwargs) for args, kwargs in rounds]


@pytest.mark.skipif(not onednn_available(), reason="rows independent of their block need the oneDNN plan")
async def test_standalone_draft_sessions_batched_equal_each_alone(tiny_dir):
    """Chains of several depths, a sampled chain, prompt lookup and a stop rule that ends one block early, in shared
    passes; then a second round after each session's block is partly accepted (a rollback in a batch)."""
    prompts = {
        "greedy": ([(3 * i) % 200 + 1 for i in range(40)], GREEDY),
        "sampled": ([5, 9, 13, 2, 7] * 6, SAMPLED),
        "short": (list(range(10, 90)), GREEDY),
        "stopped": (list(range(100, 131)), GREEDY),
    }
    opens = {sid: (prompt, params, None) for sid, (prompt, params) in prompts.items()}
    first = [
        (("greedy", [], 0, 6), {}), (("sampled", [], 0, 5), {}), (("short", [], 0, 1), {}),
        (("stopped", [], 0, 8), {"stop": SHORT_STOP}),
    ]
    steps: list[StepStats] = []
    solo = drafter(tiny_dir, "oracle", lookup=(2, 3))
    expected = alone(solo, opens, first)
    got = await batched(drafter(tiny_dir, "oracle", lookup=(2, 3)), opens, first, steps)
    for a, b in zip(got, expected):
        same(a, b)
    assert len(expected[3].tokens) == 3  # the stop rule ended that block early
    assert max(step.sessions for step in steps) >= 3  # the sessions' draft steps shared passes
    assert steps[-1].sessions < steps[0].sessions  # and sessions left as their blocks ended


@pytest.mark.skipif(not onednn_available(), reason="rows independent of their block need the oneDNN plan")
async def test_feature_draft_chains_and_trees_batched_equal_each_alone(tiny_dir):
    prompts = {"chain": list(range(1, 30)), "tree": list(range(40, 52)), "sampled": list(range(60, 100)), "one": [7]}
    features = prompt_features(tiny_dir, prompts)
    params = {"chain": GREEDY, "tree": GREEDY, "sampled": SAMPLED, "one": GREEDY}
    opens = {sid: (prompt, params[sid], features[sid]) for sid, prompt in prompts.items()}
    rounds = [
        (("chain", [], 0, 5), {}), (("tree", [], 0, 7), {"tree_width": 3}), (("sampled", [], 0, 4), {}),
        (("one", [], 0, 3), {}),
    ]
    steps: list[StepStats] = []
    expected = alone(drafter(tiny_dir, "feature"), opens, rounds)
    # A prompt chunk of 16 positions: the long prompts' opens take several steps, beside the others.
    got = await batched(drafter(tiny_dir, "feature"), opens, rounds, steps, prefill_chunk_tokens=16)
    for a, b in zip(got, expected):
        same(a, b)
    assert expected[1].parents and not tree.is_chain(expected[1].parents)
    assert max(step.sessions for step in steps) == len(rounds)


@pytest.mark.skipif(not int8_available(), reason="this torch build has no quantized CPU kernels")
async def test_an_int8_draft_batched_equals_each_alone(tiny_dir):
    """Int8 layers quantize each row with its own scale, so a sampled session's q does not change with the batch."""
    opens = {f"s{i}": ([(i * 17 + j) % 250 + 1 for j in range(12 + 5 * i)], SAMPLED if i % 2 else GREEDY, None) for i in range(5)}
    rounds = [((sid, [], 0, 2 + i), {}) for i, sid in enumerate(opens)]
    expected = alone(drafter(tiny_dir, "oracle", int8=True), opens, rounds)
    got = await batched(drafter(tiny_dir, "oracle", int8=True), opens, rounds, [])
    for a, b in zip(got, expected):
        same(a, b)


async def test_without_batching_each_step_serves_one_session(tiny_dir):
    opens = {sid: ([1, 2, 3, 4], GREEDY, None) for sid in "abc"}
    steps: list[StepStats] = []
    got = await batched(drafter(tiny_dir, "unrelated"), opens, [((sid, [], 0, 3), {}) for sid in "abc"], steps, batching=False)
    assert all(len(p.tokens) == 3 for p in got)
    assert {step.sessions for step in steps} == {1} and len(steps) == 9


async def test_a_bad_proposal_fails_alone_and_a_cancelled_one_leaves(tiny_dir):
    worker = drafter(tiny_dir, "unrelated")
    engine = DraftEngine(worker, ModelExecutor("test-draft-engine"))
    await engine.open("ok", [1, 2, 3], GREEDY)
    good, missing, desync = await asyncio.gather(
        engine.propose("ok", [], 3, 4), engine.propose("missing", [], 0, 2), engine.propose("ok", [], 99, 2),
        return_exceptions=True,
    )
    assert isinstance(good, DraftProposal) and len(good.tokens) == 4
    assert type(missing).__name__ == "NotFound" and type(desync).__name__ == "FailedPrecondition"
    task = asyncio.ensure_future(engine.propose("ok", [good.tokens[0]], 4, 16))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await engine.propose("ok", [], 0, 2)  # the session goes on from its committed tokens
    assert len(after.tokens) == 2 and engine.queued == 0
    await engine.stop()


def test_a_feature_pass_needs_each_rows_features(tiny_dir):
    worker = drafter(tiny_dir, "feature")
    with pytest.raises(ValueError, match="features"):
        worker.forward([DraftRows(Segment(SessionCache(), [1], [0]))])
