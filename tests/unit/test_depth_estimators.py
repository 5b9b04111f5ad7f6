"""The goodput policy's estimators on their own (coordinator/depth/estimators.py), and policy specs."""

from __future__ import annotations

import pytest

from coordinator.depth import GoodputDepth, make_policy
from coordinator.depth.estimators import CalibrationBands, DiscountedRates, VerifyCostModel


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


def test_discounted_rates_carry_at_most_carry_tests_and_pad_to_size():
    rates = DiscountedRates(3, window=8.0, shrink=2.0, carry=4.0)
    accepted, tested = rates.carried([8.0, 1.0], [16.0, 2.0])
    assert tested == [4.0, 2.0, 0.0] and accepted == [2.0, 1.0, 0.0]  # the rate of a position is kept
    assert rates.carried([1.0], [1.0, 2.0]) == ([0.0] * 3, [0.0] * 3)  # mismatched counts: nothing carried


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


def test_verify_cost_uses_trusted_depths_and_a_line_elsewhere():
    seconds, rounds = {0: 0.040, 4: 0.060}, {0: 5, 4: 1}
    model = VerifyCostModel(seconds, rounds, trusted_rounds=3, weight_cap=20, assumed_growth=0.05)
    mean_k = (5 * 0 + 1 * 4) / 6
    mean_t = (5 * 0.040 + 1 * 0.060) / 6
    slope = (5 * (0 - mean_k) * (0.040 - mean_t) + 1 * (4 - mean_k) * (0.060 - mean_t)) / (
        5 * (0 - mean_k) ** 2 + 1 * (4 - mean_k) ** 2
    )
    assert model.line() == pytest.approx((mean_k, mean_t, slope))
    assert model.seconds(0) == 0.040  # trusted: its own average
    assert model.seconds(4) == pytest.approx(0.040 + 4 * slope)  # not trusted yet: from the nearest trusted depth
    assert model.growth() == pytest.approx(slope)
    one = VerifyCostModel({2: 0.05}, {2: 1}, trusted_rounds=3, weight_cap=20, assumed_growth=0.1)
    assert one.growth() == pytest.approx(0.005) and one.seconds(4) == pytest.approx(0.05 + 2 * 0.005)
    assert VerifyCostModel({}, {}, trusted_rounds=3, weight_cap=20, assumed_growth=0.1).seconds(3) == 1.0


def test_goodput_specs_take_a_lower_k_max():
    assert make_policy("goodput:k_max=4,smoothing=0.2", 8).k_max == 4
    assert make_policy("goodput:k_max=12", 8).k_max == 8  # never above the pair's maximum
    assert isinstance(make_policy("goodput:k_max=8,smoothing=0.3,probe_every=16", 8), GoodputDepth)
    for bad in ("goodput:k_max=0", "goodput:k_max=x", "goodput:depth=3"):
        with pytest.raises(ValueError):
            make_policy(bad, 8)
