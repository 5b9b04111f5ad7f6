"""The stop rule: a draft ends its block where it stops trusting it, and the output stays the oracle's."""

from __future__ import annotations

import copy
import dataclasses
import math

import grpc
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from coordinator.depth import GoodputDepth
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import SessionRequest, SpeculativeSession, run_to_completion
from specd.core.errors import InvalidArgument
from specd.core.sampling import SamplingParams, warp_probs
from specd.core.stopping import StopRule
from specd.models.loader import load_model
from specd.models.tiny import build_tokenizer
from specd.runtime.drafter import Drafter
from specd.runtime.verifier import Verifier
from specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from tests.conftest import greedy_reference

LIMITS = {"max_sessions": 8, "session_ttl_seconds": 60.0, "max_depth": 8}
PROMPT = build_tokenizer()("Once upon a time there was")["input_ids"]


@pytest.fixture(scope="module")
def oracle_model(tiny_dir):
    return load_model(str(tiny_dir / "oracle"))


@pytest.fixture(scope="module")
def near_draft(oracle_model):
    """The oracle with a perturbed output head: it agrees often, not always, and its confidence varies."""
    model = copy.deepcopy(oracle_model.model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head = model.lm_head.weight
        head.add_(torch.randn(head.shape, generator=generator) * head.std() * 0.6)
    return dataclasses.replace(oracle_model, model=model)


@pytest.fixture(scope="module")
def soft_draft(near_draft):
    """near_draft with its logits shrunk twentyfold: the same greedy tokens, confidences well below 1."""
    model = copy.deepcopy(near_draft.model)
    with torch.no_grad():
        model.lm_head.weight.div_(20.0)
    return dataclasses.replace(near_draft, model=model)


def propose(drafter: Drafter, session: str, k: int, stop: StopRule | None, params: SamplingParams | None = None):
    drafter.open(session, PROMPT, params or SamplingParams())
    try:
        return drafter.propose(session, [], 0, k, stop=stop)
    finally:
        drafter.close(session)


def test_the_block_ends_where_the_estimated_survival_drops_below_the_threshold(soft_draft):
    drafter = Drafter(soft_draft, **LIMITS)
    full = propose(drafter, "full", 8, None)
    assert len(full.tokens) == len(full.confidences) == full.model_steps == 8
    assert all(0 < c < 0.999 for c in full.confidences)
    assert propose(drafter, "never", 8, StopRule(0.0)).tokens == full.tokens
    for cut in range(8):  # a threshold between the survival of the first cut tokens and of one more
        survival = math.sqrt(math.prod(full.confidences[:cut]) * math.prod(full.confidences[: cut + 1]))
        stopped = propose(drafter, f"cut{cut}", 8, StopRule(survival))
        assert stopped.tokens == full.tokens[:cut]
        assert stopped.confidences == full.confidences[:cut]
        assert stopped.model_steps == cut + 1  # the position whose confidence ended the block was computed
    for cut in range(1, 8):  # keep every computed token, but compute no further once survival drops
        survival = math.sqrt(math.prod(full.confidences[:cut]) * math.prod(full.confidences[: cut + 1]))
        ended = propose(drafter, f"end{cut}", 8, StopRule(0.0, extend_survival=survival))
        assert ended.tokens == full.tokens[: cut + 1]
        assert ended.model_steps == cut + 1  # no position computed beyond the last kept one
    assert propose(drafter, "trusting", 8, StopRule(0.99, calibration=(1.0,) * 10)).tokens == full.tokens
    assert propose(drafter, "doubting", 8, StopRule(0.01, calibration=(0.0,) * 10)).tokens == []


def test_copied_tokens_count_at_the_rules_lookup_acceptance(oracle_model):
    drafter = Drafter(oracle_model, lookup_ngram=(3, 8), **LIMITS)
    span = [40, 41, 42, 43, 44, 45, 46, 47]
    prompt = [3, 4, 5] + span + [60, 61] + span[:3]
    # 0.9^3 >= 0.7 > 0.9^4; 0.5 >= 0.4 > 0.25
    for rule, expected in ((StopRule(0.7, lookup_acceptance=0.9), 3), (StopRule(0.4, lookup_acceptance=0.5), 1)):
        drafter.open("s", prompt, SamplingParams())
        proposal = drafter.propose("s", [], 0, 5, stop=rule)
        drafter.close("s")
        assert proposal.tokens == span[3 : 3 + expected]
        assert proposal.confidences == [1.0] * expected and proposal.model_steps == 0


def test_copied_tokens_count_at_their_match_lengths_acceptance(oracle_model):
    drafter = Drafter(oracle_model, lookup_ngram=(3, 8), **LIMITS)
    span = [40, 41, 42, 43, 44, 45, 46, 47]
    prompt = [3, 4, 5] + span + [60, 61] + span[:3]  # the copy's matches grow: 3, 4, 5, ... tokens
    by_length = (0.1, 0.1, 0.9, 0.8, 0.5, 0.5)
    rule = StopRule(0.5, lookup_acceptance=1.0, lookup_by_length=by_length)
    assert [rule.lookup_expected(n) for n in (1, 3, 6, 7, 20)] == [0.1, 0.9, 0.5, 0.5, 0.5]
    drafter.open("s", prompt, SamplingParams())
    proposal = drafter.propose("s", [], 0, 5, stop=rule)
    drafter.close("s")
    assert proposal.tokens == span[3:5]  # 0.9 x 0.8 >= 0.5 > 0.9 x 0.8 x 0.5
    assert proposal.looked_up == [0, 1] and proposal.lookup_lengths == [3, 4]


@pytest.mark.parametrize(
    "rule", [dict(min_survival=1.5), dict(min_survival=math.nan), dict(min_survival=0.5, calibration=(0.2, 1.2)),
             dict(min_survival=0.5, lookup_acceptance=-0.1), dict(min_survival=0.5, calibration=(0.5,) * 101),
             dict(min_survival=0.5, extend_survival=1.01),
             dict(min_survival=0.5, lookup_by_length=(0.5, 1.5)), dict(min_survival=0.5, lookup_by_length=(0.5,) * 33)],
)
def test_a_malformed_rule_is_refused(rule):
    with pytest.raises(InvalidArgument):
        StopRule(**rule)


async def test_a_malformed_rule_over_grpc_is_invalid_argument_and_the_session_survives(feature_draft, oracle):
    from tests.service.test_sessions import expect_status

    oracle_client, draft_client = OracleClient(oracle.address), DraftClient(feature_draft.address)
    stub = draft_pb2_grpc.DraftServiceStub(draft_client.channel)
    try:
        sampling = common_pb2.SamplingParams()
        opened = await oracle_client.open_session("bad-rule", PROMPT, sampling, 10.0, return_features=True)
        await draft_client.open_session("bad-rule", PROMPT, sampling, 10.0, opened.features)
        bad = draft_pb2.ProposeRequest(session_id="bad-rule", depth=4, stop=draft_pb2.StopRule(min_survival=2.0))
        await expect_status(stub.Propose(bad), grpc.StatusCode.INVALID_ARGUMENT, "min_survival")
        good = await draft_client.propose("bad-rule", [], 0, 4, 10.0, stop=StopRule(0.0))
        assert len(good.tokens) == len(good.confidences) == good.model_steps == 4
    finally:
        await oracle_client.close_session("bad-rule")
        await draft_client.close_session("bad-rule")
        await oracle_client.close()
        await draft_client.close()


async def test_greedy_sessions_with_the_stop_rule_are_exact(tiny_dir, oracle, feature_draft, lookup_draft):
    expected = greedy_reference(tiny_dir / "oracle", PROMPT, 32)
    for draft in (feature_draft, lookup_draft):
        oracle_client, draft_client = OracleClient(oracle.address), DraftClient(draft.address)
        policy = GoodputDepth(k_max=8)
        try:
            for _ in range(3):
                session = SpeculativeSession(
                    SessionRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(), max_tokens=32),
                    draft_client, oracle_client, policy,
                )
                assert await run_to_completion(session) == expected
        finally:
            await oracle_client.close()
            await draft_client.close()
        assert policy.state.drafted_rounds > 0
        assert sum(policy.state.calibration_tested) > 0  # the draft's confidences reached the policy


def oracle_pair_distribution(oracle_model, params: SamplingParams, prompt: list[int] = PROMPT) -> np.ndarray:
    """P(first two tokens = (a, b)) under the oracle alone, over the whole vocabulary squared."""
    vocab = oracle_model.vocab_size
    with torch.inference_mode():
        first = warp_probs(oracle_model.model(torch.tensor([prompt])).logits[0, -1:, :vocab], params)[0]
        joint = np.zeros((vocab, vocab))
        for a in torch.nonzero(first).flatten().tolist():
            second = warp_probs(oracle_model.model(torch.tensor([prompt + [a]])).logits[0, -1:, :vocab], params)[0]
            joint[a] = first[a].item() * second.double().numpy()
    return joint


def assert_pairs_follow(counts: np.ndarray, joint: np.ndarray, trials: int) -> None:
    """Observed first-two-token pairs against `joint` (chi-square; expected counts under 5 pooled)."""
    expected = joint * trials
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a pair the oracle never produces"
    observed, expected = counts[keep], expected[keep]
    big = expected >= 5  # chi-square wants expected counts of at least 5: pool the rest
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_sampled_output_keeps_the_oracles_distribution_whatever_the_blocks_length(oracle_model, near_draft):
    """The rule trusts the draft only where its top probability is at least 0.6, so how long a
    block gets depends on the tokens drawn before (here 1 or 2). The first two tokens must still
    follow the oracle's own distribution (chi-square over the pairs)."""
    params = SamplingParams(temperature=4.0, top_k=3)
    rule = StopRule(0.5, calibration=(0.1,) * 12 + (0.95,) * 8)
    drafter, verifier = Drafter(near_draft, **LIMITS), Verifier(oracle_model, **LIMITS)
    trials, lengths = 1000, []
    counts = np.zeros((oracle_model.vocab_size, oracle_model.vocab_size))
    for seed in range(trials):
        session, trial = f"t{seed}", dataclasses.replace(params, seed=seed)
        verifier.open(session, PROMPT, trial)
        drafter.open(session, PROMPT, trial)
        out: list[int] = []
        appended: list[int] = []
        while len(out) < 2:
            proposal = drafter.propose(session, appended, 0, 2, stop=rule)
            lengths.append(len(proposal.tokens))
            rows = [(d.token_ids, d.probs) for d in proposal.distributions]
            verdict = verifier.verify(session, proposal.tokens, rows, 0).verdict
            appended = verdict.committed(proposal.tokens)
            out += appended
        counts[out[0], out[1]] += 1
        drafter.close(session)
        verifier.close(session)
    assert len(set(lengths)) >= 2, "the rule must produce blocks of varied length for this test to mean anything"
    assert_pairs_follow(counts, oracle_pair_distribution(oracle_model, params), trials)
