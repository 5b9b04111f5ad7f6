"""The verification math on its own: exact greedy cases, seeded reproducibility, and the
statistical guarantee that speculative sampling reproduces the oracle's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specd.core.sampling import SamplingParams, Stream, keyed_uniform, sample_from, warp_probs
from specd.core.verification import sparse_to_dense, verify_greedy, verify_sampled

VOCAB = 6


def one_hot_logits(argmaxes: list[int], vocab: int = VOCAB) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits  # [k+1, vocab]


class TestGreedy:
    def test_accept_all_gives_bonus_token(self):
        verdict = verify_greedy([1, 2, 3], one_hot_logits([1, 2, 3, 4]))
        assert verdict.accepted == 3
        assert verdict.next_token == 4
        assert verdict.is_bonus(3)
        assert verdict.committed([1, 2, 3]) == [1, 2, 3, 4]

    def test_reject_first(self):
        verdict = verify_greedy([1, 2, 3], one_hot_logits([5, 2, 3, 4]))
        assert verdict.accepted == 0
        assert verdict.next_token == 5
        assert verdict.committed([1, 2, 3]) == [5]

    def test_reject_in_the_middle(self):
        verdict = verify_greedy([1, 2, 3, 0], one_hot_logits([1, 2, 4, 0, 1]))
        assert verdict.accepted == 2
        assert verdict.next_token == 4
        assert not verdict.is_bonus(4)
        assert verdict.committed([1, 2, 3, 0]) == [1, 2, 4]

    def test_zero_depth_is_the_oracle_alone(self):
        verdict = verify_greedy([], one_hot_logits([3]))
        assert (verdict.accepted, verdict.next_token) == (0, 3)

    def test_rejects_wrong_shape(self):
        with pytest.raises(ValueError):
            verify_greedy([1, 2], one_hot_logits([1, 2]))


def random_dists(k: int, seed: int, sharpness: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(k, VOCAB, generator=generator), dim=-1)


def speculate(p: torch.Tensor, q: torch.Tensor, seed: int) -> tuple[list[int], int]:
    """One round as the services run it: the draft samples from q, the oracle verifies."""
    k = q.shape[0]
    draft = [sample_from(q[i], keyed_uniform(seed, i, Stream.DRAFT)) for i in range(k)]
    verdict = verify_sampled(draft, q, p, seed, start_position=0)
    return verdict.committed(draft), verdict.accepted


class TestSampledReproducibility:
    def test_same_seed_same_result(self):
        p, q = random_dists(4, 0), random_dists(3, 1)
        results = {tuple(speculate(p, q, seed=1234)[0]) for _ in range(5)}
        assert len(results) == 1

    def test_different_seeds_vary(self):
        p, q = random_dists(4, 0), random_dists(3, 1)
        results = {tuple(speculate(p, q, seed=s)[0]) for s in range(50)}
        assert len(results) > 5

    def test_keyed_uniform_is_a_pure_function(self):
        assert keyed_uniform(7, 3, Stream.ACCEPT) == keyed_uniform(7, 3, Stream.ACCEPT)
        assert keyed_uniform(7, 3, Stream.ACCEPT) != keyed_uniform(7, 3, Stream.ORACLE)
        values = [keyed_uniform(7, i, Stream.DRAFT) for i in range(2000)]
        assert min(values) >= 0.0 and max(values) < 1.0
        assert abs(np.mean(values) - 0.5) < 0.03


TRIALS = 12000


def empirical(samples: list[int]) -> np.ndarray:
    return np.bincount(samples, minlength=VOCAB).astype(float)


def assert_matches(samples: list[int], target: torch.Tensor) -> None:
    observed = empirical(samples)
    target = target.double().numpy()
    expected = target / target.sum() * len(samples)
    keep = expected > 0
    assert observed[~keep].sum() == 0, "sampled a token the oracle gives zero probability"
    expected = expected[keep] * observed[keep].sum() / expected[keep].sum()
    result = chisquare(observed[keep], expected)
    assert result.pvalue > 1e-3, (observed, expected, result)


@pytest.mark.parametrize(
    "name, q_of",
    [
        ("close draft", lambda p: torch.softmax(torch.log(p[:-1]) + 0.1 * torch.randn(p.shape[0] - 1, VOCAB), -1)),
        ("far draft", lambda p: random_dists(p.shape[0] - 1, 99, sharpness=3.0)),
        ("one-hot draft", lambda p: torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), VOCAB).float()),
    ],
)
def test_speculative_sampling_reproduces_the_oracle_distribution(name, q_of):
    """First committed token ~ p_1; second token (rounds that accepted d_1) ~ p_2."""
    torch.manual_seed(0)
    p = random_dists(4, 5, sharpness=1.5)  # context-free target: p_i does not depend on the prefix
    q = q_of(p)
    first, second, accepted = [], [], 0
    for seed in range(TRIALS):
        committed, m = speculate(p, q, seed)
        first.append(committed[0])
        accepted += m
        if m >= 1:
            second.append(committed[1])
    assert_matches(first, p[0])
    assert_matches(second, p[1])
    if name == "close draft":
        assert accepted / (3 * TRIALS) > 0.7
    if name == "far draft":
        assert accepted / (3 * TRIALS) < 0.6


def test_sparse_proposal_round_trip():
    row = sparse_to_dense([4, 1], [0.75, 0.25], VOCAB)
    assert row.tolist() == [0.0, 0.25, 0.0, 0.0, 0.75, 0.0]


class TestWarp:
    def test_temperature_sharpens(self):
        logits = torch.tensor([[1.0, 2.0, 3.0]])
        cold = warp_probs(logits, SamplingParams(temperature=0.5))
        hot = warp_probs(logits, SamplingParams(temperature=2.0))
        assert cold[0, 2] > hot[0, 2]
        assert torch.allclose(cold.sum(-1), torch.ones(1))

    def test_top_k_keeps_k_tokens(self):
        probs = warp_probs(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), SamplingParams(temperature=1.0, top_k=2))
        assert (probs[0] > 0).tolist() == [False, True, False, True]

    def test_top_p_keeps_the_smallest_prefix_reaching_p(self):
        logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
        probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
        assert (probs[0] > 0).tolist() == [True, True, False, False]
        probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
        assert (probs[0] > 0).tolist() == [True, True, True, False]

    def test_greedy_has_no_warp(self):
        with pytest.raises(ValueError):
            warp_probs(torch.zeros(1, 3), SamplingParams(temperature=0.0))

    def test_sample_from_follows_the_cdf(self):
        probs = torch.tensor([0.0, 0.5, 0.0, 0.5])
        assert sample_from(probs, 0.0) == 1
        assert sample_from(probs, 0.49) == 1
        assert sample_from(probs, 0.51) == 3
        assert sample_from(probs, 0.999999) == 3
