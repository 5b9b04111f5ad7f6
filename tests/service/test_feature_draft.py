"""Feature drafts: the oracle returns its hidden states, the draft reads them, the output stays exact."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from coordinator.depth import FixedDepth, GoodputDepth
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import SessionRequest, SpeculativeSession, run_to_completion
from specd.core.sampling import SamplingParams
from specd.core.stopping import StopRule
from specd.models.loader import load_model
from specd.runtime.drafter import Drafter
from specd.runtime.verifier import Verifier
from specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from tests.conftest import greedy_reference
from tests.service.test_exactness import MAX_TOKENS, PROMPTS

LIMITS = {"max_sessions": 4, "session_ttl_seconds": 60.0, "max_depth": 8}


class Cycle:
    """A depth schedule that mixes oracle-alone rounds (k = 0) with drafted ones."""

    name = "cycle"

    def __init__(self, depths: list[int]):
        self.depths, self.i = depths, 0

    def choose_k(self) -> int:
        self.i += 1
        return self.depths[(self.i - 1) % len(self.depths)]

    def lookup_depth(self) -> int:
        return 0

    def stop_rule(self):
        return None

    def tree_width(self) -> int:
        return 0

    def alone_rounds(self) -> int:
        return 1

    def observe(self, round) -> None:
        pass

    def snapshot(self) -> dict:
        return {}


async def run_session(oracle_addr, draft_addr, prompt_ids, k, sampling=None):
    oracle, draft = OracleClient(oracle_addr), DraftClient(draft_addr)
    try:
        session = SpeculativeSession(
            SessionRequest(
                prompt=prompt_ids, sampling=sampling or common_pb2.SamplingParams(), max_tokens=MAX_TOKENS
            ),
            draft,
            oracle,
            FixedDepth(k) if isinstance(k, int) else k,
        )
        tokens = await run_to_completion(session)
        return tokens, session
    finally:
        await oracle.close()
        await draft.close()


async def test_draft_advertises_its_feature_width(feature_draft, unrelated_draft):
    for worker, expected in ((feature_draft, 64), (unrelated_draft, 0)):
        client = DraftClient(worker.address)
        try:
            assert (await client.feature_reads()).dim == expected
        finally:
            await client.close()


async def check_greedy_exact(tiny_dir, oracle, draft, k) -> None:
    """Every prompt's output through the draft equals the oracle's own greedy output, and the draft drafted."""
    from specd.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [tokenizer("The")["input_ids"][:1]]
    drafted = 0
    for ids in prompts:
        expected = greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS)
        tokens, session = await run_session(oracle.address, draft.address, ids, k)
        assert tokens == expected, ids
        assert not session.draft_error
        drafted += session.stats.drafted
    assert drafted > 0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
async def test_greedy_output_equals_the_oracle_alone(tiny_dir, oracle, feature_draft, k):
    await check_greedy_exact(tiny_dir, oracle, feature_draft, k)


async def test_features_of_oracle_alone_rounds_reach_the_draft(tiny_dir, oracle, feature_draft):
    """After k = 0 rounds the next Propose carries every feature the draft missed, joined into one block."""
    ids = [5, 6, 7, 8, 9]
    expected = greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS)
    tokens, session = await run_session(oracle.address, feature_draft.address, ids, Cycle([0, 0, 3, 0, 2]))
    assert tokens == expected
    assert not session.draft_error and session.stats.drafted > 0


async def test_sampled_output_is_reproducible_by_seed(oracle, feature_draft):
    sampling = common_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    runs = [await run_session(oracle.address, feature_draft.address, [5, 6, 7, 8], 3, sampling) for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert len(runs[0][0]) == MAX_TOKENS


def test_features_follow_the_committed_sequence(tiny_dir):
    """Worker level: every position the oracle commits comes back with its feature, in order."""
    oracle = Verifier(load_model(str(tiny_dir / "oracle")), **LIMITS)
    drafter = Drafter(load_model(str(tiny_dir / "feature")), **LIMITS)
    prompt = [3, 4, 5, 6, 7]
    opened = oracle.open("s", prompt, SamplingParams(), return_features=True)
    assert opened.features.start == 0 and opened.features.rows.shape == (4, 64)
    drafter.open("s", prompt, SamplingParams(), features=opened.features)
    committed, features, append = list(prompt), None, []
    for _ in range(6):
        proposal = drafter.propose("s", append, 0, 3, features)
        result = oracle.verify("s", proposal.tokens, [], 0)
        append = result.verdict.committed(proposal.tokens)
        features = result.features
        assert features.start == len(committed) - 1
        assert features.rows.shape[0] == 1 + result.verdict.accepted
        committed += append
    assert oracle.sessions.get("s").committed == committed


def test_missing_features_are_refused(tiny_dir):
    drafter = Drafter(load_model(str(tiny_dir / "feature")), **LIMITS)
    from specd.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="return_features"):
        drafter.open("s", [3, 4, 5], SamplingParams())
    oracle = Verifier(load_model(str(tiny_dir / "oracle")), **LIMITS)
    opened = oracle.open("t", [3, 4, 5], SamplingParams(), return_features=True)
    drafter.open("t", [3, 4, 5], SamplingParams(), features=opened.features)
    proposal = drafter.propose("t", [], 0, 2)
    result = oracle.verify("t", proposal.tokens, [], 0)
    with pytest.raises(InvalidArgument, match="return_features"):  # the verdict's features were not passed on
        drafter.propose("t", result.verdict.committed(proposal.tokens), 0, 2)


async def test_bad_features_get_invalid_argument(feature_draft):
    channel = grpc.aio.insecure_channel(feature_draft.address)
    stub = draft_pb2_grpc.DraftServiceStub(channel)
    try:
        bad = common_pb2.Features(start=0, rows=2, dim=64, data=b"\0" * 10)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.OpenSession(draft_pb2.OpenDraftSessionRequest(session_id="x", prompt_token_ids=[1, 2, 3], features=bad))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes" in error.value.details()
        wrong_width = common_pb2.Features(start=0, rows=2, dim=8, data=b"\0" * 32)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.OpenSession(
                draft_pb2.OpenDraftSessionRequest(session_id="y", prompt_token_ids=[1, 2, 3], features=wrong_width)
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "width" in error.value.details()
    finally:
        await channel.close()


async def test_oracle_reports_its_feature_width_and_mismatches_are_refused(oracle, feature_draft):
    from specd.core.compat import check_pair
    from specd.core.errors import IncompatiblePair

    oracle_client, draft_client = OracleClient(oracle.address), DraftClient(feature_draft.address)
    try:
        oracle_info, draft_info = await oracle_client.info(), await draft_client.info()
    finally:
        await oracle_client.close()
        await draft_client.close()
    assert oracle_info.feature_dim == draft_info.feature_dim == 64
    check_pair(draft_info, oracle_info)
    oracle_info.feature_dim = 32
    with pytest.raises(IncompatiblePair, match="width 64"):
        check_pair(draft_info, oracle_info)


async def test_greedy_output_with_draft_trees_equals_the_oracle_alone(tiny_dir, oracle, feature_draft):
    """The policy's trees travel over gRPC (Proposal.parents -> VerifyRequest.draft_parents -> accepted_path)
    and the output stays the oracle's own."""
    from specd.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    trees = 0

    def count(session, obs, committed):
        nonlocal trees
        trees += bool(obs.parents)

    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        expected = greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS)
        policy = TreePolicy(k_max=6, tree_width=3)
        oracle_client, draft_client = OracleClient(oracle.address), DraftClient(feature_draft.address)
        try:
            session = SpeculativeSession(
                SessionRequest(prompt=ids, sampling=common_pb2.SamplingParams(), max_tokens=MAX_TOKENS),
                draft_client, oracle_client, policy, count,
            )
            assert await run_to_completion(session) == expected, text
        finally:
            await oracle_client.close()
            await draft_client.close()
    assert trees > 0


class TreePolicy(GoodputDepth):
    """The goodput policy with every token expected at one half, so blocks branch whatever the draft's confidence."""

    def choose_k(self) -> int:
        return self.k_max

    def stop_rule(self):
        return StopRule(min_survival=0.05, calibration=(0.5,), alternative_calibration=(0.5,))


async def test_drafts_report_the_layers_they_read_and_oracles_theirs(oracle, layers_draft, feature_draft):
    from specd.core.compat import check_pair
    from specd.core.errors import IncompatiblePair

    clients = OracleClient(oracle.address), DraftClient(layers_draft.address), DraftClient(feature_draft.address)
    try:
        oracle_info, layers_info, plain_info = [await client.info() for client in clients]
        reads = await clients[1].feature_reads()
    finally:
        for client in clients:
            await client.close()
    assert oracle_info.num_layers == 2 and list(oracle_info.feature_layers) == []
    assert list(layers_info.feature_layers) == [0, 1, 2] and layers_info.feature_dim == 64
    assert reads.dim == 64 and reads.layers == [0, 1, 2]
    assert list(plain_info.feature_layers) == [] and plain_info.num_layers == 0
    check_pair(layers_info, oracle_info)
    oracle_info.num_layers = 1
    with pytest.raises(IncompatiblePair, match="hidden states 0, 1, 2 of its oracle, but this oracle has 1 layers"):
        check_pair(layers_info, oracle_info)


@pytest.mark.parametrize("k", [1, 3, 8])
async def test_greedy_output_with_a_draft_of_several_layers_equals_the_oracle_alone(tiny_dir, oracle, layers_draft, k):
    """The coordinator opens the oracle's session for the hidden states the draft reads; its output stays the
    oracle's own, through drafted rounds and oracle-alone ones."""
    await check_greedy_exact(tiny_dir, oracle, layers_draft, k)
    ids = [5, 6, 7, 8, 9]
    tokens, session = await run_session(oracle.address, layers_draft.address, ids, Cycle([0, 0, k, 0, 2]))
    assert tokens == greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS) and not session.draft_error


async def test_sampled_output_through_a_draft_of_several_layers_keeps_the_oracles_distribution(
    tiny_dir, oracle, layers_draft
):
    """Seeded sampled sessions over the loopback servers, two tokens each in one drafted round of k = 2: the pairs
    follow the oracle's own distribution (chi-square), and a seed reproduces its pair."""
    from tests.service.test_stop_rule import PROMPT, assert_pairs_follow, oracle_pair_distribution

    oracle_model = load_model(str(tiny_dir / "oracle"))
    params = SamplingParams(temperature=4.0, top_k=3)
    joint = oracle_pair_distribution(oracle_model, params)
    trials = 600
    counts = np.zeros_like(joint)
    oracle_client, draft_client = OracleClient(oracle.address), DraftClient(layers_draft.address)
    drafted = 0
    try:
        for seed in range(trials):
            sampling = common_pb2.SamplingParams(temperature=4.0, top_k=3, seed=seed)
            session = SpeculativeSession(
                SessionRequest(prompt=PROMPT, sampling=sampling, max_tokens=2), draft_client, oracle_client,
                FixedDepth(2),
            )
            first, second = await run_to_completion(session)
            counts[first, second] += 1
            drafted += session.stats.drafted
            assert not session.draft_error
            if seed < 3:
                again = SpeculativeSession(
                    SessionRequest(prompt=PROMPT, sampling=sampling, max_tokens=2), draft_client, oracle_client,
                    FixedDepth(2),
                )
                assert await run_to_completion(again) == [first, second]
    finally:
        await oracle_client.close()
        await draft_client.close()
    assert drafted > 0
    assert_pairs_follow(counts, joint, trials)


async def test_the_oracle_refuses_layers_it_does_not_have(oracle):
    from specd.v1 import oracle_pb2, oracle_pb2_grpc

    channel = grpc.aio.insecure_channel(oracle.address)
    stub = oracle_pb2_grpc.OracleServiceStub(channel)
    try:
        for layers, return_features, message in [
            ([0, 3], True, "it has 2 layers, so 0..2"),
            ([1, 1], True, "more than once"),
            (list(range(9)), True, "at most 8"),
            ([0, 2], False, "needs return_features"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.OpenSession(
                    oracle_pb2.OpenOracleSessionRequest(
                        session_id="bad-layers", prompt_token_ids=[1, 2, 3], return_features=return_features,
                        feature_layers=layers,
                    )
                )
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in error.value.details()
        opened = await stub.OpenSession(
            oracle_pb2.OpenOracleSessionRequest(
                session_id="bad-layers", prompt_token_ids=[1, 2, 3, 4], return_features=True, feature_layers=[2, 0],
            )
        )
        assert (opened.features.rows, opened.features.dim) == (3, 128)
        await stub.CloseSession(common_pb2.CloseSessionRequest(session_id="bad-layers"))
    finally:
        await channel.close()
