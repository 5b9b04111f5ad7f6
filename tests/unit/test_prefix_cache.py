"""The prefix cache: longest whole-block prefix, checked tokens, least recently used dropped first; a
session opened on a cached prefix holds what a fresh prefill computes, and writes the same output."""

from __future__ import annotations

import grpc
import torch

from specd.core.sampling import SamplingParams
from specd.models.loader import load_model
from specd.runtime.drafter import Drafter
from specd.runtime.prefix_cache import BLOCK, PrefixCache
from specd.runtime.verifier import Verifier
from specd.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc
from tests.conftest import greedy_reference

LIMITS = {"max_sessions": 4, "session_ttl_seconds": 60.0, "max_depth": 8}
SYSTEM = [(7 * i) % 300 + 20 for i in range(37)]  # a shared beginning of 37 tokens


def _layers(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for _ in range(3)]


def test_finds_the_longest_whole_block_prefix_and_checks_its_tokens():
    cache = PrefixCache(1024)
    tokens = list(range(100, 100 + 5 * BLOCK + 3))
    layers = _layers(len(tokens))
    assert cache.store(tokens, layers)
    entry = cache.entries[next(iter(cache.entries))]
    assert len(entry.tokens) == 5 * BLOCK and entry.layers[0][0].shape[-2] == 5 * BLOCK
    assert torch.equal(entry.layers[1][1], layers[1][1][..., : 5 * BLOCK, :])
    layers[1][1].zero_()
    assert entry.layers[1][1].abs().sum() > 0  # a copy
    assert not cache.store(tokens[: 5 * BLOCK + 1], layers)  # already held
    assert cache.lookup(tokens[: 4 * BLOCK + 3] + [1, 2]).length == 4 * BLOCK
    assert cache.lookup(tokens[: BLOCK + 2] + [1] * 20).length == BLOCK
    assert cache.lookup(tokens[: BLOCK - 1] + [1] * 30) is None
    assert cache.lookup([1] + tokens) is None
    # A hash that points at the wrong entry is not trusted.
    cache.store(list(range(500, 500 + 2 * BLOCK)), _layers(2 * BLOCK))
    first_hash = entry.hashes[0]
    cache.index[first_hash] = list(cache.entries)[-1]
    assert cache.lookup(tokens[: BLOCK + 2]) is None


def test_drops_the_least_recently_used_beyond_capacity_and_wants_features_when_asked():
    cache = PrefixCache(4 * BLOCK)
    a, b, c = (list(range(start, start + 2 * BLOCK)) for start in (0, 100, 200))
    cache.store(a, _layers(2 * BLOCK))
    cache.store(b, _layers(2 * BLOCK))
    assert cache.lookup(a) is not None  # a is now the most recently used
    cache.store(c, _layers(2 * BLOCK))
    assert cache.tokens_held <= 4 * BLOCK
    assert cache.lookup(b) is None and cache.lookup(a) is not None and cache.lookup(c) is not None
    assert cache.lookup(a, features=True) is None
    assert cache.store(a, _layers(2 * BLOCK), torch.randn(2 * BLOCK, 8))  # the same prefix, now with features
    assert cache.lookup(a, features=True).entry.features.shape == (2 * BLOCK, 8)
    assert PrefixCache(0).lookup(a) is None and not PrefixCache(0).store(a, _layers(2 * BLOCK))
    # A longer prompt over a held one replaces it: one entry, the longer.
    grows = PrefixCache(64 * BLOCK)
    grows.store(a, _layers(2 * BLOCK))
    grows.store(a + c, _layers(4 * BLOCK))
    assert len(grows.entries) == 1 and grows.tokens_held == 4 * BLOCK and grows.lookup(a).length == 2 * BLOCK


def _decode(
    verifier: Verifier, sid: str, prompt: list[int], n: int, *, features: bool = False,
    params: SamplingParams | None = None,
):
    opened = verifier.open(sid, prompt, params or SamplingParams(), return_features=features)
    tokens = []
    for _ in range(n):
        result = verifier.verify(sid, [], [], 0)
        tokens.append(result.verdict.next_token)
    return opened, tokens


def test_a_session_on_a_cached_prefix_holds_what_a_prefill_computes(tiny_dir):
    """A conversation's second turn reuses the first turn's prompt (not its answer, which verification
    computed); an oracle session that returns features reuses only prefixes stored with theirs."""
    oracle_dir = str(tiny_dir / "oracle")
    cached = Verifier(load_model(oracle_dir), prefix_cache_tokens=512, **LIMITS)
    cold = Verifier(load_model(oracle_dir), **LIMITS)
    for features in (False, True):
        turn = [5, 6, 7] if features else [5, 6, 8]
        first, answer = _decode(cached, "a", SYSTEM + turn, 12, features=features)
        assert first.cached_tokens == 0  # nothing fits yet: the first pass stored no features
        cached.close("a")
        follow_up = SYSTEM + turn + answer + [8, 9, 10, 11]
        hit, tokens = _decode(cached, "b", follow_up, 10, features=features)
        fresh, expected = _decode(cold, "b", follow_up, 10, features=features)
        assert hit.cached_tokens == (len(SYSTEM) + len(turn) - 1) // BLOCK * BLOCK
        assert tokens == expected
        ours, theirs = cached.sessions.get("b").kv, cold.sessions.get("b").kv
        assert ours.cached_ids == theirs.cached_ids
        for (k1, v1), (k2, v2) in zip(ours.layer_states(), theirs.layer_states()):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
        if features:
            torch.testing.assert_close(hit.features.rows, fresh.features.rows, rtol=1e-5, atol=1e-5)
        cached.close("b")
        cold.close("b")


def test_a_seeded_sampled_request_repeats_with_a_cache_hit(tiny_dir):
    verifier = Verifier(load_model(str(tiny_dir / "oracle")), prefix_cache_tokens=512, **LIMITS)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    runs = []
    for sid in ("first", "again"):
        opened, tokens = _decode(verifier, sid, SYSTEM + [40, 41], 16, params=params)
        verifier.close(sid)
        runs.append((opened.cached_tokens, tokens))
    assert runs[0][0] == 0 and runs[1][0] == (len(SYSTEM) + 1) // BLOCK * BLOCK > 0
    assert runs[0][1] == runs[1][1]


def test_speculation_over_a_cached_prefix_is_exact(tiny_dir):
    """Prompts sharing a beginning, through an oracle and a standalone draft that both cache prefixes."""
    oracle_dir = str(tiny_dir / "oracle")
    verifier = Verifier(load_model(oracle_dir), prefix_cache_tokens=512, **LIMITS)
    drafter = Drafter(load_model(str(tiny_dir / "unrelated")), prefix_cache_tokens=512, **LIMITS)
    hits = 0
    for tail in ([1, 2, 3], [4, 5], [1, 2, 3, 9]):
        prompt = SYSTEM + tail
        opened = verifier.open("s", prompt, SamplingParams())
        drafted = drafter.open("s", prompt, SamplingParams())
        hits += opened.cached_tokens > 0 and drafted.cached_tokens > 0
        tokens: list[int] = []
        append: list[int] = []
        while len(tokens) < 16:
            proposal = drafter.propose("s", append, 0, 3)
            append = verifier.verify("s", proposal.tokens, [], 0).verdict.committed(proposal.tokens)
            tokens += append
        verifier.close("s")
        drafter.close("s")
        assert tokens[:16] == greedy_reference(tiny_dir / "oracle", prompt, 16), tail
    assert hits == 2


async def test_the_oracle_service_reports_cached_positions(oracle):
    prompt = [(11 * i) % 290 + 30 for i in range(40)]
    async with grpc.aio.insecure_channel(oracle.address) as channel:
        stub = oracle_pb2_grpc.OracleServiceStub(channel)
        replies = []
        for sid in ("prefix-1", "prefix-2"):
            replies.append(await stub.OpenSession(oracle_pb2.OpenOracleSessionRequest(
                session_id=sid, prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(),
            )))
            await stub.CloseSession(common_pb2.CloseSessionRequest(session_id=sid))
    assert replies[0].cached_tokens == 0
    assert replies[1].cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK


async def test_the_coordinator_reports_the_cached_prompt(oracle, feature_draft):
    from tests.service.test_feature_draft import run_session

    prompt = [(13 * i) % 280 + 40 for i in range(30)]
    tokens, first = await run_session(oracle.address, feature_draft.address, prompt, 2)
    again, second = await run_session(oracle.address, feature_draft.address, prompt, 2)
    assert again == tokens
    assert first.stats.cached_prompt_tokens == 0
    assert second.stats.cached_prompt_tokens == (len(prompt) - 1) // BLOCK * BLOCK
    assert second.stats.to_proto().cached_prompt_tokens == second.stats.cached_prompt_tokens
