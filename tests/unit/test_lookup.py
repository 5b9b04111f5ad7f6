"""Prompt lookup's n-gram index: which token it guesses, and when it has no guess."""

from __future__ import annotations

import random

import pytest

from specd.core.lookup import NgramIndex


def test_guesses_the_token_after_the_latest_earlier_occurrence():
    index = NgramIndex(2, 4)
    index.extend([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3])
    assert index.match([1, 2, 3])[0] == 7  # the later of the two earlier occurrences; the tail itself has no follower


def test_the_longest_match_wins_over_a_later_shorter_one():
    index = NgramIndex(1, 3)
    index.extend([4, 2, 3, 8, 5, 3, 6])
    assert index.match([2, 3])[0] == 8  # (2, 3) matched before the later (3) -> 6 is considered
    assert index.match([7, 3])[0] == 6  # no (7, 3): falls back to the latest (3)


def test_a_match_reports_its_length():
    index = NgramIndex(1, 4)
    index.extend([4, 2, 3, 8, 5, 3, 6])
    assert index.match([2, 3]) == (8, 2)
    assert index.match([7, 3]) == (6, 1)
    assert index.match([4, 2, 3, 8]) == (5, 4)
    assert index.match([9]) is None


def test_no_guess_without_an_earlier_match_of_at_least_min_n():
    index = NgramIndex(3, 4)
    index.extend([1, 2, 9, 1, 2])
    assert index.match([1, 2]) is None  # only a 2-gram repeats
    assert index.match([9, 1, 2]) is None  # that 3-gram occurs only at the end, with nothing after it yet
    assert index.match([]) is None


def test_recent_tokens_need_not_be_in_the_index():
    """Drafted tokens extend the tail that is looked up without being committed."""
    index = NgramIndex(2, 3)
    index.extend([1, 2, 3, 4, 5])
    assert index.match([9, 9, 2, 3])[0] == 4
    assert index.match([1, 2, 3, 4, 5]) is None


def test_incremental_extension_matches_one_extension():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(200)]
    whole, pieces = NgramIndex(2, 5), NgramIndex(2, 5)
    whole.extend(tokens)
    for start in range(0, len(tokens), 7):
        pieces.extend(tokens[start : start + 7])
    probes = [[rng.randrange(6) for _ in range(5)] for _ in range(100)]
    assert [whole.match(p) for p in probes] == [pieces.match(p) for p in probes]
    assert len(whole) == len(pieces) == 200


@pytest.mark.parametrize("min_n, max_n", [(0, 3), (4, 3), (-1, 2)])
def test_bad_lengths_are_refused(min_n, max_n):
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(min_n, max_n)


def test_copied_tokens_are_counted_apart_in_stats_and_metrics():
    from prometheus_client import CollectorRegistry

    from coordinator.session.stats import RoundObservation, SpeculationStats
    from specd.rpc.metrics import SpecDecodeCounters

    round = RoundObservation(k=5, accepted=3, draft_seconds=0.0, verify_seconds=0.1, lookup_positions=(1, 2, 4))
    assert round.lookup_accepted == 2  # positions 1 and 2 lie in the accepted prefix of 3
    stats = SpeculationStats()
    stats.record(round)
    assert (stats.lookup_drafted, stats.lookup_accepted, stats.drafted, stats.accepted) == (3, 2, 5, 3)

    registry = CollectorRegistry()
    counters = SpecDecodeCounters(registry, ("pair",), lookup=True)
    counters.record(5, 3, "p", lookup_drafted=3, lookup_accepted=round.lookup_accepted)
    sample = lambda name: registry.get_sample_value(name, {"pair": "p"})  # noqa: E731
    assert sample("specd_spec_decode_num_lookup_tokens_total") == 3
    assert sample("specd_spec_decode_num_lookup_accepted_tokens_total") == 2
    assert sample("specd_spec_decode_num_draft_tokens_total") == 5
