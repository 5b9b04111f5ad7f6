"""The oracle's features of several hidden states (Segment.feature_layers, OpenOracleSessionRequest.feature_layers):
what transformers reports as output_hidden_states, a row's own in any pass, checked at open, never mixed in the
prefix cache; and the pairing of drafts that read them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from specd.core.errors import InvalidArgument
from specd.core.sampling import SamplingParams
from specd.kernels.cpu_linear import onednn_available
from specd.models.tiny import write_tiny_model
from specd.runtime import batch as packed
from specd.runtime.engine import OracleEngine, StepStats
from specd.runtime.executor import ModelExecutor
from specd.runtime.kv import SessionCache
from specd.runtime.loading import load_worker_model
from specd.runtime.model_spec import ModelSpec
from specd.runtime.prefix_cache import PrefixCache
from specd.runtime.verifier import Verifier

LAYERS = 4  # N: hidden states 0..4, 4 the final state after the norm
HIDDEN = 64
GREEDY = SamplingParams()
PROMPT = [(5 * i) % 200 + 3 for i in range(27)]


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oracle-features") / "oracle"
    write_tiny_model(path, seed=3, layers=LAYERS, hidden=HIDDEN)
    return path


def make_verifier(oracle_dir: Path, **limits) -> Verifier:
    loaded = load_worker_model(ModelSpec(str(oracle_dir), cpu_linear="onednn" if onednn_available() else "stock"))
    return Verifier(loaded, **{"max_sessions": 16, "session_ttl_seconds": 60, "max_depth": 16, **limits})


def transformers_states(verifier: Verifier, tokens: list[int]) -> tuple[torch.Tensor, ...]:
    """transformers' own output_hidden_states of a plain forward over `tokens`, [n, H] each."""
    with torch.inference_mode():
        out = verifier.loaded.model.get_decoder()(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return tuple(state[0] for state in out.hidden_states)


def split(rows: torch.Tensor, count: int) -> list[torch.Tensor]:
    return list(rows.split(HIDDEN, dim=-1)) if count else [rows]


@pytest.mark.parametrize("lean", [True, False], ids=["lean-loop", "layer-forward"])
def test_a_packed_pass_keeps_the_hidden_states_transformers_reports(oracle_dir, lean):
    """Layers (0, 1, 3, N) of a packed pass, through the lean loop and through each layer's own forward, are
    transformers' hidden states; N is the final state the pass returns, bit for bit, and a segment that asks
    for nothing gets nothing and the same final states."""
    verifier = make_verifier(oracle_dir)
    model = verifier.loaded.model
    packed.use_row_exact_attention(model, lean)
    layers = (0, 1, 3, LAYERS)
    tokens = PROMPT[:12]
    asking = packed.Segment(SessionCache(), tokens, list(range(len(tokens))), feature_layers=layers)
    plain = packed.Segment(SessionCache(), tokens, list(range(len(tokens))))
    (final,) = packed.packed_forward(model, [asking])
    (plain_final,) = packed.packed_forward(model, [plain])
    assert plain.features is None and torch.equal(final, plain_final)
    assert asking.features is not None and asking.features.shape == (len(tokens), HIDDEN * len(layers))
    reference = transformers_states(verifier, tokens)
    for index, rows in zip(layers, split(asking.features, len(layers))):
        torch.testing.assert_close(rows, reference[index], rtol=1e-4, atol=1e-4)
    assert torch.equal(split(asking.features, len(layers))[-1], final)


async def test_a_rows_features_are_its_own_alone_and_batched(oracle_dir):
    """Sessions asking for different hidden states (and one for the final state alone) share a pass with a
    prompt's chunks: each gets the features a pass of its own gives, bit for bit under the oneDNN plan."""
    bitwise = onednn_available()
    asks = {"low": (0, 2), "all": (0, 1, 2, 3, LAYERS), "final": (), "middle": (3, 1)}
    prompts = {name: [(7 * i + len(name)) % 250 + 1 for i in range(9 + 3 * n)] for n, name in enumerate(asks)}
    rounds = {"low": [11, 12, 13], "all": [14], "final": [15, 16], "middle": []}

    def open_all(verifier: Verifier) -> None:
        for name, layers in asks.items():
            verifier.open(name, prompts[name], GREEDY, return_features=True, feature_layers=layers)

    alone = make_verifier(oracle_dir)
    open_all(alone)
    expected = {name: alone.verify(name, tokens, [], 0) for name, tokens in rounds.items()}
    expected_open = alone.open("new", PROMPT, GREEDY, return_features=True, feature_layers=(1, LAYERS))

    batched = make_verifier(oracle_dir)
    open_all(batched)
    steps: list[StepStats] = []
    engine = OracleEngine(batched, ModelExecutor("test-features"), prefill_chunk_tokens=8, on_step=steps.append)
    try:
        *results, opened = await asyncio.gather(
            *(engine.verify(name, tokens, [], 0) for name, tokens in rounds.items()),
            engine.open("new", PROMPT, GREEDY, return_features=True, feature_layers=(1, LAYERS)),
        )
    finally:
        await engine.stop()
    assert steps[0].sessions == 5
    for (name, layers), got in zip(asks.items(), results):
        want = expected[name]
        assert got.verdict == want.verdict and got.features is not None and want.features is not None
        assert got.features.rows.shape[1] == HIDDEN * max(1, len(layers))
        compare = torch.equal if bitwise else torch.allclose
        assert compare(got.features.rows, want.features.rows), name
    assert opened.features is not None and expected_open.features is not None
    assert (torch.equal if bitwise else torch.allclose)(opened.features.rows, expected_open.features.rows)


def test_open_and_verify_return_the_asked_states_and_the_final_ones_as_before(oracle_dir):
    """A session's features are transformers' hidden states of its committed positions; its N part is, bit for bit,
    what a session that asked for the final state alone gets (as before there were layers to ask for)."""
    verifier = make_verifier(oracle_dir)
    layers = (0, 2, LAYERS)
    opened = verifier.open("layers", PROMPT, GREEDY, return_features=True, feature_layers=layers)
    legacy = verifier.open("legacy", PROMPT, GREEDY, return_features=True)
    explicit = verifier.open("explicit", PROMPT, GREEDY, return_features=True, feature_layers=(LAYERS,))
    assert opened.features is not None and legacy.features is not None and explicit.features is not None
    assert verifier.sessions.get("explicit").feature_layers == ()  # (N,) is the final state alone
    assert torch.equal(explicit.features.rows, legacy.features.rows)
    parts = split(opened.features.rows, len(layers))
    assert torch.equal(parts[-1], legacy.features.rows)
    reference = transformers_states(verifier, PROMPT[:-1])
    for index, rows in zip(layers, parts):
        torch.testing.assert_close(rows, reference[index], rtol=1e-4, atol=1e-4)
    got = verifier.verify("layers", [40, 41, 42], [], 0)
    want = verifier.verify("legacy", [40, 41, 42], [], 0)
    assert got.verdict == want.verdict and got.features is not None and want.features is not None
    assert got.features.start == want.features.start == len(PROMPT) - 1
    assert torch.equal(split(got.features.rows, len(layers))[-1], want.features.rows)
    committed = verifier.sessions.get("layers").committed
    reference = transformers_states(verifier, committed[:-1])
    rows = len(got.features.rows)
    for index, part in zip(layers, split(got.features.rows, len(layers))):
        torch.testing.assert_close(part, reference[index][-rows:], rtol=1e-4, atol=1e-4)


def test_passes_of_one_session_each_give_the_same_features(oracle_dir):
    """Where the model cannot share passes (Verifier._forward_alone, KVSession.prefill's plain forward), the
    features are the same hidden states."""
    layers = (0, 1, LAYERS)
    shared = make_verifier(oracle_dir)
    own = make_verifier(oracle_dir)
    own.packed = False
    packed.use_row_exact_attention(own.loaded.model, False)
    results = []
    for verifier in (shared, own):
        opened = verifier.open("s", PROMPT, GREEDY, return_features=True, feature_layers=layers)
        verified = verifier.verify("s", [40, 41, 42], [], 0)
        tree = verifier.verify("s", [7, 8, 9, 10], [], 0, [-1, -1, 0, 1])
        results.append((opened, verified, tree))
    for a, b in zip(*results):
        assert a.features is not None and b.features is not None and a.features.start == b.features.start
        assert a.features.rows.shape == b.features.rows.shape == (len(a.features.rows), HIDDEN * len(layers))
        torch.testing.assert_close(a.features.rows, b.features.rows, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ((0, LAYERS + 1), "not hidden states of this oracle: it has 4 layers"),
        ((-1,), "not hidden states"),
        ((2, 2), "more than once"),
        (tuple(range(9)), "at most 8"),
    ],
)
def test_bad_layers_are_refused_at_open(oracle_dir, layers, message):
    verifier = make_verifier(oracle_dir)
    with pytest.raises(InvalidArgument, match=message):
        verifier.open("s", PROMPT, GREEDY, return_features=True, feature_layers=layers)
    with pytest.raises(InvalidArgument, match="needs return_features"):
        verifier.open("t", PROMPT, GREEDY, feature_layers=(0, 1))
    assert len(verifier.sessions) == 0 and not verifier._opening
    verifier.open("s", PROMPT, GREEDY, return_features=True, feature_layers=(0, 1))  # the id is free again


def test_the_prefix_cache_never_serves_features_of_other_layers(oracle_dir):
    """Entries hold the features their session asked for: a prompt finds only entries of its own layers (and
    sessions without features or with the final ones share theirs, as before)."""
    verifier = make_verifier(oracle_dir, prefix_cache_tokens=4096)
    fresh = make_verifier(oracle_dir)
    layers, other = (0, 2, LAYERS), (1, LAYERS)
    first = verifier.open("a", PROMPT, GREEDY, return_features=True, feature_layers=layers)
    assert first.cached_tokens == 0
    final = verifier.open("b", PROMPT, GREEDY, return_features=True)
    assert final.cached_tokens == 0  # the entry of (0, 2, N) has no final states alone
    shifted = verifier.open("c", PROMPT, GREEDY, return_features=True, feature_layers=other)
    assert shifted.cached_tokens == 0
    again = verifier.open("d", PROMPT, GREEDY, return_features=True, feature_layers=layers)
    plain = verifier.open("e", PROMPT, GREEDY)
    assert again.cached_tokens > 0 and plain.cached_tokens > 0  # plain: the entry of b's final states
    for result, asked in ((again, layers), (final, ()), (shifted, other)):
        want = fresh.open(f"fresh-{asked}", PROMPT, GREEDY, return_features=True, feature_layers=asked)
        assert result.features is not None and want.features is not None
        assert torch.allclose(result.features.rows, want.features.rows), asked


def test_prefix_entries_of_other_layers_live_apart():
    cache = PrefixCache(1024)
    tokens = list(range(1, 17))
    layers = [(torch.zeros(1, 2, 16, 4), torch.zeros(1, 2, 16, 4))]
    assert cache.store(tokens, layers, torch.ones(16, 8), feature_layers=(0, 1))
    assert cache.lookup(tokens, features=True) is None
    assert cache.lookup(tokens, features=True, feature_layers=(1, 0)) is None
    assert cache.lookup(tokens) is None  # keys and values of a layers entry are not shared
    hit = cache.lookup(tokens, features=True, feature_layers=(0, 1))
    assert hit is not None and hit.length == 16 and hit.entry.features is not None
    assert cache.store(tokens, layers, torch.zeros(16, 4))  # the final states: an entry of their own
    final = cache.lookup(tokens, features=True)
    assert final is not None and final.entry.features is not None and final.entry.features.shape == (16, 4)
    assert cache.lookup(tokens, features=True, feature_layers=(0, 1)).entry is hit.entry
