"""Greedy speculative output equals the oracle's own greedy output, over real loopback gRPC."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.depth import FixedDepth
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import SessionRequest, SpeculativeSession, run_to_completion
from specd.models.tiny import build_tokenizer
from specd.v1 import common_pb2
from tests.conftest import greedy_reference

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Once upon a time there was",
    "Question: what is two plus two?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The oracle alone, through plain transformers greedy generate."""
    tokenizer = build_tokenizer()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        out[prompt] = (ids, greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS))
    return out


async def generate(oracle_addr, draft_addr, prompt_ids, k):
    oracle, draft = OracleClient(oracle_addr), DraftClient(draft_addr)
    try:
        session = SpeculativeSession(
            SessionRequest(prompt=prompt_ids, sampling=common_pb2.SamplingParams(), max_tokens=MAX_TOKENS),
            draft,
            oracle,
            FixedDepth(k),
        )
        tokens = await run_to_completion(session)
        return tokens, session.stats
    finally:
        await oracle.close()
        await draft.close()


@pytest.mark.parametrize("k", range(1, 9))
async def test_identical_draft_is_exact_and_fully_accepted(oracle, same_draft, reference, k):
    for prompt, (ids, expected) in reference.items():
        tokens, stats = await generate(oracle.address, same_draft.address, ids, k)
        assert tokens == expected, prompt
        assert stats.accepted == stats.drafted > 0
        assert stats.acceptance_rate == 1.0


@pytest.mark.parametrize("k", range(1, 9))
async def test_unrelated_draft_is_exact(oracle, unrelated_draft, reference, k):
    accepted = drafted = 0
    for prompt, (ids, expected) in reference.items():
        tokens, stats = await generate(oracle.address, unrelated_draft.address, ids, k)
        assert tokens == expected, prompt
        accepted += stats.accepted
        drafted += stats.drafted
    assert accepted / drafted < 0.2


@pytest.mark.parametrize("k", range(1, 9))
async def test_prompt_lookup_is_exact(oracle, lookup_draft, reference, k):
    """The unrelated draft's own guesses are rarely right; prompt lookup's (copies of earlier spans) often are."""
    accepted = drafted = looked_up = looked_up_accepted = 0
    for prompt, (ids, expected) in reference.items():
        tokens, stats = await generate(oracle.address, lookup_draft.address, ids, k)
        assert tokens == expected, prompt
        accepted += stats.accepted
        drafted += stats.drafted
        looked_up += stats.lookup_drafted
        looked_up_accepted += stats.lookup_accepted
    assert (accepted - looked_up_accepted) / (drafted - looked_up) < 0.2
    assert looked_up_accepted > 0  # the tiny oracle repeats itself, and lookup copies the repeats


async def test_eight_concurrent_sessions_share_passes_and_stay_exact(oracle, unrelated_draft, feature_draft, reference):
    """Eight sessions at once on one oracle, with different drafts and depths (chains, trees, k = 0): the oracle
    batches their rounds into shared forward passes, each draft batches its sessions' proposals, and each output
    is still the oracle's own."""
    from coordinator.depth import make_policy

    def shared_passes(worker) -> tuple[float, float]:
        """(passes, passes that served one session) so far."""
        registry = worker.servicer.metrics.registry
        return (
            registry.get_sample_value("specd_engine_sessions_per_step_count") or 0.0,
            registry.get_sample_value("specd_engine_sessions_per_step_bucket", {"le": "1.0"}) or 0.0,
        )

    workers = (oracle, unrelated_draft, feature_draft)
    before = [shared_passes(worker) for worker in workers]
    items = list(reference.values())

    async def one(index: int):
        ids, expected = items[index % len(items)]
        draft_address = (unrelated_draft, feature_draft)[index % 2].address
        oracle_client, draft = OracleClient(oracle.address), DraftClient(draft_address)
        policy = FixedDepth(index % 5) if index < 5 else make_policy("goodput", 8)
        try:
            session = SpeculativeSession(
                SessionRequest(prompt=ids, sampling=common_pb2.SamplingParams(), max_tokens=MAX_TOKENS),
                draft, oracle_client, policy,
            )
            return await run_to_completion(session), expected
        finally:
            await oracle_client.close()
            await draft.close()

    for tokens, expected in await asyncio.gather(*(one(i) for i in range(8))):
        assert tokens == expected
    for worker, (steps_before, alone_before) in zip(workers, before):
        steps, alone = shared_passes(worker)
        assert steps > steps_before and alone - alone_before < steps - steps_before  # some passes served several


class CountingOracle(OracleClient):
    """A real oracle client that counts its calls by kind."""

    def __init__(self, address: str):
        super().__init__(address)
        self.calls = {"verify": 0, "decode": 0}

    async def verify(self, *args, **kwargs):
        self.calls["verify"] += 1
        return await super().verify(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self.calls["decode"] += 1
        return super().decode(*args, **kwargs)


async def test_the_oracle_alone_decodes_in_runs_and_stays_exact(oracle, unrelated_draft, reference, tiny_dir):
    """At a fixed depth of 0 the loop asks the oracle for runs of rounds (Decode, at most MAX_RUN_TOKENS each) rather
    than a Verify per token: the same tokens; an end-of-sequence token ends the run and the output before it."""
    from coordinator.depth.policy import MAX_RUN_TOKENS

    tokenizer = build_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    longer = greedy_reference(tiny_dir / "oracle", ids, 2 * MAX_RUN_TOKENS + 6)
    for max_tokens, eos, runs, expected in (
        (MAX_TOKENS, frozenset(), 1, reference[PROMPTS[0]][1]),
        (len(longer), frozenset(), 3, longer),
        (len(longer), frozenset({longer[9]}), 1, longer[: longer.index(longer[9])]),
    ):
        client, draft = CountingOracle(oracle.address), DraftClient(unrelated_draft.address)
        try:
            session = SpeculativeSession(
                SessionRequest(prompt=ids, sampling=common_pb2.SamplingParams(), max_tokens=max_tokens, eos_token_ids=eos),
                draft, client, FixedDepth(0),
            )
            assert await run_to_completion(session) == expected
            assert client.calls == {"verify": 0, "decode": runs}
            assert session.stats.rounds == len(expected) + bool(eos)
        finally:
            await client.close()
            await draft.close()
