"""The goodput policy's estimators on their own (coordinator/depth/estimators.py)."""

from __future__ import annotations

import pytest

from coordinator.depth.estimators import MIN_VERIFY_SECONDS, CalibrationBands, DiscountedRates, VerifyCostModel

# -- DiscountedRates ---------------------------------------------------------------------------------------------


def test_discounted_rates_fade_count_and_shrink_towards_the_position_before():
    rates = DiscountedRates(3, window=4.0, shrink=2.0, carry=8.0)
    accepted, tested = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    assert list(rates.count(accepted, tested, reached=2, kept=1)) == [0, 1]  # position 1 kept, 2 rejected
    assert (accepted, tested) == ([1.0, 0.0, 0.0], [1.0, 1.0, 0.0])
    rates.count(accepted, tested, reached=1, kept=1)  # everything fades by 1 - 1/4 first
    assert accepted == pytest.approx([1.75, 0.0, 0.0]) and tested == pytest.approx([1.75, 0.75, 0.0])
    a1 = (1.75 + 2 * 0.5) / (1.75 + 2)
    a2 = (0.0 + 2 * a1) / (0.75 + 2)
    assert rates.estimates(accepted, tested, prior=0.5) == pytest.approx([a1, a2, a2])  # untested: inherits
    assert DiscountedRates(2, window=4.0, shrink=0.0, carry=8.0).estimates([0.0, 0.0], [0.0, 0.0], 0.3) == [0.3, 0.3]


def test_discounted_rates_fade_untested_positions_every_round_of_their_kind():
    rates = DiscountedRates(2, window=2.0, shrink=0.0, carry=8.0)
    assert rates.fade == 0.5
    accepted, tested = [4.0, 4.0], [4.0, 8.0]
    assert list(rates.count(accepted, tested, reached=0, kept=0)) == []  # nothing tested: the counts still halve
    assert (accepted, tested) == ([2.0, 2.0], [2.0, 4.0])
    # A block deeper than the estimator counts only the positions it has; nothing kept: misses only.
    assert list(rates.count(accepted, tested, reached=5, kept=0)) == [0, 1]
    assert (accepted, tested) == ([1.0, 1.0], [2.0, 3.0])


def test_discounted_rates_shrink_towards_the_prior_first_then_each_position_before():
    rates = DiscountedRates(3, window=8.0, shrink=1.0, carry=8.0)
    # Position 1: (3 + 1 x 0.5) / (3 + 1) = 0.875; position 2 is pulled towards 0.875, not towards the prior.
    assert rates.estimates([3.0, 0.0, 1.0], [3.0, 1.0, 1.0], prior=0.5) == pytest.approx(
        [0.875, 0.875 / 2, (1.0 + 0.875 / 2) / 2]
    )
    # Without shrink the raw rates stand wherever there are tests.
    assert DiscountedRates(2, window=8.0, shrink=0.0, carry=8.0).estimates([1.0, 3.0], [4.0, 4.0], 0.9) == [
        0.25, 0.75,
    ]


def test_discounted_rates_carry_at_most_carry_tests_and_pad_to_size():
    rates = DiscountedRates(3, window=8.0, shrink=2.0, carry=4.0)
    accepted, tested = rates.carried([8.0, 1.0], [16.0, 2.0])
    assert tested == [4.0, 2.0, 0.0] and accepted == [2.0, 1.0, 0.0]  # the rate of a position is kept
    assert rates.carried([1.0], [1.0, 2.0]) == ([0.0] * 3, [0.0] * 3)  # mismatched counts: nothing carried
    assert rates.carried([1.0, 0.0, 0.0], [0.0, 0.0, 0.0]) == ([0.0] * 3, [0.0] * 3)  # hits without tests: dropped
    assert DiscountedRates(3, window=8.0, shrink=2.0, carry=0.0).carried([3.0], [4.0]) == ([0.0] * 3, [0.0] * 3)


# -- CalibrationBands --------------------------------------------------------------------------------------------


def test_calibration_bands_cap_their_evidence_and_stay_non_decreasing():
    bands = CalibrationBands(4, shrink=1.0, cap=3.0)
    assert [bands.band(p) for p in (0.0, 0.24, 0.25, 0.99, 1.0)] == [0, 0, 1, 3, 3]
    assert bands.middles() == [0.125, 0.375, 0.625, 0.875]
    accepted, tested = [0.0] * 4, [0.0] * 4
    for hit in (True, True, True, False):
        bands.count(accepted, tested, 2, hit)
    assert tested[2] == pytest.approx(3.0) and accepted[2] == pytest.approx(3 * 0.75)  # 3 of 4, scaled to the cap
    # Band 0 says 0.9 from 9 tests, band 1 says 0.1 from 9: pooled, both read the weighted mean.
    estimates = CalibrationBands(2, shrink=1.0, cap=100.0).estimates([9.0, 1.0], [10.0, 10.0], [0.5, 0.5])
    assert estimates[0] == estimates[1] == pytest.approx((9.5 + 1.5) / 22)


def test_calibration_bands_let_old_evidence_give_way_beyond_the_cap():
    bands = CalibrationBands(1, shrink=0.0, cap=2.0)
    accepted, tested = [0.0], [0.0]
    for hit in (True, True):
        bands.count(accepted, tested, 0, hit)
    assert (accepted, tested) == ([2.0], [2.0])  # at the cap: nothing scaled yet
    bands.count(accepted, tested, 0, False)  # 2 of 3, scaled back to 2 tests
    assert tested == [2.0] and accepted == pytest.approx([4 / 3])
    bands.count(accepted, tested, 0, False)  # (4/3) of 3, scaled: the first hits weigh less and less
    assert tested == [2.0] and accepted == pytest.approx([8 / 9])


def test_calibration_bands_pull_towards_each_entrys_prior():
    bands = CalibrationBands(3, shrink=2.0, cap=100.0)
    assert bands.estimates([0.0] * 3, [0.0] * 3, (0.1, 0.5, 0.9)) == pytest.approx([0.1, 0.5, 0.9])  # untested
    assert bands.estimates([2.0, 0.0, 0.0], [2.0, 0.0, 0.0], (0.0, 0.5, 0.9)) == pytest.approx([0.5, 0.5, 0.9])


def test_calibration_bands_pool_only_the_entries_that_disagree():
    bands = CalibrationBands(3, shrink=0.0, cap=100.0)
    # 0.2, 0.6, 0.4: the last two disagree and pool to 0.5; the first stays alone.
    assert bands.estimates([2.0, 6.0, 4.0], [10.0, 10.0, 10.0], [0.5] * 3) == pytest.approx([0.2, 0.5, 0.5])
    # 0.9, 0.5, 0.0: the first two pool to 0.7 (weight 20), which then pools with 0.0 (weight 20): 0.35 for all.
    assert bands.estimates([9.0, 5.0, 0.0], [10.0, 10.0, 20.0], [0.5] * 3) == pytest.approx([0.35] * 3)
    # Already non-decreasing: left as it is.
    assert bands.estimates([1.0, 5.0, 9.0], [10.0, 10.0, 10.0], [0.5] * 3) == pytest.approx([0.1, 0.5, 0.9])


# -- VerifyCostModel ---------------------------------------------------------------------------------------------


def model(seconds: dict[int, float], rounds: dict[int, int], *, weight_cap: int = 20, growth: float = 0.05):
    return VerifyCostModel(seconds, rounds, trusted_rounds=3, weight_cap=weight_cap, assumed_growth=growth)


def test_verify_cost_uses_trusted_depths_and_a_line_elsewhere():
    seconds, rounds = {0: 0.040, 4: 0.060}, {0: 5, 4: 1}
    verify = model(seconds, rounds)
    mean_k = (5 * 0 + 1 * 4) / 6
    mean_t = (5 * 0.040 + 1 * 0.060) / 6
    slope = (5 * (0 - mean_k) * (0.040 - mean_t) + 1 * (4 - mean_k) * (0.060 - mean_t)) / (
        5 * (0 - mean_k) ** 2 + 1 * (4 - mean_k) ** 2
    )
    assert verify.line() == pytest.approx((mean_k, mean_t, slope))
    assert verify.seconds(0) == 0.040  # trusted: its own average
    assert verify.seconds(4) == pytest.approx(0.040 + 4 * slope)  # not trusted yet: from the nearest trusted depth
    assert verify.growth() == pytest.approx(slope)
    one = model({2: 0.05}, {2: 1}, growth=0.1)
    assert one.growth() == pytest.approx(0.005) and one.seconds(4) == pytest.approx(0.05 + 2 * 0.005)
    assert model({}, {}).seconds(3) == 1.0 and model({}, {}).growth() == 0.0
    assert (seconds, rounds) == ({0: 0.040, 4: 0.060}, {0: 5, 4: 1})  # the policy's state is read, not written


def test_verify_line_caps_each_depths_weight():
    seconds, rounds = {0: 0.04, 4: 0.08}, {0: 100, 4: 1}
    # With a cap of 1 both depths weigh the same: the centre is the middle, the slope the chord's.
    assert model(seconds, rounds, weight_cap=1).line() == pytest.approx((2.0, 0.06, 0.01))
    # With a cap of 20, depth 0 weighs 20 and depth 4 one: the centre moves towards 0, the slope stays.
    assert model(seconds, rounds, weight_cap=20).line() == pytest.approx((4 / 21, (20 * 0.04 + 0.08) / 21, 0.01))
    # A depth never counted weighs 1.
    assert model(seconds, {}, weight_cap=20).line() == pytest.approx((2.0, 0.06, 0.01))


def test_verify_slope_is_never_negative():
    verify = model({0: 0.05, 2: 0.04}, {0: 1, 2: 1})  # noise: the deeper block was faster
    assert verify.line() == pytest.approx((1.0, 0.045, 0.0))
    assert verify.growth() == 0.0 and verify.seconds(4) == pytest.approx(0.045)  # no trusted depth: the centre


def test_a_depth_never_costs_more_than_a_trusted_deeper_one():
    """A stale average (k = 0 timed during a stall, then no longer chosen) is capped by what deeper blocks
    cost now; an untrusted deeper depth caps nothing."""
    seconds, rounds = {0: 0.300, 4: 0.012, 8: 0.014, 6: 0.001}, {0: 40, 4: 5, 8: 5, 6: 1}
    verify = model(seconds, rounds)
    assert verify.averages() == {0: 0.012, 4: 0.012, 8: 0.014, 6: 0.001}
    assert verify.seconds(0) == 0.012
    assert verify.seconds(2) <= 0.012 and verify.seconds(5) <= 0.014  # drawn from a line, then capped
    assert verify.seconds(8) == 0.014
    assert model({0: 0.3, 4: 0.012}, {0: 40, 4: 2}).seconds(0) == 0.3  # 4 not trusted yet
    assert seconds[0] == 0.300  # the state is read, not written


def test_verify_cost_draws_from_the_nearest_trusted_depth_the_smaller_on_a_tie():
    verify = model({1: 0.05, 3: 0.09, 5: 0.10}, {1: 3, 3: 3, 5: 1})
    slope = verify.line()[2]
    assert 0 < slope < 0.02  # not the chord of 1 and 3, so the anchor matters
    assert verify.seconds(2) == pytest.approx(0.05 + slope)  # 1 and 3 are as near: the smaller
    assert verify.seconds(4) == pytest.approx(0.09 + slope)  # 3 is nearer than 1 (5 is not trusted)
    assert verify.seconds(5) == pytest.approx(0.09 + 2 * slope)
    # A line drawn below a trusted depth never reads a free verify.
    steep = model({4: 0.01, 6: 0.5}, {4: 3, 6: 1})
    assert steep.seconds(0) == MIN_VERIFY_SECONDS
