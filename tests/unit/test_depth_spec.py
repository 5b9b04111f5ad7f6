"""Depth-policy specs (coordinator/depth/spec.py), in particular a goodput spec's own k_max."""

from __future__ import annotations

import pytest

from coordinator.depth import GoodputDepth, make_policy
from coordinator.depth.spec import _goodput_options


def test_the_documented_example_spec_is_accepted():
    # specctl's help and admin.proto offer these.
    policy = make_policy("goodput:k_max=8", 8)
    assert isinstance(policy, GoodputDepth) and policy.k_max == 8
    example = make_policy("goodput:k_max=8,smoothing=0.3,probe_every=16", 8)
    assert (example.k_max, example.smoothing, example.probe_every) == (8, 0.3, 16)


def test_a_goodput_k_max_lowers_the_pairs_maximum_and_never_raises_it():
    assert make_policy("goodput:k_max=4,smoothing=0.2", 8).k_max == 4
    assert make_policy("goodput:k_max=12", 8).k_max == 8  # never above the pair's maximum
    assert make_policy("goodput:k_max=8", 5).k_max == 5
    assert make_policy("goodput:k_max=1", 8).k_max == 1
    assert make_policy(" GOODPUT: k_max=3 , smoothing=0.2, ", 8).k_max == 3  # case and spaces as elsewhere
    assert make_policy("goodput", 6).k_max == 6  # without the option: the pair's


def test_a_lowered_k_max_bounds_the_policys_decisions():
    policy = make_policy("goodput:k_max=3,probe_k=5", 8)
    assert policy.probe_k == 3  # a probe is clipped like any block
    assert len(policy.estimated_acceptance()) == 3
    assert policy.choose_k() == 3  # with the stop rule: the policy's k_max, not the pair's
    assert make_policy("goodput:k_max=3,confidence_stop=0", 8).choose_k() <= 3


def test_a_lowered_k_max_restores_the_first_positions_of_a_deeper_pairs_state():
    state = {"accepted_weight": [1.0, 2.0, 3.0, 4.0, 5.0], "tested_weight": [2.0, 4.0, 6.0, 8.0, 10.0]}
    policy = make_policy("goodput:k_max=2,shrink=2,carry=8,prior_acceptance=0.6", 8, state)
    assert policy.state.accepted_weight == [1.0, 2.0] and policy.state.tested_weight == [2.0, 4.0]
    a1 = (1.0 + 2 * 0.6) / (2.0 + 2)
    assert policy.estimated_acceptance() == pytest.approx([a1, (2.0 + 2 * a1) / (4.0 + 2)])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("k_max=0", "k_max must be at least 1"),
        ("k_max=-1", "k_max must be at least 1"),
        ("k_max=x", "'x' is not a number"),
        ("k_max=2.5", "'2.5' is not a number"),
        ("k_max=", "bad goodput option 'k_max='"),
    ],
)
def test_a_bad_k_max_is_refused_by_the_parser(bad, reason):
    with pytest.raises(ValueError, match=reason):
        make_policy(f"goodput:{bad}", 8)


def test_goodput_options_parse_to_keyword_arguments():
    assert _goodput_options("") == {}
    assert _goodput_options("k_max=6,window=16,tree_width=0") == {"k_max": 6, "window": 16.0, "tree_width": 0}
    with pytest.raises(ValueError, match="depth=3"):
        _goodput_options("depth=3")


def test_fixed_specs_stay_within_the_pairs_maximum():
    assert make_policy("fixed:5", 5).choose_k() == 5
    for bad in ("fixed:6", "fixed:-1", "fixed:k_max=4", "heuristic:k_max=4"):
        with pytest.raises(ValueError):
            make_policy(bad, 5)
