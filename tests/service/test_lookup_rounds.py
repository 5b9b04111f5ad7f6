"""Prompt lookup in the session loop: copied blocks verified without asking the draft, output exact."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.depth import FixedDepth, GoodputDepth
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import SessionRequest, SpeculativeSession, run_to_completion
from specd.models.tiny import build_tokenizer
from specd.v1 import common_pb2
from tests.conftest import greedy_reference
from tests.service.test_exactness import MAX_TOKENS, PROMPTS


async def run(oracle, draft, prompt, policy, sampling=None, lookup=(3, 8)):
    oracle_client = OracleClient(oracle.address)
    draft_client = DraftClient(draft.address) if draft is not None else None
    try:
        session = SpeculativeSession(
            SessionRequest(
                prompt=prompt, sampling=sampling or common_pb2.SamplingParams(), max_tokens=MAX_TOKENS,
                lookup_ngram=lookup,
            ),
            draft_client,
            oracle_client,
            policy,
        )
        return await run_to_completion(session), session.stats
    finally:
        await oracle_client.close()
        if draft_client is not None:
            await draft_client.close()


@pytest.fixture(scope="module")
def repetitive(tiny_dir):
    """(prompt, the oracle's greedy continuation): the tiny oracle's text repeats itself, so lookup finds copies."""
    tokenizer = build_tokenizer()
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    return [(ids, greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS)) for ids in prompts]


async def test_copied_blocks_keep_the_output_exact_with_either_draft(oracle, unrelated_draft, feature_draft, repetitive):
    for draft in (unrelated_draft, feature_draft):
        led = 0
        for ids, expected in repetitive:
            tokens, stats = await run(oracle, draft, ids, GoodputDepth(k_max=8))
            assert tokens == expected
            led += stats.lookup_drafted
            assert stats.lookup_accepted <= stats.lookup_drafted <= stats.drafted
        assert led > 0


@pytest.mark.parametrize("k", [1, 4, 8])
async def test_copied_blocks_take_the_fixed_depth(oracle, unrelated_draft, repetitive, k):
    for ids, expected in repetitive:
        tokens, stats = await run(oracle, unrelated_draft, ids, FixedDepth(k))
        assert tokens == expected
        assert max(stats.depth_per_round) <= k


async def test_the_oracle_alone_with_lookup_needs_no_draft(oracle, repetitive):
    copied = 0
    for ids, expected in repetitive:
        tokens, stats = await run(oracle, None, ids, GoodputDepth(k_max=8))
        assert tokens == expected
        copied += stats.lookup_accepted
    assert copied > 0


async def test_fixed_zero_is_the_oracle_alone_even_with_lookup(oracle, unrelated_draft, repetitive):
    for ids, expected in repetitive:
        tokens, stats = await run(oracle, unrelated_draft, ids, FixedDepth(0))
        assert tokens == expected and stats.drafted == 0


async def test_sampled_sessions_with_copied_blocks_reproduce_by_seed(oracle, feature_draft):
    sampling = common_pb2.SamplingParams(temperature=0.8, seed=5)
    prompt = [40, 41, 42, 43, 44, 45, 40, 41, 42, 43, 44, 45, 40, 41, 42]
    first, stats = await run(oracle, feature_draft, prompt, GoodputDepth(k_max=8), sampling)
    second, _ = await run(oracle, feature_draft, prompt, GoodputDepth(k_max=8), sampling)
    assert first == second and len(first) == MAX_TOKENS
    assert stats.lookup_drafted > 0


class DistrustedMatches(GoodputDepth):
    """The goodput policy, with a stop rule that expects every match of 3 to 8 tokens to fail."""

    def stop_rule(self):
        return dataclasses.replace(super().stop_rule(), min_survival=0.2, lookup_by_length=(0.1,) * 8)


async def test_copies_end_where_their_matches_expected_acceptance_ends_the_block(oracle, feature_draft, repetitive):
    for ids, expected in repetitive:
        tokens, stats = await run(oracle, feature_draft, ids, DistrustedMatches(k_max=8))
        assert tokens == expected
        assert stats.lookup_drafted == 0  # neither the loop nor the draft copies a token expected at 0.1


async def test_the_policy_learns_acceptance_per_match_length_from_the_rounds(oracle, feature_draft, repetitive):
    policy = GoodputDepth(k_max=8)
    for ids, expected in repetitive:
        tokens, _ = await run(oracle, feature_draft, ids, policy)
        assert tokens == expected
    tested = policy.state.lookup_length_tested
    assert sum(tested) > 0 and all(t == 0 for t in tested[:2])  # lookup (3, 8) never matches 1 or 2 tokens
    rule = policy.stop_rule()
    assert list(rule.lookup_by_length) == policy.lookup_by_length()
