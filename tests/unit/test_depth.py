"""Depth policies on synthetic acceptance and costs."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from coordinator.depth import FixedDepth, GoodputDepth, HeuristicDepth, expected_tokens, make_policy, speedup_bound
from coordinator.depth.goodput import LOOKUP_LENGTH_PRIOR
from coordinator.session.stats import RoundObservation

VERIFY_BASE, VERIFY_SLOPE = 0.050, 0.004  # seconds: t_verify(k) = base + slope * k


def policy_with(acceptance, draft_token_seconds, rtt_oracle=0.0, rtt_draft=0.0, k_max=8) -> GoodputDepth:
    """A goodput policy that has learned exactly these figures (no pull towards neighbours)."""
    policy = GoodputDepth(confidence_stop=0, k_max=k_max, shrink=0.0)
    policy.state.tested_weight = [8.0] * k_max
    policy.state.accepted_weight = [8.0 * a for a in acceptance]
    policy.state.acceptance = list(acceptance)
    policy.state.observed = [8] * k_max
    policy.state.draft_token_seconds = draft_token_seconds
    policy.state.verify_seconds_by_k = {k: VERIFY_BASE + VERIFY_SLOPE * k for k in range(k_max + 1)}
    policy.state.verify_rounds_by_k = {k: 5 for k in range(k_max + 1)}
    policy.state.rtt_oracle_seconds = rtt_oracle
    policy.state.rtt_draft_seconds = rtt_draft
    return policy


def brute_force_k(acceptance, t_draft, rtt_oracle, rtt_draft, k_max) -> int:
    # k = 0 rounds share the round trip within a decode run: as long as the probe interval, at most 32 rounds
    run = min(max(4, int(4 * (1 + rtt_oracle / VERIFY_BASE) ** 2)), 64, 32)

    def rate(k):
        e, survive = 1.0, 1.0
        for a in acceptance[:k]:
            survive *= a
            e += survive
        if k == 0:
            return 1.0 / (VERIFY_BASE + rtt_oracle / run)
        cost = k * t_draft + VERIFY_BASE + VERIFY_SLOPE * k + rtt_oracle + rtt_draft
        return e / cost

    return max(range(k_max + 1), key=rate)


def test_expected_tokens_matches_the_closed_form():
    alpha = 0.8
    for k in range(6):
        closed = (1 - alpha ** (k + 1)) / (1 - alpha)
        assert expected_tokens([alpha] * k, k) == pytest.approx(closed)
    assert speedup_bound(0.8, 0.05, 8) == pytest.approx(3.0, abs=0.15)


@pytest.mark.parametrize(
    "acceptance, t_draft, rtt_oracle, rtt_draft",
    [
        ([0.9] * 8, 0.003, 0.0, 0.0),
        ([0.95, 0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1], 0.005, 0.0, 0.001),
        ([0.7] * 8, 0.010, 0.020, 0.002),
        ([0.99, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], 0.002, 0.0, 0.0),
        ([0.5] * 8, 0.020, 0.0, 0.0),
    ],
)
def test_goodput_picks_the_k_that_maximises_the_formula(acceptance, t_draft, rtt_oracle, rtt_draft):
    policy = policy_with(acceptance, t_draft, rtt_oracle, rtt_draft)
    assert policy.choose_k() == brute_force_k(acceptance, t_draft, rtt_oracle, rtt_draft, 8)


def test_goodput_picks_zero_when_acceptance_is_below_the_cost_ratio():
    cost_ratio = 0.3  # draft token time / oracle step time
    policy = policy_with([0.2] * 8, cost_ratio * VERIFY_BASE)
    assert policy.choose_k() == 0


def test_goodput_picks_zero_when_the_draft_round_trip_is_huge():
    policy = policy_with([0.8] * 8, 0.003, rtt_draft=1.0)
    assert policy.choose_k() == 0


def test_goodput_raises_k_as_the_oracle_round_trip_grows_until_decode_runs_win():
    """A round trip per round favours longer blocks; far enough away, the oracle alone, whose rounds share one round
    trip per decode run, does better than any block."""
    rtts = (0.0, 0.01, 0.05, 0.2, 1.0)
    chosen = [policy_with([0.8] * 16, 0.004, rtt_oracle=rtt, k_max=16).choose_k() for rtt in rtts]
    assert chosen == [brute_force_k([0.8] * 16, 0.004, rtt, 0.0, 16) for rtt in rtts]
    drafted = [k for k in chosen if k]
    assert drafted == sorted(drafted) and drafted[-1] > chosen[0] > 0
    assert chosen[-1] == 0


def test_the_probe_interval_stretches_with_the_oracle_round_trip():
    near, mid, far = (policy_with([0.05] * 8, 0.004, rtt_oracle=rtt) for rtt in (0.0, 0.025, 0.1))
    assert near.choose_k() == mid.choose_k() == far.choose_k() == 0
    assert near.probe_interval() == near.alone_rounds() == 4
    assert mid.probe_interval() == 9  # 4 * (1 + 0.025 / 0.05) ** 2
    assert far.probe_interval() == far.alone_rounds() == 36  # 4 * (1 + 0.1 / 0.05) ** 2
    assert policy_with([0.05] * 8, 0.004, rtt_oracle=1.0).probe_interval() == 64  # at most
    for _ in range(35):  # the rounds of one run, each observed as it came
        far.observe(RoundObservation(k=0, accepted=0, draft_seconds=0.0, verify_seconds=VERIFY_BASE, run=True))
    assert far.alone_rounds() == 1 and far.choose_k() == 0
    far.observe(RoundObservation(k=0, accepted=0, draft_seconds=0.0, verify_seconds=VERIFY_BASE, run=True))
    assert far.choose_k() > 0  # the probe
    assert far.state.rtt_oracle_seconds == 0.1  # a run's rounds do not time the round trip


def rounds_of(policy, accept_fraction: float, n: int, t_draft=0.004) -> None:
    for _ in range(n):
        k = policy.choose_k()
        accepted = round(k * accept_fraction)
        policy.observe(
            RoundObservation(k=k, accepted=accepted, draft_seconds=k * t_draft, verify_seconds=VERIFY_BASE + VERIFY_SLOPE * k)
        )


def test_goodput_adapts_within_bounded_rounds_when_acceptance_changes():
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    rounds_of(policy, 1.0, 30)
    assert policy.choose_k() >= 6  # a draft that is always right earns a long block
    # The draft turns useless: k must fall to 0 within bounded rounds. Acceptance is a count over
    # about `window` tests, so from a perfect record this takes a few windows.
    for n in range(1, 26):  # noqa: B007 - n is read after the loop
        rounds_of(policy, 0.0, 1)
        if policy.best_k() == 0:
            break
    assert policy.best_k() == 0, f"still k={policy.best_k()} after {n} bad rounds"
    # While at k = 0 the policy keeps probing; once the draft is good again it climbs back.
    for n in range(1, 61):  # noqa: B007 - n is read after the loop
        rounds_of(policy, 1.0, 1)
        if policy.best_k() >= 4:
            break
    assert policy.best_k() >= 4, "did not recover after the draft became good again"
    assert n <= 60


def test_untested_positions_inherit_the_deepest_tested_estimate():
    policy = GoodputDepth(confidence_stop=0, k_max=8, prior_acceptance=0.3)
    for _ in range(10):
        policy.observe(RoundObservation(k=2, accepted=2, draft_seconds=0.002, verify_seconds=0.05))
    estimate = policy.estimated_acceptance()
    assert estimate[1] > 0.8 and estimate[7] == pytest.approx(estimate[1])
    assert policy.choose_k() == 8


def test_the_loops_own_time_per_round_favours_speculation():
    """A round's fixed overhead is paid once per round: amortising it over more tokens pays."""
    cheap_loop, slow_loop = (policy_with([0.12] * 8, 0.005) for _ in range(2))
    slow_loop.state.loop_seconds = 0.05
    assert cheap_loop.choose_k() == 0
    assert slow_loop.choose_k() >= 1


def test_noisy_acceptance_does_not_push_a_useful_draft_to_zero():
    """Acceptance 0.45 per position, with CPU-like costs where k = 1-2 pays: single misses must not
    swing the policy to the oracle alone."""
    rng = random.Random(0)
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    verify = {0: 0.090, 1: 0.103, 2: 0.106}
    depths = []
    for _ in range(300):
        k = policy.choose_k()
        accepted = 0
        while accepted < k and rng.random() < 0.45:
            accepted += 1
        policy.observe(RoundObservation(
            k=k, accepted=accepted, draft_seconds=0.007 * k, verify_seconds=verify.get(k, 0.150 + 0.005 * k),
            oracle_network_seconds=0.003, draft_network_seconds=0.003 if k else 0.0, loop_seconds=0.015,
        ))
        depths.append(k)
    # Oracle-alone rounds share their round trip in decode runs, which makes k = 0 a little cheaper (2% here) and
    # a streak of misses a little likelier to reach it; a useful draft still serves most rounds.
    assert depths[50:].count(0) / len(depths[50:]) < 0.15
    assert 1 <= max(set(depths[50:]), key=depths[50:].count) <= 2


def test_a_new_session_follows_its_own_text_within_a_few_rounds():
    """The pair's history is a prior worth at most `carry` tests: a request whose first tokens are
    rejected is not held at a long block by hundreds of earlier successes."""
    veteran = GoodputDepth(confidence_stop=0, k_max=8)
    for _ in range(200):
        veteran.observe(RoundObservation(k=4, accepted=4, draft_seconds=0.004, verify_seconds=0.05))
    fresh = make_policy("goodput:confidence_stop=0", 8, veteran.snapshot())
    assert fresh.state.tested_weight[0] == pytest.approx(fresh.carry)
    for _ in range(6):
        fresh.observe(RoundObservation(k=4, accepted=0, draft_seconds=0.004, verify_seconds=0.05))
    assert fresh.estimated_acceptance()[0] < 0.5
    # States saved before counts existed still restore from their estimates.
    old = make_policy("goodput:confidence_stop=0", 8, {"acceptance": [0.9] * 8, "observed": [50] * 8})
    assert old.estimated_acceptance()[0] == pytest.approx((0.9 * 8 + 2 * 0.6) / 10)


def test_a_hard_prompt_after_easier_ones_falls_back_to_short_blocks():
    """Learned on easy text, then on a middling prompt, then a prompt whose first guess is right
    10% of the time: the deep positions are seldom reached there, so what they learned on easier
    text must fade instead of holding long blocks."""
    rng = random.Random(1)
    verify = {0: 0.085, 1: 0.095, 2: 0.099, 3: 0.118, 4: 0.119, 5: 0.121, 6: 0.127, 7: 0.141, 8: 0.147}

    def run(policy, acceptance, rounds):
        depths = []
        for _ in range(rounds):
            k = policy.choose_k()
            accepted = 0
            while accepted < k and rng.random() < acceptance[accepted]:
                accepted += 1
            policy.observe(RoundObservation(
                k=k, accepted=accepted, draft_seconds=0.0055 * k, verify_seconds=verify[k],
                oracle_network_seconds=0.003, draft_network_seconds=0.003 if k else 0.0, loop_seconds=0.014,
            ))
            depths.append(k)
        return depths

    easy = GoodputDepth(confidence_stop=0, k_max=8)
    run(easy, [0.72, 0.65, 0.55] + [0.5] * 5, 60)
    middling = make_policy("goodput:confidence_stop=0", 8, easy.snapshot())
    run(middling, [0.2, 0.4] + [0.05] * 6, 35)
    hard = make_policy("goodput:confidence_stop=0", 8, middling.snapshot())
    depths = run(hard, [0.1, 0.3] + [0.05] * 6, 40)
    assert sum(depths[-15:]) / 15 <= 1.2, depths


def test_goodput_learns_verify_cost_growth():
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    for k, t in ((1, 0.05), (4, 0.08)):
        policy.observe(RoundObservation(k=k, accepted=0, draft_seconds=0.0, verify_seconds=t))
    assert policy.verify_seconds(8) == pytest.approx(0.12, rel=0.05)
    assert policy.verify_seconds(4) == pytest.approx(0.08)


def test_goodput_uses_measured_verify_costs_where_no_line_fits():
    """CPU verification: flat for a few tokens, then a jump. A line through all points would put
    k = 2 too high and k = 5 too low; measured depths use their own averages."""
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    measured = {0: 0.077, 2: 0.080, 4: 0.126, 8: 0.150}
    for _ in range(3):
        for k, t in measured.items():
            policy.observe(RoundObservation(k=k, accepted=min(k, 2), draft_seconds=0.007 * k, verify_seconds=t))
    for k, t in measured.items():
        assert policy.verify_seconds(k) == pytest.approx(t)
    assert measured[2] < policy.verify_seconds(3) < measured[8]  # unmeasured: the line
    assert policy.choose_k() == 2


def test_one_cold_start_outlier_does_not_freeze_the_depth():
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    policy.observe(RoundObservation(k=3, accepted=3, draft_seconds=0.006, verify_seconds=0.010))  # cold start
    for _ in range(20):
        policy.observe(RoundObservation(k=4, accepted=4, draft_seconds=0.008, verify_seconds=0.0033, oracle_network_seconds=0.01))
    assert policy.verify_seconds(8) < 0.005
    assert policy.choose_k() == 8


def test_one_stall_of_the_oracle_alone_does_not_keep_a_useless_draft_drafting():
    """A useless draft (nothing accepted) and the oracle alone at 2 ms a token, until one step stalls for 300 ms:
    its moving average then makes the oracle alone look dear, and as the policy drafts from then on, nothing
    would time the oracle alone again. What deeper blocks cost now caps it, and the policy is back at k = 0."""
    policy = GoodputDepth(k_max=8)

    def observed(k: int, verify: float | None = None) -> RoundObservation:
        return RoundObservation(
            k=k, accepted=0, draft_seconds=0.001 * k, verify_seconds=0.002 + 0.0002 * k if verify is None else verify,
            oracle_network_seconds=0.001, loop_seconds=0.0005, run=k == 0, asked=1 if k else 0,
        )

    for _ in range(48):
        policy.observe(observed(policy.choose_k()))
    assert policy.choose_k() == 0
    policy.observe(observed(0, verify=0.3))  # the stall
    depths = []
    for _ in range(48):
        depths.append(policy.choose_k())
        policy.observe(observed(depths[-1]))
    assert sum(1 for k in depths if k) <= 48 // policy.probe_interval() + 1, depths


def test_goodput_state_round_trips_through_a_snapshot():
    policy = policy_with([0.9, 0.8] + [0.5] * 6, 0.004, rtt_oracle=0.01)
    clone = GoodputDepth(confidence_stop=0, k_max=8, shrink=0.0)
    clone.restore(policy.snapshot())
    assert clone.choose_k() == policy.choose_k()
    assert clone.state == policy.state


def test_heuristic_adds_two_on_full_acceptance_and_drops_one_otherwise():
    policy = HeuristicDepth(k_max=8, start=4)
    policy.observe(RoundObservation(k=4, accepted=4, draft_seconds=0, verify_seconds=0))
    assert policy.choose_k() == 6
    policy.observe(RoundObservation(k=6, accepted=2, draft_seconds=0, verify_seconds=0))
    assert policy.choose_k() == 5
    for _ in range(10):
        policy.observe(RoundObservation(k=5, accepted=5, draft_seconds=0, verify_seconds=0))
    assert policy.choose_k() == 8
    for _ in range(20):
        policy.observe(RoundObservation(k=1, accepted=0, draft_seconds=0, verify_seconds=0))
    assert policy.choose_k() == 1


def test_policy_specs():
    assert isinstance(make_policy("fixed:3", 8), FixedDepth) and make_policy("fixed:3", 8).choose_k() == 3
    assert make_policy("fixed:0", 8).choose_k() == 0
    assert make_policy("HEURISTIC", 8).name == "heuristic"
    assert make_policy("goodput", 8).name == "goodput"
    tuned = make_policy("goodput:smoothing=0.2,probe_every=8,probe_k=3,window=16,shrink=1,carry=4", 8)
    assert (tuned.smoothing, tuned.probe_every, tuned.probe_k) == (0.2, 8, 3)
    assert (tuned.window, tuned.shrink, tuned.carry) == (16, 1, 4)
    for bad in (
        "fixed:x", "fixed:99", "random", "", "goodput:speed=2", "goodput:smoothing=x", "goodput:smoothing=0",
        "goodput:window=1", "goodput:carry=-1",
    ):
        with pytest.raises(ValueError):
            make_policy(bad, 8)


# -- blocks copied by prompt lookup --------------------------------------------------------------


def lookup_round(k: int, accepted: int) -> RoundObservation:
    return RoundObservation(
        k=k, accepted=accepted, draft_seconds=0.0, verify_seconds=VERIFY_BASE + VERIFY_SLOPE * k,
        lookup_positions=tuple(range(k)), lookup_led=True,
    )


def test_copied_blocks_learn_apart_from_the_draft():
    policy = policy_with([0.3] * 8, 0.006)
    model_before = list(policy.state.acceptance)
    for _ in range(30):
        policy.observe(lookup_round(6, 6))
    assert policy.state.acceptance == model_before  # the draft's estimates are untouched
    assert policy.state.draft_token_seconds == 0.006  # and so is its cost
    assert min(policy.state.lookup_acceptance[:6]) > 0.9
    assert policy.lookup_depth() >= 6  # reliable copies at no draft cost: long blocks
    assert policy.choose_k() <= 2  # while the draft's own blocks stay short


def test_copies_that_miss_give_way_to_the_draft():
    policy = policy_with([0.8] * 8, 0.004)
    assert policy.lookup_depth() > 0  # the prior makes a first copy worth trying
    for _ in range(30):
        policy.observe(lookup_round(4, 0))
    assert policy.lookup_depth() == 0
    assert policy.choose_k() >= 3


def test_a_model_led_round_prices_only_the_tokens_the_model_drafted():
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    policy.observe(RoundObservation(k=4, accepted=4, draft_seconds=0.012, verify_seconds=0.06, lookup_positions=(2, 3)))
    assert policy.state.draft_token_seconds == pytest.approx(0.006)


def test_fixed_and_heuristic_copy_blocks_of_their_own_depth():
    assert FixedDepth(3).lookup_depth() == 3 and FixedDepth(0).lookup_depth() == 0
    assert HeuristicDepth(k_max=8, start=4).lookup_depth() == 4


def test_lookup_estimates_cross_sessions_with_at_most_carry_tests():
    policy = GoodputDepth(confidence_stop=0, k_max=8)
    for _ in range(40):
        policy.observe(lookup_round(5, 5))
    clone = GoodputDepth(confidence_stop=0, k_max=8)
    clone.restore(policy.snapshot())
    assert max(clone.state.lookup_tested_weight) <= clone.carry + 1e-9
    assert clone.lookup_depth() == policy.lookup_depth()
    old = policy.snapshot()
    for name in ("lookup_acceptance", "lookup_accepted_weight", "lookup_tested_weight"):
        old.pop(name)
    fresh = GoodputDepth(confidence_stop=0, k_max=8)
    fresh.restore(old)  # a state saved before copied blocks had estimates of their own
    assert fresh.state.lookup_acceptance == [fresh.lookup_prior] * 8


# -- blocks the draft ends by its own confidence (the stop rule) ----------------------------------

DRAFT_STEP = 0.004


def confident_round(
    confidences: list[float], accepted: int, asked: int = 8, lookup_positions: tuple[int, ...] = ()
) -> RoundObservation:
    """A round whose block the stop rule ended after len(confidences) tokens (synthetic seconds)."""
    k = len(confidences)
    steps = k - len(lookup_positions) + (k < asked)  # the position whose survival ended the block
    return RoundObservation(
        k=k, accepted=accepted, draft_seconds=DRAFT_STEP * steps, verify_seconds=VERIFY_BASE + VERIFY_SLOPE * k,
        asked=asked, confidences=tuple(confidences), lookup_positions=lookup_positions, model_steps=steps,
    )


def test_the_threshold_is_goodput_times_the_cost_of_one_more_token():
    policy = GoodputDepth(k_max=8)
    fade, tokens, seconds = 1 - 1 / policy.window, 0.0, 0.0
    for k in (1, 3, 5, 1, 3, 5, 1, 3, 5):  # blocks the stop rule ended: k tokens, k + 1 draft steps
        obs = RoundObservation(
            k=k, accepted=k - 1, draft_seconds=DRAFT_STEP * (k + 1), verify_seconds=VERIFY_BASE + VERIFY_SLOPE * k,
            asked=8, confidences=(0.5,) * k, model_steps=k + 1,
        )
        policy.observe(obs)
        tokens, seconds = fade * tokens + k, fade * seconds + obs.wall_seconds
    goodput = policy.measured_draft_goodput()
    assert goodput == pytest.approx(tokens / seconds)
    assert policy.verify_growth() == pytest.approx(VERIFY_SLOPE)
    assert policy.state.draft_token_seconds == pytest.approx(DRAFT_STEP)
    rule = policy.stop_rule()
    assert rule is not None
    assert rule.min_survival == pytest.approx(goodput * VERIFY_SLOPE)  # keeping a computed token
    assert rule.extend_survival == pytest.approx(goodput * (DRAFT_STEP + VERIFY_SLOPE))  # computing another
    assert policy.choose_k() == 8  # the draft decides where each block ends


def test_calibration_learns_what_confidence_is_worth_and_never_decreases():
    policy = GoodputDepth(k_max=8)
    assert policy.calibration() == pytest.approx([(b + 0.5) / 10 for b in range(10)])  # before evidence: itself
    rng = random.Random(0)
    for _ in range(400):
        # A draft that is right 95% of the time at confidence 0.35 but only 20% at 0.55.
        confidences = [rng.choice([0.35, 0.55, 0.95])]
        right = rng.random() < {0.35: 0.95, 0.55: 0.2, 0.95: 0.97}[confidences[0]]
        policy.observe(confident_round(confidences, int(right), asked=1))
    table = policy.calibration()
    assert table == sorted(table)
    assert table[9] > 0.9
    assert table[3] == pytest.approx(table[5])  # the contradicting bands are pooled
    assert 0.45 < table[3] < 0.7
    assert max(policy.state.calibration_tested) <= 200 + 1e-9  # evidence is capped


def test_copied_positions_are_left_out_of_the_calibration():
    policy = GoodputDepth(k_max=8)
    policy.observe(confident_round([1.0, 1.0, 0.15], accepted=1, lookup_positions=(0, 1)))
    assert policy.state.calibration_tested[9] == 0  # positions 0 and 1 were copies
    assert policy.state.calibration_tested[1] == 0  # position 2 was never tested (position 1 was rejected)
    policy.observe(confident_round([0.15], accepted=0))
    assert policy.state.calibration_tested[1] == 1
    assert policy.state.draft_token_seconds == pytest.approx(DRAFT_STEP)  # two model steps: the token, the one that stopped


def test_drafting_stops_when_the_drafts_tokens_keep_being_rejected():
    policy = GoodputDepth(k_max=8, probe_every=4)
    for _ in range(6):  # the oracle alone: one token per 50 ms
        policy.observe(RoundObservation(k=0, accepted=0, draft_seconds=0.0, verify_seconds=VERIFY_BASE, asked=0))
    assert policy.choose_k() == 8
    for _ in range(20):  # drafted rounds whose one token is rejected: worse than not asking
        policy.observe(confident_round([0.1], accepted=0))
    assert policy.choose_k() == 0
    assert policy.stop_rule() is not None
    for _ in range(4):
        policy.observe(RoundObservation(k=0, accepted=0, draft_seconds=0.0, verify_seconds=VERIFY_BASE, asked=0))
    assert policy.choose_k() == 8  # a probe, which the stop rule keeps short


def test_an_empty_block_counts_as_a_drafted_round():
    policy = GoodputDepth(k_max=8)
    policy.observe(confident_round([], accepted=0))
    assert policy.state.drafted_rounds == 1 and policy.state.rtt_draft_seconds == 0
    assert policy.state.draft_token_seconds == pytest.approx(DRAFT_STEP)


def test_the_stop_rule_state_crosses_sessions():
    policy = GoodputDepth(k_max=8)
    for _ in range(50):
        policy.observe(confident_round([0.95, 0.95, 0.15], accepted=2))
    clone = make_policy("goodput", 8, policy.snapshot())
    assert clone.calibration() == policy.calibration()
    assert clone.state.drafted_rounds <= clone.carry + 1e-9
    assert clone.measured_draft_goodput() == pytest.approx(policy.measured_draft_goodput())
    assert make_policy("goodput", 8, {"acceptance": [0.5] * 8}).calibration() == GoodputDepth(k_max=8).calibration()


def test_copied_tokens_are_learned_per_match_length_from_every_kind_of_round():
    policy = GoodputDepth(k_max=8)
    assert policy.lookup_by_length() == pytest.approx(list(LOOKUP_LENGTH_PRIOR))  # before evidence: the prior
    for _ in range(60):
        # A copied block: a 3-token match rejected (the block's later copies were never tested) ...
        policy.observe(replace(lookup_round(3, 0), lookup_lengths=(3, 4, 5)))
        # ... and the draft's own copies after 7- and 8-token matches, then a model token, all accepted.
        policy.observe(replace(
            confident_round([1.0, 1.0, 0.5], accepted=3, lookup_positions=(0, 1)), lookup_lengths=(7, 8),
        ))
    s = policy.state
    assert s.lookup_length_tested[2] > 0 and s.lookup_length_tested[3] == s.lookup_length_tested[4] == 0
    assert s.lookup_length_accepted[2] == 0 and s.lookup_length_accepted[6] == s.lookup_length_tested[6] > 0
    table = policy.lookup_by_length()
    assert table == sorted(table)
    assert table[2] < 0.1 and table[6] > 0.95
    assert max(s.lookup_length_tested) <= 200 + 1e-9  # evidence is capped
    rule = policy.stop_rule()
    assert list(rule.lookup_by_length) == pytest.approx(table)
    assert rule.lookup_expected(3) < 0.1 and rule.lookup_expected(20) > 0.95
    clone = make_policy("goodput", 8, policy.snapshot())
    assert clone.lookup_by_length() == pytest.approx(table)
    old = policy.snapshot()
    for name in ("lookup_length_accepted", "lookup_length_tested"):
        old.pop(name)
    assert make_policy("goodput", 8, old).lookup_by_length() == pytest.approx(list(LOOKUP_LENGTH_PRIOR))


def test_only_the_goodput_policy_sends_a_stop_rule():
    assert FixedDepth(3).stop_rule() is None and HeuristicDepth().stop_rule() is None
    assert make_policy("goodput:confidence_stop=0", 8).stop_rule() is None
    assert make_policy("goodput", 8).stop_rule() is not None
    with pytest.raises(ValueError):
        make_policy("goodput:confidence_stop=2", 8)


def simulated_rounds(seed: int, rounds: int) -> list[list[tuple[float, bool]]]:
    """Per round, 8 positions of (the draft's confidence, whether the oracle agrees). The text
    alternates easy and hard stretches, and the confidence is calibrated: P(agree) = confidence."""
    rng = random.Random(seed)
    out = []
    for r in range(rounds):
        easy = (r // 20) % 2 == 0
        block = []
        for _ in range(8):
            c = min(0.99, max(0.01, rng.betavariate(8, 1.5) if easy else rng.betavariate(1.5, 3)))
            block.append((c, rng.random() < c))
        out.append(block)
    return out


def play(block: list[tuple[float, bool]], length: int) -> tuple[int, int]:
    """(tokens committed, accepted) when the first `length` positions are verified."""
    accepted = 0
    while accepted < length and block[accepted][1]:
        accepted += 1
    return accepted + 1, accepted


def test_the_stop_rule_beats_every_fixed_depth_when_confidence_is_informative():
    """Same simulated text and costs for all: the policy (choose_k + stop rule + what it learns)
    against each fixed k, in committed tokens per simulated second."""
    rounds = simulated_rounds(0, 600)

    def cost(length: int, steps: int) -> float:
        return VERIFY_BASE + VERIFY_SLOPE * length + DRAFT_STEP * steps

    fixed = {}
    for k in range(9):
        tokens = sum(play(block, k)[0] for block in rounds)
        fixed[k] = tokens / sum(cost(k, k) for _ in rounds)
    policy = GoodputDepth(k_max=8)
    tokens = seconds = 0.0
    for block in rounds:
        asked, rule = policy.choose_k(), policy.stop_rule()
        assert rule is not None
        length, steps, survival = 0, 0, 1.0
        while length < asked:
            steps += 1  # the draft computes this position
            survival *= rule.expected_acceptance(block[length][0])
            if survival < rule.min_survival:
                break
            length += 1
            if survival < rule.extend_threshold:
                break
        committed, accepted = play(block, length)
        obs = RoundObservation(
            k=length, accepted=accepted, draft_seconds=DRAFT_STEP * steps, verify_seconds=cost(length, 0),
            asked=asked, confidences=tuple(c for c, _ in block[:length]), model_steps=steps,
        )
        policy.observe(obs)
        tokens += committed
        seconds += obs.wall_seconds
    assert tokens / seconds > 1.05 * max(fixed.values()), (tokens / seconds, fixed)


def loaded_rounds(policy: GoodputDepth, sessions: int, rounds: int, *, c0=0.030, row=0.0016, alpha=0.7) -> None:
    """Rounds on an oracle whose batched pass costs c0 + row x rows (a synthetic step-cost curve), shared with
    sessions - 1 others that decode one token each; each drafted token is accepted with probability alpha
    (seeded)."""
    rng = random.Random(0)
    for i in range(rounds):
        k = (i % 5) if i < 10 else policy.best_k()  # a spread of depths first, so the cost per k is measured
        rows = (sessions - 1) + 1 + k
        policy.observe(RoundObservation(
            k=k, accepted=next((j for j in range(k) if rng.random() > alpha), k), draft_seconds=0.002 * k,
            verify_seconds=c0 + row * rows,
            step_sessions=sessions, row_seconds=row,
        ))


def test_goodput_prices_a_row_at_the_load_and_stops_speculating_when_saturated():
    """A drafted row delays every session of the oracle's pass. With the same draft (acceptance learned alone)
    and a step-cost curve of 30 ms + 1.6 ms per row, shared with sessions that decode one token each: k
    shrinks as the batch grows and is 0 on a saturated oracle, where the same draft pays well alone."""
    learned = GoodputDepth(confidence_stop=0, k_max=8)
    loaded_rounds(learned, 1, 80)
    chosen = {}
    for sessions in (1, 4, 16, 64):
        policy = make_policy("goodput:confidence_stop=0", 8, learned.snapshot())
        others = 0.0016 * (sessions - 1)  # the other sessions' rows in every pass
        policy.state.verify_seconds_by_k = {k: t + others for k, t in policy.state.verify_seconds_by_k.items()}
        policy.state.row_externality_seconds = others  # what one more row costs them
        chosen[sessions] = policy.best_k()
    assert chosen[1] >= 2 and chosen[64] == 0
    assert chosen[1] >= chosen[4] >= chosen[16] >= chosen[64] and chosen[16] < chosen[1]
    # What the policy learns from rounds: the externality each round reports, and the stop rule's price of a row.
    alone, busy = GoodputDepth(k_max=8), GoodputDepth(k_max=8)
    loaded_rounds(alone, 1, 30)
    loaded_rounds(busy, 16, 30)
    assert busy.priced_growth() > alone.priced_growth() == alone.verify_growth()
    assert busy.state.row_externality_seconds == pytest.approx(0.0016 * 15)
    assert busy.stop_rule().min_survival > alone.stop_rule().min_survival
    assert make_policy("goodput", 8, busy.snapshot()).state.row_externality_seconds == pytest.approx(0.0016 * 15)
