"""The workers on a CUDA device: exact greedy output, reproducible sampling, and a pair split
across devices (oracle on the GPU, draft on the CPU). Skipped where torch sees no GPU."""

from __future__ import annotations

import pytest
import torch

from coordinator.depth import FixedDepth, GoodputDepth
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import SessionRequest, SpeculativeSession, run_to_completion
from specd.cluster.roles import start_local_worker
from specd.core.sampling import SamplingParams
from specd.models.artifact import DraftManifest, save_draft_artifact, slice_output_head
from specd.models.feature_draft import FeatureDraftModel
from specd.models.loader import load_model
from specd.runtime.drafter import Drafter
from specd.runtime.verifier import Verifier
from specd.v1 import common_pb2
from tests.conftest import draft_config, oracle_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 40, 41, 42], [100, 3, 200, 17]]
MAX_TOKENS = 32
LIMITS = {"max_sessions": 4, "session_ttl_seconds": 60.0, "max_depth": 8}


@pytest.fixture(scope="module")
async def cuda_workers(tiny_dir):
    started = {
        "oracle": await start_local_worker(oracle_config(tiny_dir, device="cuda")),
        "same": await start_local_worker(draft_config(tiny_dir, "oracle", device="cuda", lookup_min_ngram=0)),
        "lookup": await start_local_worker(draft_config(tiny_dir, "unrelated", device="cuda")),
        "feature": await start_local_worker(draft_config(tiny_dir, "feature", device="cuda")),
        "cpu_feature": await start_local_worker(draft_config(tiny_dir, "feature", device="cpu")),
    }
    yield started
    for worker in started.values():
        await worker.stop()


@pytest.fixture(scope="module")
def cuda_reference(tiny_dir):
    """The oracle alone on the same GPU: transformers greedy generate."""
    loaded = load_model(str(tiny_dir / "oracle"), device="cuda")
    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt], device="cuda")
            generated = loaded.model.generate(
                ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False
            )
            out[tuple(prompt)] = generated[0, len(prompt) :].tolist()
    return out


async def generate(oracle, draft, prompt, k, sampling=None, policy=None):
    oracle_client, draft_client = OracleClient(oracle.address), DraftClient(draft.address)
    try:
        session = SpeculativeSession(
            SessionRequest(prompt=prompt, sampling=sampling or common_pb2.SamplingParams(), max_tokens=MAX_TOKENS),
            draft_client,
            oracle_client,
            policy or FixedDepth(k),
        )
        return await run_to_completion(session), session.stats
    finally:
        await oracle_client.close()
        await draft_client.close()


@pytest.mark.parametrize("k", [1, 3, 8])
async def test_identical_draft_on_the_gpu_is_exact_and_fully_accepted(cuda_workers, cuda_reference, k):
    for prompt in PROMPTS:
        tokens, stats = await generate(cuda_workers["oracle"], cuda_workers["same"], prompt, k)
        assert tokens == cuda_reference[tuple(prompt)]
        assert stats.accepted == stats.drafted > 0


@pytest.mark.parametrize("draft", ["lookup", "feature", "cpu_feature"])
@pytest.mark.parametrize("k", [2, 5])
async def test_drafts_on_either_device_are_exact_against_the_gpu_oracle(cuda_workers, cuda_reference, draft, k):
    for prompt in PROMPTS:
        tokens, _ = await generate(cuda_workers["oracle"], cuda_workers[draft], prompt, k)
        assert tokens == cuda_reference[tuple(prompt)], (draft, prompt)


@pytest.mark.parametrize("draft", ["lookup", "feature", "cpu_feature"])
async def test_blocks_the_stop_rule_ends_on_either_device_are_exact(cuda_workers, cuda_reference, draft):
    policy = GoodputDepth(k_max=8)
    for prompt in PROMPTS:
        tokens, _ = await generate(cuda_workers["oracle"], cuda_workers[draft], prompt, 8, policy=policy)
        assert tokens == cuda_reference[tuple(prompt)], (draft, prompt)
    assert sum(policy.state.calibration_tested) > 0


async def test_sampling_on_the_gpu_is_reproducible_by_seed(cuda_workers):
    sampling = common_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    runs = [await generate(cuda_workers["oracle"], cuda_workers["feature"], PROMPTS[0], 3, sampling) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == MAX_TOKENS


@pytest.mark.parametrize("kind", ["layers", "features"])
def test_reduced_head_drafts_sample_on_the_gpu(tiny_dir, tmp_path, kind):
    """Artifacts whose head keeps part of the vocabulary, loaded onto the GPU, in sampled sessions."""
    oracle = load_model(str(tiny_dir / "oracle"))
    kept = list(range(0, oracle.vocab_size, 3))
    if kind == "features":
        model = FeatureDraftModel(oracle.model, kept)
    else:
        model = load_model(str(tiny_dir / "oracle"), layers=1).model
        slice_output_head(model, kept)
    manifest = DraftManifest(
        base=str(tiny_dir / "oracle"), layers=1, vocab_fingerprint=oracle.vocab_fingerprint, head_token_ids=kept,
        kind=kind,
    )
    save_draft_artifact(tmp_path / kind, model, manifest, dtype=torch.float32)
    drafter = Drafter(load_model(str(tmp_path / kind), device="cuda"), **LIMITS)
    verifier = Verifier(load_model(str(tiny_dir / "oracle"), device="cuda"), **LIMITS)
    params = SamplingParams(temperature=0.9, seed=3)
    prompt = [5, 6, 7, 8]
    opened = verifier.open("s", prompt, params, return_features=kind == "features")
    drafter.open("s", prompt, params, features=opened.features)
    append, features, committed = [], None, list(prompt)
    for _ in range(6):
        proposal = drafter.propose("s", append, 0, 4, features)
        assert set(proposal.tokens) <= set(kept)
        result = verifier.verify("s", proposal.tokens, [(d.token_ids, d.probs) for d in proposal.distributions], 0)
        append, features = result.verdict.committed(proposal.tokens), result.features
        committed += append
    assert verifier.sessions.get("s").committed == committed
