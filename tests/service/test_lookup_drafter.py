"""Prompt lookup in the drafter: looked-up positions cost no model step, the rest are the model's own."""

from __future__ import annotations

import random

import pytest
import torch

from specd.core.lookup import NgramIndex
from specd.core.sampling import SamplingParams
from specd.models.loader import load_model
from specd.runtime.drafter import Drafter, SparseDistribution

LIMITS = {"max_sessions": 64, "session_ttl_seconds": 60.0, "max_depth": 8}


@pytest.fixture(scope="module")
def draft_model(tiny_dir):
    return load_model(str(tiny_dir / "oracle"))


def test_a_copied_block_runs_no_model_step(draft_model):
    drafter = Drafter(draft_model, lookup_ngram=(3, 8), **LIMITS)
    span = [40, 41, 42, 43, 44, 45, 46, 47]
    prompt = [3, 4, 5] + span + [60, 61] + span[:3]
    drafter.open("s", prompt, SamplingParams())
    passes = drafter.sessions.get("s").kv.forward_passes
    proposal = drafter.propose("s", [], 0, 5)
    assert proposal.tokens == span[3:8]
    assert proposal.looked_up == [0, 1, 2, 3, 4]
    assert drafter.sessions.get("s").kv.forward_passes == passes


def test_a_sampled_session_sends_looked_up_tokens_as_one_token_proposals(draft_model):
    drafter = Drafter(draft_model, lookup_ngram=(3, 8), **LIMITS)
    prompt = [3, 4, 5, 40, 41, 42, 43, 60, 61, 40, 41, 42]
    drafter.open("s", prompt, SamplingParams(temperature=0.8, seed=1))
    proposal = drafter.propose("s", [], 0, 3)
    assert proposal.tokens == [43, 60, 61]
    assert proposal.distributions == [SparseDistribution([t], [1.0]) for t in proposal.tokens]


@torch.inference_mode()
def model_argmax(model, ids: list[int]) -> int:
    return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def test_positions_lookup_cannot_fill_are_the_models_greedy_guesses(draft_model):
    """Against a cache-free forward over the whole prefix, position by position, on blocks that mix both."""
    rng = random.Random(0)
    drafter = Drafter(draft_model, lookup_ngram=(2, 4), **LIMITS)
    mixed = 0
    for case in range(40):
        # Random text, then the model's own greedy continuation of it, which drifts into repeats.
        prompt = [rng.randrange(5, 300) for _ in range(rng.randrange(2, 8))]
        for _ in range(rng.randrange(0, 16)):
            prompt.append(model_argmax(draft_model.model, prompt))
        drafter.open(f"s{case}", prompt, SamplingParams())
        proposal = drafter.propose(f"s{case}", [], 0, 6)
        index = NgramIndex(2, 4)
        index.extend(prompt)
        for i, token in enumerate(proposal.tokens):
            prefix = prompt + proposal.tokens[:i]
            if i in proposal.looked_up:
                assert token == index.match(prefix)[0]
            else:
                assert index.match(prefix) is None
                assert token == model_argmax(draft_model.model, prefix), (case, i)
        mixed += 0 < len(proposal.looked_up) < len(proposal.tokens)
        drafter.close(f"s{case}")
    assert mixed >= 3


def test_lookup_follows_the_committed_tokens_across_rounds(draft_model):
    """Tokens appended by later rounds become part of what lookup copies from."""
    drafter = Drafter(draft_model, lookup_ngram=(3, 3), **LIMITS)
    drafter.open("s", [3, 4, 5, 6], SamplingParams())
    drafter.propose("s", [], 0, 1)
    drafter.propose("s", [20, 21, 22, 23, 24, 9, 20, 21], 0, 1)
    proposal = drafter.propose("s", [22], 0, 2)
    assert proposal.tokens == [23, 24] and proposal.looked_up == [0, 1]
