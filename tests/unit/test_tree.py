"""Draft trees: the tree pass computes what each branch's chain would, the oracle keeps the greedy path,
the draft proposes well-formed trees, and the policy learns from them."""

from __future__ import annotations

import pytest
import torch

from coordinator.depth import GoodputDepth, make_policy
from coordinator.session.stats import RoundObservation, SpeculationStats
from specd.core import tree
from specd.core.errors import InvalidArgument
from specd.core.sampling import SamplingParams
from specd.core.stopping import StopRule
from specd.core.verification import verify_greedy_tree
from specd.kernels.attention import use_grouped_attention
from specd.models.loader import load_model
from specd.models.tiny import build_model
from specd.runtime.drafter import Drafter
from specd.runtime.kv import KVSession
from specd.runtime.verifier import Verifier

CPU = torch.device("cpu")
LIMITS = {"max_sessions": 4, "session_ttl_seconds": 60.0, "max_depth": 8}
# root -> 0, 1; 0 -> 2, 3; 1 -> 4; 2 -> 5; 4 -> 6
TOKENS = [5, 7, 9, 11, 13, 15, 17]
PARENTS = [-1, -1, 0, 0, 1, 2, 4]


def test_tree_layout_helpers():
    assert tree.depths(PARENTS) == [1, 1, 2, 2, 2, 3, 3]
    assert tree.ancestors(PARENTS, 6) == [1, 4, 6]
    assert tree.is_chain([-1, 0, 1]) and not tree.is_chain(PARENTS)
    tree.check_parents(PARENTS, 7)
    for bad in ([-1, 1], [-2], [0], [-1, -1, 2]):
        with pytest.raises(InvalidArgument, match="parent"):
            tree.check_parents(bad, len(bad))
    with pytest.raises(InvalidArgument, match="one parent per token"):
        tree.check_parents([-1], 2)
    mask = tree.attention_mask(PARENTS, context=3, fed=2, device=CPU)[0, 0]
    assert mask.shape == (9, 12)
    assert mask[:, :3].all() and mask[0, 3] and not mask[0, 4] and mask[2:, 3:5].all()
    assert mask[2 + 6].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5 + 1, 5 + 4, 5 + 6]
    assert tree.position_ids(PARENTS, 3, 2, CPU).tolist() == [[3, 4, 5, 5, 6, 6, 6, 7, 7]]


def test_greedy_walk_follows_the_oracle_through_any_branch():
    # argmax[0]: after the committed sequence; argmax[i + 1]: after token i.
    path, own = tree.greedy_path(TOKENS, PARENTS, [7, 0, 13, 0, 0, 17, 0, 99])
    assert path == [1, 4, 6] and own == 99
    path, own = tree.greedy_path(TOKENS, PARENTS, [4, 0, 0, 0, 0, 0, 0, 0])
    assert path == [] and own == 4
    logits = torch.full((8, 120), -1.0)
    for row, token in enumerate([5, 11, 0, 0, 0, 0, 0, 0]):
        logits[row, token] = 1.0
    verdict, path = verify_greedy_tree(TOKENS, PARENTS, logits)
    assert path == [0, 3] and verdict.accepted == 2 and verdict.next_token == 0


@pytest.mark.parametrize("kv_heads", [0, 2])
def test_a_tree_pass_computes_each_branch_as_its_own_chain(kv_heads):
    model = build_model(384, seed=3, layers=2, hidden=64, heads=4, kv_heads=kv_heads)
    if kv_heads:
        assert use_grouped_attention(model)
    context = torch.randint(0, 384, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    session = KVSession(model, CPU)
    session.prefill(context[:-2])
    logits, hidden = session.forward_tree(context[-2:], TOKENS, PARENTS, features=True)
    assert logits.shape == (9, 384) and hidden.shape == (9, 64)
    for i in range(len(TOKENS)):
        chain = context + [TOKENS[j] for j in tree.ancestors(PARENTS, i)]
        expected = KVSession(model, CPU).forward(chain)[-1]
        torch.testing.assert_close(logits[2 + i], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], KVSession(model, CPU).forward(context)[-1], rtol=1e-4, atol=1e-4)
    # Keeping the path 1 -> 4 -> 6 leaves the cache of that chain: the next pass matches a fresh one.
    session.keep_path(len(context), TOKENS, [1, 4, 6])
    assert session.cached_ids == context + [7, 13, 17] and session.cache.get_seq_length() == len(context) + 3
    nxt = session.forward([3])[-1]
    torch.testing.assert_close(nxt, KVSession(model, CPU).forward(context + [7, 13, 17, 3])[-1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return load_model(str(tiny_dir / "oracle")), load_model(str(tiny_dir / "feature"))


def test_the_oracle_commits_the_greedy_path_of_a_tree(pair):
    oracle_model, _ = pair
    prompt = [3, 4, 5, 6, 7]
    reference = Verifier(oracle_model, **LIMITS)
    reference.open("r", prompt, SamplingParams())
    greedy = []
    for _ in range(3):
        greedy.append(reference.verify("r", [], [], 0).verdict.next_token)
    verifier = Verifier(oracle_model, **LIMITS)
    opened = verifier.open("s", prompt, SamplingParams(), return_features=True)
    wrong = [(t + 1) % 384 for t in greedy]
    # The greedy continuation sits on the second branch at both levels.
    tokens = [wrong[0], greedy[0], wrong[1], greedy[1]]
    parents = [-1, -1, 1, 1]
    result = verifier.verify("s", tokens, [], 0, parents)
    assert result.path == [1, 3] and result.verdict.accepted == 2 and result.verdict.next_token == greedy[2]
    assert verifier.sessions.get("s").committed == prompt + greedy
    assert result.features.start == len(prompt) - 1 and result.features.rows.shape[0] == 3
    assert opened.features.rows.shape[0] == len(prompt) - 1
    # The session goes on exactly as the oracle alone.
    for _ in range(3):
        greedy.append(reference.verify("r", [], [], 0).verdict.next_token)
    result = verifier.verify("s", [(greedy[3] + 1) % 384, greedy[3]], [], 0, [-1, -1])
    assert result.path == [1] and result.verdict.next_token == greedy[4]


def test_trees_are_refused_where_they_do_not_apply(pair):
    oracle_model, _ = pair
    verifier = Verifier(oracle_model, **LIMITS)
    verifier.open("sampled", [3, 4, 5], SamplingParams(temperature=0.8, seed=1))
    with pytest.raises(InvalidArgument, match="greedy"):
        verifier.verify("sampled", [5, 6], [([5], [1.0]), ([6], [1.0])], 0, [-1, -1])
    verifier.open("g", [3, 4, 5], SamplingParams())
    with pytest.raises(InvalidArgument, match="parent"):
        verifier.verify("g", [5, 6], [], 0, [-1, 5])
    assert verifier.verify("g", [5, 6], [], 0, [-1, 0]).path is None  # a chain takes the chain path


def test_the_draft_proposes_a_well_formed_tree(pair):
    oracle_model, draft_model = pair
    verifier, drafter = Verifier(oracle_model, **LIMITS), Drafter(draft_model, **LIMITS)
    prompt = [3, 4, 5, 6, 7, 8]
    opened = verifier.open("s", prompt, SamplingParams(), return_features=True)
    drafter.open("s", prompt, SamplingParams(), features=opened.features)
    # Every token expected at 0.5: the 3 alternatives at depth 1, then 3 of their 9 children.
    even = StopRule(min_survival=0.0, calibration=(0.5,), alternative_calibration=(0.5,))
    proposal = drafter.propose("s", [], 0, 6, stop=even, tree_width=3)
    assert len(proposal.tokens) == 6
    tree.check_parents(proposal.parents, 6)
    assert tree.depths(proposal.parents) == [1, 1, 1, 2, 2, 2] and proposal.model_steps == 1
    for parent in set(proposal.parents):  # siblings in descending probability
        probs = [p for p, q in zip(proposal.confidences, proposal.parents) if q == parent]
        assert probs == sorted(probs, reverse=True)
    result = verifier.verify("s", proposal.tokens, [], 0, proposal.parents)
    committed = [proposal.tokens[i] for i in result.path] + [result.verdict.next_token]
    # The next round's catch-up drops the tree's rows and reads the committed path's features.
    again = drafter.propose("s", committed, 0, 4, result.features, tree_width=3)
    assert len(again.tokens) == 4
    # A stop rule that trusts nothing proposes nothing; a width of 1 proposes a chain.
    assert drafter.propose("s", [], 0, 4, tree_width=3, stop=StopRule(min_survival=1.0, calibration=(0.0,))).tokens == []
    chain = drafter.propose("s", [], 0, 4, tree_width=1)
    assert chain.parents == [] and len(chain.tokens) == 4
    with pytest.raises(InvalidArgument, match="tree_width"):
        drafter.propose("s", [], 0, 4, tree_width=17)


def test_sampled_sessions_get_chains(pair):
    oracle_model, draft_model = pair
    verifier, drafter = Verifier(oracle_model, **LIMITS), Drafter(draft_model, **LIMITS)
    params = SamplingParams(temperature=0.7, seed=3)
    opened = verifier.open("s", [3, 4, 5, 6], params, return_features=True)
    drafter.open("s", [3, 4, 5, 6], params, features=opened.features)
    proposal = drafter.propose("s", [], 0, 4, tree_width=4)
    assert proposal.parents == [] and len(proposal.distributions) == 4


def test_the_policy_learns_from_tree_rounds():
    policy = make_policy("goodput", 8)
    assert policy.tree_width() == 4
    assert make_policy("goodput:tree_width=0", 8).tree_width() == 0
    assert make_policy("goodput:tree_width=3,confidence_stop=0", 8).tree_width() == 0
    with pytest.raises(ValueError, match="tree_width"):
        make_policy("goodput:tree_width=17", 8)
    # root -> 0 (top), 1 (alternative); 1 -> 2 (top), 3 (alternative). The oracle took 1 then 2.
    round = RoundObservation(
        k=4, accepted=2, draft_seconds=0.01, verify_seconds=0.06, confidences=(0.6, 0.3, 0.5, 0.2),
        model_steps=2, parents=(-1, -1, 1, 1), path=(1, 2),
    )
    assert round.depth == 2
    assert round.tested_top_choices() == [(0, 0.6, False), (2, 0.5, True)]
    assert round.tested_alternatives() == [(0.3, True), (0.2, False)]
    assert isinstance(policy, GoodputDepth)
    for _ in range(20):
        policy.observe(round)
    alternatives = policy.alternative_calibration()
    assert alternatives[3] > 0.6 and alternatives[2] < 0.3  # band 0.3: always right; band 0.2: never
    assert policy.stop_rule().alternative_calibration == tuple(alternatives)
    assert policy.state.tested_weight[2] == 0  # depth 3 was never drafted
    stats = SpeculationStats()
    stats.record(round)
    assert stats.drafted == 4 and stats.accepted == 2 and stats.drafted_per_position == [1, 1]


def test_trees_carry_prompt_lookup_copies(pair):
    """A branch whose text repeats the session's is continued by the copy, at no model step, and the
    policy counts the copies it tested by their match length."""
    oracle_model, draft_model = pair
    verifier = Verifier(oracle_model, **LIMITS)
    drafter = Drafter(draft_model, lookup_ngram=(3, 8), **LIMITS)
    span = [40, 41, 42, 43, 44, 45, 46, 47]
    prompt = [3, 4, 5] + span + [60, 61] + span[:3]
    opened = verifier.open("s", prompt, SamplingParams(), return_features=True)
    drafter.open("s", prompt, SamplingParams(), features=opened.features)
    # Copies trusted far above the model's guesses: the block is the copy, and the model never runs.
    trusted = StopRule(min_survival=0.01, calibration=(0.3,), lookup_by_length=(0.9,) * 8)
    proposal = drafter.propose("s", [], 0, 5, stop=trusted, tree_width=2)
    assert proposal.tokens == span[3:8] and proposal.looked_up == [0, 1, 2, 3, 4] and proposal.parents == []
    assert proposal.model_steps == 0 and proposal.lookup_lengths == [3, 4, 5, 6, 7]
    # Copies trusted about as much as the model: a tree with both.
    rule = StopRule(min_survival=0.01, calibration=(0.3,), lookup_by_length=(0.5,) * 8)
    proposal = drafter.propose("s", [], 0, 6, stop=rule, tree_width=2)
    copied = [proposal.tokens[i] for i in proposal.looked_up]
    assert copied[:2] == span[3:5] and proposal.parents  # the copy chain, root side first, beside the model's
    assert all(proposal.confidences[i] == 1.0 for i in proposal.looked_up)
    result = verifier.verify("s", proposal.tokens, [], 0, proposal.parents)
    round = RoundObservation(
        k=len(proposal.tokens), accepted=result.verdict.accepted, draft_seconds=0.0, verify_seconds=0.0,
        lookup_positions=tuple(proposal.looked_up), lookup_lengths=tuple(proposal.lookup_lengths),
        confidences=tuple(proposal.confidences), parents=tuple(proposal.parents), path=tuple(result.path),
    )
    tested = round.tested_lookups()
    assert tested and tested[0][0] >= 3  # the first copy follows the committed sequence: always tested
    on_path = sum(i in result.path for i in proposal.looked_up)
    assert sum(hit for _, hit in tested) == on_path
    assert all(i not in proposal.looked_up for i, _, _ in round.tested_top_choices())
