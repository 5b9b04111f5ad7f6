"""Int8 draft layers: close to the float layer, never in the exempt layers, and the output stays the
oracle's own (the draft's arithmetic changes only what gets accepted)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from draft_service.config import DraftConfig
from specd.core.sampling import SamplingParams
from specd.kernels.int8_linear import Int8Linear, int8_available, use_int8_linear
from specd.models.loader import load_model
from specd.models.tiny import build_tokenizer
from specd.runtime.drafter import Drafter
from specd.runtime.verifier import Verifier
from tests.conftest import greedy_reference
from tests.service.test_exactness import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no quantized CPU kernels")
LIMITS = {"max_sessions": 4, "session_ttl_seconds": 60.0, "max_depth": 8}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 33])
def test_close_to_the_float_layer(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    layer = Int8Linear(linear)
    for x in (torch.randn(rows, 96), torch.randn(1, rows, 96)):
        with torch.no_grad():
            expected, got = linear(x), layer(x)
        assert got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) < 0.03


@pytest.mark.parametrize("bias", [True, False])
def test_a_row_is_the_same_alone_or_in_any_block(bias):
    """Each row has its own input scale: a batched draft step changes no session's proposals."""
    torch.manual_seed(7)
    layer = Int8Linear(nn.Linear(96, 160, bias=bias))
    rows = torch.randn(6, 96) * torch.tensor([[0.01], [1.0], [30.0], [0.5], [4.0], [0.0]])
    with torch.no_grad():
        together = layer(rows)
        alone = torch.cat([layer(rows[i : i + 1]) for i in range(len(rows))])
        shuffled = layer(rows.flip(0)).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, shuffled)


def test_swaps_large_layers_but_not_the_exempt_or_small_ones(tiny_dir):
    model = load_model(str(tiny_dir / "layers")).model  # a draft with `reduce` too (several oracle hidden states)
    assert model.int8_exempt == ("fuse", "reduce")
    swapped = use_int8_linear(model, min_elements=0)
    kinds = {name: type(module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, Int8Linear))}
    assert kinds["fuse"] is nn.Linear and kinds["reduce"] is nn.Linear
    assert swapped == len(kinds) - 2
    assert all(kind is Int8Linear for name, kind in kinds.items() if name not in model.int8_exempt)
    small = load_model(str(tiny_dir / "oracle")).model
    assert use_int8_linear(small, min_elements=10**9) == 0


def test_the_draft_setting_defaults_to_int8_and_checks_its_value():
    assert DraftConfig().quantize == "int8"
    with pytest.raises(ValidationError):
        DraftConfig(quantize="int4")


def _generate(verifier: Verifier, drafter: Drafter, prompt: list[int], k: int, params: SamplingParams) -> tuple[list[int], int, int]:
    """The coordinator's loop in one process: (tokens, drafted, accepted)."""
    verifier.open("s", prompt, params)
    drafter.open("s", prompt, params)
    tokens: list[int] = []
    append: list[int] = []
    drafted = accepted = 0
    try:
        while len(tokens) < MAX_TOKENS:
            proposal = drafter.propose("s", append, 0, k)
            distributions = [(d.token_ids, d.probs) for d in proposal.distributions]
            result = verifier.verify("s", proposal.tokens, distributions, 0)
            append = result.verdict.committed(proposal.tokens)
            tokens += append
            drafted += len(proposal.tokens)
            accepted += result.verdict.accepted
    finally:
        verifier.close("s")
        drafter.close("s")
    return tokens[:MAX_TOKENS], drafted, accepted


def test_an_int8_draft_keeps_the_output_exact_and_nearly_fully_accepted(tiny_dir):
    """The draft is the oracle itself with every linear layer in int8: its guesses are rarely wrong,
    and wherever they are the oracle's own token is what comes out."""
    oracle_dir = str(tiny_dir / "oracle")
    verifier = Verifier(load_model(oracle_dir), **LIMITS)
    draft = load_model(oracle_dir)
    assert use_int8_linear(draft.model, min_elements=0) > 0
    drafter = Drafter(draft, **LIMITS)
    tokenizer = build_tokenizer()
    drafted = accepted = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        tokens, d, a = _generate(verifier, drafter, ids, 4, SamplingParams())
        assert tokens == greedy_reference(tiny_dir / "oracle", ids, MAX_TOKENS), prompt
        drafted, accepted = drafted + d, accepted + a
    assert accepted >= 0.8 * drafted


def test_a_sampled_session_with_an_int8_draft_is_reproducible_by_seed(tiny_dir):
    oracle_dir = str(tiny_dir / "oracle")
    verifier = Verifier(load_model(oracle_dir), **LIMITS)
    draft = load_model(oracle_dir)
    use_int8_linear(draft.model, min_elements=0)
    drafter = Drafter(draft, **LIMITS)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    runs = [_generate(verifier, drafter, [5, 6, 7, 8], 3, params) for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] > 0
