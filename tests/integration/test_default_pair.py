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


@pytest.mark.parametrize("choose_draft", [default_draft_source, standalone_draft_source], ids=["default", "standalone"])
async def test_default_pair_is_exact(choose_draft):
    draft_model, draft_layers = choose_draft()
    oracle = await start_local_worker(OracleConfig(model=EMBEDDED_ORACLE, port=0, layers=0))
    draft = await start_local_worker(DraftConfig(model=draft_model, layers=draft_layers, port=0))
    try:
        pair = await connect_pair(oracle.address, draft.address)
        messages = [{"role": "user", "content": "List three primary colors."}]
        request = GenerationRequest(chat=messages, max_tokens=MAX_TOKENS)
        ids, final = [], None
        async for delta in stream_generation(request, pair, FixedDepth(4)):
            ids += delta.token_ids
            final = delta
        await pair.oracle.close()
        await pair.draft.close()
    finally:
        await oracle.stop()
        await draft.stop()
    reference = load_model(EMBEDDED_ORACLE)
    prompt = pair.codec.encode_chat(messages)
    with torch.inference_mode():
        out = reference.model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = out[0, len(prompt) :].tolist()
    if expected and expected[-1] in reference.eos_token_ids:
        expected = expected[:-1]  # specd reports the text before end-of-sequence
    assert ids == expected
    assert final.stats.drafted > 0
