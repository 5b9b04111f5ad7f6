"""The goodput policy (the default): the k of best expected committed tokens per second.

    E(k)    = 1 + sum_{i=1..k} prod_{j=1..i} a_j        (a_j: acceptance at draft position j)
    cost(k) = t_verify(k) + rtt_oracle + t_loop + k * x_row + [k > 0] * (k * t_draft + rtt_draft)
    k*      = argmax_{k in 0..k_max} E(k) / cost(k)        (ties: the smaller k)

k = 0 is the oracle decoding alone (no draft call at all). t_loop is the session loop's own
time per round (Python, stream writes), which every round pays whatever its k. x_row is what
one more verified row costs the other sessions of the oracle's batched pass (each waits the
row's time; 0 with the oracle to itself), so blocks shrink as the load grows and k reaches 0
on a saturated oracle. t_draft, the round trips, t_loop and x_row are exponential moving
averages (weight `smoothing` on the newest round); t_verify(k) comes from the verify cost model
and a_j from discounted per-position counts (both in coordinator/depth/estimators.py, with their
formulas). A new session starts from its pair's learned state with at most `carry` tests per
position. While k = 0 is chosen, acceptance is not observed, so after `probe_every` rounds of
the oracle alone the policy probes with `probe_k` (k_max under the stop rule) to notice a draft
that became useful. Oracle-alone rounds go to the oracle in decode runs that share one round
trip (`alone_rounds()`), so for k = 0 that term is divided by the run's length R, and the probe interval stretches with the round trip:

    cost(0) = t_verify(0) + rtt_oracle / R + t_loop,   R = min(probe interval, MAX_RUN_TOKENS)
    probe interval = probe_every * (1 + rtt_oracle / t_verify(0))^2, at most MAX_PROBE_INTERVAL

The round trip and t_loop are learned from rounds that paid them, not from a run's.

Blocks copied by the session loop's prompt lookup (specd.core.lookup) cost no draft call, and
their acceptance has nothing to do with the draft's: it is high where the text repeats its
context and low elsewhere. They get acceptance estimates of their own, learned the same way
from those rounds only and starting from `lookup_prior`, and `lookup_depth()` gives the k of
best goodput for a copied block (cost(k) without the draft terms), or 0 when the draft's
round is expected to do better.

With `confidence_stop` (the default) the block's length is decided token by token instead, by
the draft (specd.core.stopping): a position's expected acceptance comes from the draft's
confidence there, which separates easy text from hard far better than any per-position
average, so a confident stretch (code) gets long blocks and an unsure one (chat) short ones
within the same request. Whenever the model above picks k > 0, the policy asks for k_max
tokens with a stop rule. With G the goodput of recent drafted rounds (their discounted
committed tokens over their discounted wall time; before any, the modelled goodput of the
best k), g the verify growth per token (the slope of the verify cost model) and P the product
of expected acceptances up to a position (the chance it is reached and accepted), the draft

    keeps a computed token        while P >= G * (g + x_row)
    computes one more position    while P >= G * (t_draft + g + x_row)

A token below the line adds fewer expected tokens than the same time spent at rate G, so
cutting there maximises tokens - G x seconds; with G re-measured as it improves this converges
on the best ratio of tokens to seconds (Dinkelbach's method). The expected acceptance of a
model-proposed token is the calibration of its confidence, and that of a looked-up token the
acceptance learned for its match's length (a short match is right less often than a long one,
so it ends a block sooner); both are calibration tables (estimators.CalibrationBands) learned
from every tested token.

With `tree_width` w > 1 (4 by default) greedy blocks may be draft trees (specd.core.tree): the
draft also offers up to w - 1 alternatives per position, and the same stop rule keeps any token
whose chance of being reached and accepted pays for its verified row, so alternatives appear
where the draft is unsure and the oracle's extra rows are cheap. The policy learns the
acceptance of alternatives by their probability the way it learns the calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.depth.estimators import CalibrationBands, DiscountedRates, VerifyCostModel
from coordinator.depth.policy import MAX_RUN_TOKENS, expected_tokens
from coordinator.session.stats import RoundObservation
from specd.core.stopping import StopRule


@dataclass
class GoodputState:
    """Moving averages the goodput policy learns; plain data so it can cross process boundaries."""

    acceptance: list[float]  # a_1..a_kmax, the current estimates
    observed: list[int] = field(default_factory=list)  # rounds that tested each position
    accepted_weight: list[float] = field(default_factory=list)  # discounted accepted tests per position
    tested_weight: list[float] = field(default_factory=list)  # discounted tests per position
    draft_token_seconds: float | None = None
    verify_seconds_by_k: dict[int, float] = field(default_factory=dict)
    verify_rounds_by_k: dict[int, int] = field(default_factory=dict)
    rtt_oracle_seconds: float = 0.0
    rtt_draft_seconds: float = 0.0
    loop_seconds: float = 0.0
    # What one more row of a block costs the other sessions of the oracle's batched pass (they each wait
    # the row's time): 0 when a session has the oracle to itself.
    row_externality_seconds: float = 0.0
    rounds: int = 0
    round_trips: int = 0  # rounds that were a round trip each (not part of a decode run): the ones timing those
    # Rounds whose block the session loop copied by prompt lookup, with acceptance of their own.
    lookup_acceptance: list[float] = field(default_factory=list)
    lookup_accepted_weight: list[float] = field(default_factory=list)
    lookup_tested_weight: list[float] = field(default_factory=list)
    # The stop rule: tests and acceptances of model-proposed tokens per band of the draft's confidence,
    # and the discounted tokens and wall time of the rounds that asked the draft (their goodput).
    calibration_accepted: list[float] = field(default_factory=list)
    calibration_tested: list[float] = field(default_factory=list)
    alternative_accepted: list[float] = field(default_factory=list)  # draft trees' alternatives, by probability
    alternative_tested: list[float] = field(default_factory=list)
    drafted_tokens: float = 0.0
    drafted_seconds: float = 0.0
    drafted_rounds: float = 0.0
    # Tested looked-up tokens (copied blocks and the draft's own lookup) per length of their match.
    lookup_length_accepted: list[float] = field(default_factory=list)
    lookup_length_tested: list[float] = field(default_factory=list)


CALIBRATION_BANDS = 10
# Pseudo-tests pulling a band's estimate towards the band's own confidence, and the most tests a band
# keeps (older evidence is scaled down beyond it): calibration is the draft's, so it is learned slowly.
CALIBRATION_SHRINK = 4.0
CALIBRATION_CAP = 200.0
# Expected acceptance of a looked-up token by its match's length (1..8 tokens; longer counts as 8) before
# any is tested: a longer match is right more often; the values are priors taken from the measurements
# described in docs/depth-policy.md, and the policy learns the real ones.
LOOKUP_LENGTH_PRIOR = (0.15, 0.45, 0.55, 0.65, 0.7, 0.8, 0.85, 0.9)
# The most weight one depth has in the verify line: the depth chosen most often would otherwise pin the
# line to itself, and a stale cold-start point at another depth would never lose its say.
VERIFY_WEIGHT_CAP = 20
# Runs after which a depth's own moving average is trusted over the line (one or two may be a cold start).
VERIFY_TRUSTED_ROUNDS = 3
# Until two depths have been timed, assume each extra verified token costs this share of a step.
ASSUMED_VERIFY_GROWTH = 0.05
# Until the draft has been timed, assume a draft step costs this share of a one-token verify: a draft is
# chosen for being much smaller than its oracle.
ASSUMED_DRAFT_SHARE = 0.1
# The most oracle-alone rounds between two probes, however far the oracle: a draft that became useful is
# noticed within this many tokens.
MAX_PROBE_INTERVAL = 64


class GoodputDepth:
    def __init__(
        self,
        k_max: int = 8,
        *,
        smoothing: float = 0.3,
        prior_acceptance: float = 0.6,
        window: float = 8.0,
        shrink: float = 2.0,
        carry: float = 8.0,
        probe_every: int = 4,
        probe_k: int = 1,
        lookup_prior: float = 0.8,
        confidence_stop: int = 1,
        tree_width: int = 4,
    ):
        if k_max < 1:
            raise ValueError("k_max must be >= 1")
        self.k_max = k_max
        self.smoothing = smoothing
        self.prior_acceptance = prior_acceptance
        self.window, self.shrink, self.carry = window, shrink, carry
        self.probe_every = probe_every
        self.probe_k = min(probe_k, k_max)
        self.lookup_prior = lookup_prior
        self.confidence_stop = bool(confidence_stop)
        self._tree_width = tree_width if tree_width > 1 else 0
        self.rates = DiscountedRates(k_max, window=window, shrink=shrink, carry=carry)
        self.bands = CalibrationBands(CALIBRATION_BANDS, shrink=CALIBRATION_SHRINK, cap=CALIBRATION_CAP)
        self.lengths = CalibrationBands(len(LOOKUP_LENGTH_PRIOR), shrink=CALIBRATION_SHRINK, cap=CALIBRATION_CAP)
        self.state = GoodputState(
            acceptance=[prior_acceptance] * k_max, observed=[0] * k_max,
            accepted_weight=[0.0] * k_max, tested_weight=[0.0] * k_max,
            lookup_acceptance=[lookup_prior] * k_max,
            lookup_accepted_weight=[0.0] * k_max, lookup_tested_weight=[0.0] * k_max,
            calibration_accepted=[0.0] * CALIBRATION_BANDS, calibration_tested=[0.0] * CALIBRATION_BANDS,
            alternative_accepted=[0.0] * CALIBRATION_BANDS, alternative_tested=[0.0] * CALIBRATION_BANDS,
            lookup_length_accepted=[0.0] * len(LOOKUP_LENGTH_PRIOR),
            lookup_length_tested=[0.0] * len(LOOKUP_LENGTH_PRIOR),
        )
        self.name = "goodput"
        self._rounds_since_draft = 0

    # -- learning -------------------------------------------------------------------------
    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, round: RoundObservation) -> None:
        s = self.state
        s.rounds += 1
        s.verify_seconds_by_k[round.k] = self._ema(s.verify_seconds_by_k.get(round.k), round.verify_seconds)
        s.verify_rounds_by_k[round.k] = s.verify_rounds_by_k.get(round.k, 0) + 1
        if not round.run:  # a decode run's rounds share one round trip, and their loop time overlaps the oracle's
            first = s.round_trips == 0
            s.round_trips += 1
            s.rtt_oracle_seconds = self._ema(None if first else s.rtt_oracle_seconds, round.oracle_network_seconds)
            s.loop_seconds = self._ema(None if first else s.loop_seconds, round.loop_seconds)
        s.row_externality_seconds = self._ema(
            s.row_externality_seconds if s.rounds > 1 else None, round.row_externality_seconds
        )
        self._count_lookup_lengths(round)
        if round.lookup_led:
            self._count(s.lookup_accepted_weight, s.lookup_tested_weight, round)
            s.lookup_acceptance = self.rates.estimates(
                s.lookup_accepted_weight, s.lookup_tested_weight, self.lookup_prior
            )
            return
        if not round.draft_asked:
            self._rounds_since_draft += 1
            return
        self._rounds_since_draft = 0
        s.rtt_draft_seconds = self._ema(s.rtt_draft_seconds or None, round.draft_network_seconds)
        # Positions the draft's model computed: one per token it proposed, unless it says otherwise
        # (a block the stop rule ended may have computed one it did not keep).
        steps = round.k - len(round.lookup_positions) if round.model_steps is None else round.model_steps
        if steps > 0:
            s.draft_token_seconds = self._ema(s.draft_token_seconds, round.draft_seconds / steps)
        for i in self._count(s.accepted_weight, s.tested_weight, round):
            s.observed[i] += 1
        s.acceptance = self.rates.estimates(s.accepted_weight, s.tested_weight, self.prior_acceptance)
        # The goodput of recent drafted rounds (the stop rule's G) fades as the acceptance counts do.
        fade = self.rates.fade
        s.drafted_tokens = fade * s.drafted_tokens + round.accepted + 1
        s.drafted_seconds = fade * s.drafted_seconds + round.wall_seconds
        s.drafted_rounds = fade * s.drafted_rounds + 1
        self._calibrate(round)

    def _calibrate(self, round: RoundObservation) -> None:
        """Count each tested model-proposed token in the band of the draft's confidence for it. In a
        tree only the draft's top choices count (the first child of a node that was reached), as
        the calibration is the acceptance of the draft's top choice."""
        s = self.state
        for i, confidence, hit in round.tested_top_choices():
            if i in round.lookup_positions:
                continue
            self.bands.count(s.calibration_accepted, s.calibration_tested, self.bands.band(confidence), hit)
        for prob, hit in round.tested_alternatives():
            self.bands.count(s.alternative_accepted, s.alternative_tested, self.bands.band(prob), hit)

    def _count_lookup_lengths(self, round: RoundObservation) -> None:
        """Count each tested looked-up token under the length of its match."""
        s = self.state
        for length, hit in round.tested_lookups():
            entry = min(len(LOOKUP_LENGTH_PRIOR), max(1, length)) - 1
            self.lengths.count(s.lookup_length_accepted, s.lookup_length_tested, entry, hit)

    def _count(self, accepted: list[float], tested: list[float], round: RoundObservation) -> range:
        """Fade the evidence, then count the positions this round tested (returned).

        Evidence fades with every round of its kind, tested or not: a deep position that is rarely
        reached must not keep an estimate from easier text; it falls back on the one before."""
        # Position i was tested only if positions 1..i-1 were accepted (in a tree: depth i).
        return self.rates.count(accepted, tested, min(round.accepted + 1, round.depth), round.accepted)

    def estimated_acceptance(self) -> list[float]:
        """a_1..a_kmax; a position never tested inherits the estimate of the position before it,
        so a draft that keeps being right is offered longer blocks."""
        return list(self.state.acceptance)

    # -- the model of a round's cost ----------------------------------------------------------
    @property
    def verify_cost(self) -> VerifyCostModel:
        """The verify cost model over the state's own averages; built on each use, as restore() replaces them."""
        return VerifyCostModel(
            self.state.verify_seconds_by_k, self.state.verify_rounds_by_k, trusted_rounds=VERIFY_TRUSTED_ROUNDS,
            weight_cap=VERIFY_WEIGHT_CAP, assumed_growth=ASSUMED_VERIFY_GROWTH,
        )

    def verify_seconds(self, k: int) -> float:
        return self.verify_cost.seconds(k)

    def verify_growth(self) -> float:
        return self.verify_cost.growth()

    def priced_growth(self) -> float:
        """What one more row of a block costs the system: its own verify time, and the wait it adds to every
        other session of the oracle's batched pass. With the oracle to itself a session pays its own alone;
        as the load grows a row costs more and blocks shrink, down to k = 0 where the oracle is saturated."""
        return self.verify_growth() + self.state.row_externality_seconds

    def draft_step_seconds(self) -> float:
        """t_draft: the draft's measured time per computed position, or a share of a verify before it is timed."""
        measured = self.state.draft_token_seconds
        return measured if measured is not None else ASSUMED_DRAFT_SHARE * self.verify_seconds(0)

    def round_seconds(self, k: int, *, drafted: bool = True) -> float:
        """Predicted wall time of a round of depth k; drafted=False: a copied block (no draft call). Oracle-alone
        rounds go in decode runs of up to probe_interval() (at most MAX_RUN_TOKENS), which share one round trip.
        Each still pays the loop's time (within a run it may hide behind the oracle's steps: the model does not
        count on that)."""
        s = self.state
        if k == 0:
            run = min(self.probe_interval(), MAX_RUN_TOKENS)
            return self.verify_seconds(0) + s.rtt_oracle_seconds / run + s.loop_seconds
        cost = self.verify_seconds(k) + s.rtt_oracle_seconds + s.loop_seconds + k * s.row_externality_seconds
        if drafted:
            cost += k * self.draft_step_seconds() + s.rtt_draft_seconds
        return cost

    def goodput(self, k: int) -> float:
        """Expected committed tokens per second for depth k."""
        return expected_tokens(self.estimated_acceptance(), k) / self.round_seconds(k)

    def best_k(self) -> int:
        scores = [self.goodput(k) for k in range(self.k_max + 1)]
        return max(range(self.k_max + 1), key=lambda k: (scores[k], -k))

    def choose_k(self) -> int:
        """The depth of best modelled goodput; with the stop rule, k_max whenever that is above 0: the
        draft itself then ends each block where it stops paying."""
        k = self.best_k()
        if self.confidence_stop and k > 0:
            k = self.k_max
        if k == 0 and self._rounds_since_draft >= self.probe_interval():
            return self.k_max if self.confidence_stop else self.probe_k
        return k

    def probe_interval(self) -> int:
        """Oracle-alone rounds between probes: `probe_every`, stretched twice by s = 1 + rtt_oracle / t_verify(0).
        A probe costs about s oracle-alone tokens (its round trip, which a decode run shares among its tokens), and
        what a draft that became useful can win over decode runs shrinks by about as much (its every round pays
        the round trip that runs share): probing s^2 times rarer keeps its cost in proportion to its gain."""
        step = self.verify_seconds(0)
        stretch = 1.0 + self.state.rtt_oracle_seconds / step if step > 0 else 1.0
        return max(self.probe_every, min(MAX_PROBE_INTERVAL, int(self.probe_every * stretch * stretch)))

    def measured_draft_goodput(self) -> float | None:
        """Committed tokens per second of the recent rounds that asked the draft (None before any)."""
        s = self.state
        return s.drafted_tokens / s.drafted_seconds if s.drafted_seconds > 0 else None

    def draft_goodput(self) -> float:
        """Expected goodput of asking the draft: measured under the stop rule, else modelled at the best k."""
        measured = self.measured_draft_goodput() if self.confidence_stop else None
        return measured if measured is not None else self.goodput(self.best_k())

    def calibration(self) -> list[float]:
        """Expected acceptance of a model-proposed token per band of the draft's confidence: each band's
        acceptance, pulled towards the band's own confidence, then made non-decreasing (pooling
        neighbours that disagree, weighted by their evidence)."""
        s = self.state
        return self.bands.estimates(s.calibration_accepted, s.calibration_tested, self.bands.middles())

    def alternative_calibration(self) -> list[float]:
        """Expected acceptance of a draft tree's alternative per band of its probability, learned as the
        calibration is; empty until one has been tested (the draft then scales the top choice's)."""
        s = self.state
        if not any(s.alternative_tested):
            return []
        return self.bands.estimates(s.alternative_accepted, s.alternative_tested, self.bands.middles())

    def lookup_by_length(self) -> list[float]:
        """Expected acceptance of a looked-up token per length of its match (1..8 tokens), learned the way
        the calibration is, pulled towards LOOKUP_LENGTH_PRIOR."""
        s = self.state
        return self.lengths.estimates(s.lookup_length_accepted, s.lookup_length_tested, LOOKUP_LENGTH_PRIOR)

    def stop_rule(self) -> StopRule | None:
        """Keep a computed token while its chance of being reached and accepted is at least goodput x
        the verify growth per token, and compute a further position while it is at least goodput x
        (draft step + verify growth): a token below the line adds fewer expected tokens than the same
        time spent at the session's current rate. Maximising tokens minus goodput x seconds this way,
        with goodput re-measured as it improves, converges on the best ratio of tokens to seconds
        (Dinkelbach's method)."""
        if not self.confidence_stop:
            return None
        s = self.state
        draft = self.draft_step_seconds()
        goodput, growth = self.draft_goodput(), self.priced_growth()
        return StopRule(
            min_survival=min(1.0, max(0.0, goodput * growth)),
            calibration=tuple(self.calibration()),
            lookup_acceptance=min(1.0, max(0.0, s.lookup_acceptance[0])),
            extend_survival=min(1.0, max(0.0, goodput * (draft + growth))),
            lookup_by_length=tuple(min(1.0, max(0.0, a)) for a in self.lookup_by_length()),
            alternative_calibration=tuple(min(1.0, max(0.0, a)) for a in self.alternative_calibration()),
        )

    def alone_rounds(self) -> int:
        """The oracle-alone rounds left before the next probe: the choice stays k = 0 that long unless the
        estimates move, and a run of them saves a round trip each."""
        return max(1, self.probe_interval() - self._rounds_since_draft)

    def tree_width(self) -> int:
        """Draft trees go with the stop rule, which decides which alternatives pay their verify row."""
        return self._tree_width if self.confidence_stop else 0

    def lookup_goodput(self, k: int) -> float:
        """Expected committed tokens per second of a copied block of depth k."""
        return expected_tokens(self.state.lookup_acceptance, k) / self.round_seconds(k, drafted=False)

    def lookup_depth(self) -> int:
        """The copied block's best depth, or 0 when asking the draft, or the oracle alone, is expected to do
        better."""
        depth = max(range(1, self.k_max + 1), key=lambda k: (self.lookup_goodput(k), -k))
        return depth if self.lookup_goodput(depth) > max(self.draft_goodput(), self.goodput(0)) else 0

    # -- carrying state between sessions ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return asdict(self.state)

    def restore(self, state: dict[str, Any]) -> None:
        if not state:
            return
        observed = [int(n) for n in state.get("observed", [])][: self.k_max]
        observed += [0] * (self.k_max - len(observed))
        tested = [float(w) for w in state.get("tested_weight", [])][: self.k_max]
        accepted = [float(w) for w in state.get("accepted_weight", [])][: self.k_max]
        if not tested or len(accepted) != len(tested):  # no counts saved: its estimates, as tests
            estimates = list(state.get("acceptance", []))[: self.k_max]
            tested = [float(min(n, self.carry)) for n in observed[: len(estimates)]]
            accepted = [a * n for a, n in zip(estimates, tested)]
        accepted, tested = self.rates.carried(accepted, tested)
        lookup_accepted, lookup_tested = self.rates.carried(
            [float(w) for w in state.get("lookup_accepted_weight", [])][: self.k_max],
            [float(w) for w in state.get("lookup_tested_weight", [])][: self.k_max],
        )
        self.state = GoodputState(
            acceptance=[],
            observed=observed,
            accepted_weight=accepted,
            tested_weight=tested,
            lookup_accepted_weight=lookup_accepted,
            lookup_tested_weight=lookup_tested,
            draft_token_seconds=state.get("draft_token_seconds"),
            verify_seconds_by_k={int(k): float(v) for k, v in state.get("verify_seconds_by_k", {}).items()},
            verify_rounds_by_k={int(k): int(v) for k, v in state.get("verify_rounds_by_k", {}).items()},
            rtt_oracle_seconds=float(state.get("rtt_oracle_seconds", 0.0)),
            rtt_draft_seconds=float(state.get("rtt_draft_seconds", 0.0)),
            loop_seconds=float(state.get("loop_seconds", 0.0)),
            row_externality_seconds=float(state.get("row_externality_seconds", 0.0)),
            rounds=int(state.get("rounds", 0)),
            round_trips=int(state.get("round_trips", state.get("rounds", 0))),
            calibration_accepted=self._bands(state.get("calibration_accepted")),
            calibration_tested=self._bands(state.get("calibration_tested")),
            alternative_accepted=self._bands(state.get("alternative_accepted")),
            alternative_tested=self._bands(state.get("alternative_tested")),
            lookup_length_accepted=self._bands(state.get("lookup_length_accepted"), len(LOOKUP_LENGTH_PRIOR)),
            lookup_length_tested=self._bands(state.get("lookup_length_tested"), len(LOOKUP_LENGTH_PRIOR)),
        )
        drafted = float(state.get("drafted_rounds", 0.0))
        if drafted > 0:  # the recent goodput of drafted rounds, as at most `carry` rounds of evidence
            scale = min(1.0, self.carry / drafted)
            self.state.drafted_rounds = drafted * scale
            self.state.drafted_tokens = float(state.get("drafted_tokens", 0.0)) * scale
            self.state.drafted_seconds = float(state.get("drafted_seconds", 0.0)) * scale
        self.state.acceptance = self.rates.estimates(accepted, tested, self.prior_acceptance)
        self.state.lookup_acceptance = self.rates.estimates(lookup_accepted, lookup_tested, self.lookup_prior)

    @staticmethod
    def _bands(values: list[float] | None, size: int = CALIBRATION_BANDS) -> list[float]:
        values = [float(v) for v in values or []]
        return values if len(values) == size else [0.0] * size
