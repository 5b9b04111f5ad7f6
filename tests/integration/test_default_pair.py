"""The embedded default pair (SmolLM2-135M-Instruct from its GGUF file and each shipped draft):
greedy speculative output equals the oracle's own greedy `generate`."""

from __future__ import annotations

import pytest
import torch

from coordinator.depth import FixedDepth
from coordinator.session.generation import GenerationRequest, stream_generation
from coordinator.session.pairing import connect_pair
from draft_service.config import DraftConfig
from oracle_service.config import OracleConfig
from specd.cluster.roles import start_local_worker
from specd.core.defaults import EMBEDDED_ORACLE
from specd.models.loader import load_model
from specd.models.shipped import default_draft_source, standalone_draft_source

pytestmark = pytest.mark.slow
MAX_TOKENS = 32


async def generate(oracle, draft, messages, depth: int):
    pair = await connect_pair(oracle.address, draft.address)
    request = GenerationRequest(chat=messages, max_tokens=MAX_TOKENS)
    ids, final = [], None
    try:
        async for delta in stream_generation(request, pair, FixedDepth(depth)):
            ids += delta.token_ids
            final = delta
    finally:
        await pair.oracle.close()
        await pair.draft.close()
    return ids, final, pair.codec.encode_chat(messages)


@pytest.mark.parametrize("choose_draft", [default_draft_source, standalone_draft_source], ids=["default", "standalone"])
async def test_default_pair_is_exact(choose_draft):
    """With float32 weights: against transformers' own greedy generate of the oracle."""
    draft_model, draft_layers = choose_draft()
    oracle = await start_local_worker(OracleConfig(model=EMBEDDED_ORACLE, port=0, layers=0, weights="float32"))
    draft = await start_local_worker(DraftConfig(model=draft_model, layers=draft_layers, port=0))
    messages = [{"role": "user", "content": "List three primary colors."}]
    try:
        ids, final, prompt = await generate(oracle, draft, messages, 4)
    finally:
        await oracle.stop()
        await draft.stop()
    reference = load_model(EMBEDDED_ORACLE)
    with torch.inference_mode():
        out = reference.model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = out[0, len(prompt) :].tolist()
    if expected and expected[-1] in reference.eos_token_ids:
        expected = expected[:-1]  # specd reports the text before end-of-sequence
    assert ids == expected
    assert final.stats.drafted > 0


@pytest.mark.parametrize("weights", ["auto", "int4"])
async def test_default_pair_is_exact_under_its_weights_plan(weights):
    """Under the default weights plan (auto: per layer shape the cheapest of float32, float16 and int4, timed) and
    under int4 (bfloat16 inputs, where torch's block attention would show), the oracle served is that arithmetic's:
    speculation equals that worker's own output at k = 0."""
    oracle = await start_local_worker(OracleConfig(model=EMBEDDED_ORACLE, port=0, weights=weights))
    draft = await start_local_worker(DraftConfig(port=0))
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    try:
        alone, _, _ = await generate(oracle, draft, messages, 0)
        for depth in (2, 5):
            ids, final, _ = await generate(oracle, draft, messages, depth)
            assert ids == alone, f"k={depth}"
            assert final.stats.drafted > 0
    finally:
        await oracle.stop()
        await draft.stop()
