"""Per-request speculation statistics (coordinator.session.stats), with the terms of specd.core.verification."""

from __future__ import annotations

from coordinator.session.stats import RoundObservation, SpeculationStats
from specd.core.verification import acceptance_rate, mean_acceptance_length


def test_looked_up_tokens_count_as_accepted_by_position_in_a_chain_and_by_path_in_a_tree():
    chain = RoundObservation(k=4, accepted=2, draft_seconds=0, verify_seconds=0, lookup_positions=(1, 3))
    assert chain.lookup_accepted == 1  # position 1 is in the accepted prefix, 3 is not
    # A tree: 0 and 1 are the root's children, 2 continues 1, 3 continues 0. The path is 1 -> 2.
    tree = RoundObservation(
        k=4, accepted=2, draft_seconds=0, verify_seconds=0, lookup_positions=(0, 2),
        parents=(-1, -1, 1, 0), path=(1, 2),
    )
    assert tree.lookup_accepted == 1  # 2 is on the path; 0 sits at an index below `accepted` but is not


def test_rates_with_no_drafted_round():
    assert acceptance_rate(0, 0) == 0.0 and mean_acceptance_length(0, 0) == 1.0
    stats = SpeculationStats()
    stats.record(RoundObservation(k=0, accepted=0, draft_seconds=0, verify_seconds=0.01))
    assert stats.acceptance_rate == 0.0 and stats.mean_acceptance_length == 1.0
    stats.record(RoundObservation(k=3, accepted=2, draft_seconds=0.001, verify_seconds=0.01))
    assert stats.acceptance_rate == 2 / 3 and stats.mean_acceptance_length == 3.0
    assert stats.to_proto().mean_acceptance_length == 3.0
