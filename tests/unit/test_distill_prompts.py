"""The shipped distillation prompt set (specd/data/distill_prompts.jsonl): its breadth, its shape, and
its separation from the benchmark's held-out prompts."""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from specd.bench.prompts import read_prompts as read_bench_prompts
from specd.training.prompts import DEFAULT_PROMPTS, Prompt, load_prompts, split_held_out

# The least each kind should hold; the set is wider than this (docs/default-pair.md has the counts).
MINIMUM_PER_KIND = {
    "chat": 150,
    "qa": 100,
    "code": 200,
    "extract": 100,
    "creative": 80,
    "extraction": 120,
    "multi_turn": 80,
    "long": 80,
}
# Kinds added after the first 672 prompts: written so that no two are near-copies of each other.
NEWER_KINDS = {"extraction", "multi_turn", "long"}


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return load_prompts(DEFAULT_PROMPTS)


def text(prompt: Prompt) -> str:
    return "\n".join(content for _, content in prompt.messages)


def word_runs(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_every_kind_is_well_represented(prompts: list[Prompt]):
    counts = Counter(p.kind for p in prompts)
    assert set(counts) == set(MINIMUM_PER_KIND)
    for kind, minimum in MINIMUM_PER_KIND.items():
        assert counts[kind] >= minimum, (kind, counts[kind])


def test_conversations_alternate_and_end_with_the_user(prompts: list[Prompt]):
    for prompt in prompts:
        roles = [role for role, _ in prompt.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles
        assert all(content.strip() for _, content in prompt.messages)
        if prompt.kind == "multi_turn":
            assert len(roles) in (5, 7), roles  # two or three earlier exchanges


def test_no_duplicates(prompts: list[Prompt]):
    keys = Counter(p.key for p in prompts)
    assert [key for key, n in keys.items() if n > 1] == []


def test_newer_prompts_are_not_near_copies_of_each_other(prompts: list[Prompt]):
    runs = [word_runs(text(p), 5) for p in prompts if p.kind in NEWER_KINDS]
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            assert len(a & b) <= 0.5 * len(a | b)


def test_benchmark_prompts_stay_out(prompts: list[Prompt]):
    bench = [content for p in read_bench_prompts() for role, content in p.messages if role == "user"]
    bench_runs = set().union(*(word_runs(b, 10) for b in bench))
    for prompt in prompts:
        body = text(prompt)
        assert not any(b.strip() in body for b in bench), body[:80]
        # A near-copy shares a run of ten words with a benchmark prompt.
        assert not word_runs(body, 10) & bench_runs, body[:80]


def test_held_out_split_keeps_a_tenth_of_every_kind(prompts: list[Prompt]):
    train, held_out = split_held_out(prompts, 0.1)
    assert 0.07 < len(held_out) / len(prompts) < 0.13
    assert {p.kind for p in held_out} == {p.kind for p in prompts}
    assert {p.kind for p in train} == {p.kind for p in prompts}


def test_extraction_prompts_carry_a_whole_document(prompts: list[Prompt]):
    lengths = [len(text(p).split()) for p in prompts if p.kind == "extraction"]
    assert statistics.median(lengths) >= 150
    assert min(lengths) >= 120
