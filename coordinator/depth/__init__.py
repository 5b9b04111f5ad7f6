"""Depth policies: how many tokens (k) the draft proposes in the next round.

A policy is anything with `choose_k()` and `observe(round)`; the session loop calls both and
never branches on which policy it has. "Fixed k" is just another implementation.

`GoodputDepth` (the default) picks the k that maximises expected committed tokens per second:

    E(k)    = 1 + sum_{i=1..k} prod_{j=1..i} a_j        (a_j: acceptance at draft position j)
    cost(k) = k * t_draft + t_verify(k) + rtt_oracle + t_loop + [k > 0] * rtt_draft
    k*      = argmax_{k in 0..k_max} E(k) / cost(k)

k = 0 is the oracle decoding alone (no draft call at all). t_loop is the session loop's own
time per round (Python, stream writes), which every round pays whatever its k. The draft's
per-token time, the verify time per k and the round trips are exponential moving averages.
Acceptance at position j is a discounted count of the rounds that tested it: each test weighs
1, and all evidence fades by (1 - 1/window) per drafting round, so a position the draft rarely
reaches does not keep a stale estimate. `shrink` pseudo-tests pull each estimate towards
position j-1's (position 1: towards prior_acceptance), so a position tested a few times cannot
swing k by itself and an untested or long-unreached one falls back on the position before it.
A new session starts from its pair's learned state with at most `carry` tests per position,
so a request whose text is easier or harder than the last one's is followed within a few
rounds. While k = 0 is chosen, acceptance is not observed, so every `probe_every` rounds the
policy probes with a small k to notice a draft that became useful.

Blocks copied by the session loop's prompt lookup (specd.core.lookup) cost no draft call, and their
acceptance has nothing to do with the draft's: it is high where the text repeats its context
and low elsewhere. They get acceptance estimates of their own, learned the same way from those
rounds only (starting from `lookup_prior`: a copied token was the oracle's in 77-89% of the
matches on the benchmark's prompts), and `lookup_depth()` gives the k of best goodput for a
copied block (no draft time or draft round trip), or 0 when the draft's best round is expected
to do better.

With `confidence_stop` (the default) the block's length is decided token by token instead, by
the draft (specd.core.stopping): a position's expected acceptance comes from the draft's confidence
there, which separates easy text from hard far better than any per-position average, so code
gets long blocks and chat short ones within the same request. Whenever the model above picks
k > 0, the policy asks for k_max tokens with a stop rule: keep a computed token while its
chance of being reached and accepted is at least goodput x verify growth per token, and
compute one more position while it is at least goodput x (t_draft + verify growth), goodput
being the measured tokens per second of recent drafted rounds. It learns the calibration
(acceptance per band of the draft's confidence) from every tested token, and the acceptance of
looked-up tokens per length of the match behind them (a 3-token match is right far less often
than an 8-token one), so a short match ends a block sooner than a long one.

With `tree_width` w > 1 (4 by default) greedy blocks may be draft trees (specd.core.tree): the
draft also offers up to w - 1 alternatives per position, and the same stop rule keeps any token
whose chance of being reached and accepted pays for its verified row, so alternatives appear
where the draft is unsure and the oracle's extra rows are cheap. The policy learns the
acceptance of alternatives by their probability the way it learns the calibration. On the
default pair on a 2-core CPU trees were 5-15% faster than chains overall in three benchmark runs,
11-13% on chat prompts (README, "Choosing k").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from coordinator.session.stats import RoundObservation
from specd.core.stopping import StopRule


class DepthPolicy(Protocol):
    name: str

    def choose_k(self) -> int:
        """The depth for the next round, in 0..k_max (0 = the oracle decodes alone)."""
        ...

    def lookup_depth(self) -> int:
        """The depth of a block copied by prompt lookup, when one is on offer (0 = ask the draft)."""
        ...

    def stop_rule(self) -> StopRule | None:
        """How the draft may end a block of choose_k() tokens early (None: it proposes all of them)."""
        ...

    def tree_width(self) -> int:
        """Alternatives per position a greedy block may offer as a draft tree (0: chains only)."""
        ...

    def observe(self, round: RoundObservation) -> None:
        """Learn from a finished round."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Learned state, to carry from session to session of the same pair."""
        ...


class FixedDepth:
    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"fixed depth must be >= 0, got {k}")
        self.k = k
        self.name = f"fixed:{k}"

    def choose_k(self) -> int:
        return self.k

    def lookup_depth(self) -> int:
        return self.k

    def stop_rule(self) -> StopRule | None:
        return None

    def tree_width(self) -> int:
        return 0

    def observe(self, round: RoundObservation) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {}


class HeuristicDepth:
    """+2 after a round where every draft token was accepted, -1 otherwise (HF transformers' rule)."""

    def __init__(self, k_max: int = 8, start: int = 4, k_min: int = 1):
        self.k_max, self.k_min = k_max, k_min
        self.k = max(k_min, min(start, k_max))
        self.name = "heuristic"

    def choose_k(self) -> int:
        return self.k

    def lookup_depth(self) -> int:
        return self.k

    def stop_rule(self) -> StopRule | None:
        return None

    def tree_width(self) -> int:
        return 0

    def observe(self, round: RoundObservation) -> None:
        if round.k == 0:
            return
        step = 2 if round.accepted == round.k else -1
        self.k = max(self.k_min, min(self.k_max, self.k + step))

    def snapshot(self) -> dict[str, Any]:
        return {"k": self.k}

    def restore(self, state: dict[str, Any]) -> None:
        if "k" in state:
            self.k = max(self.k_min, min(self.k_max, int(state["k"])))


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
    rounds: int = 0
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


def expected_tokens(acceptance: list[float], k: int) -> float:
    """E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j: tokens committed by a round of depth k."""
    total, survive = 1.0, 1.0
    for a in acceptance[:k]:
        survive *= a
        total += survive
    return total


CALIBRATION_BANDS = 10
# Pseudo-tests pulling a band's estimate towards the band's own confidence, and the most tests a band
# keeps (older evidence is scaled down beyond it): calibration is the draft's, so it is learned slowly.
CALIBRATION_SHRINK = 4.0
CALIBRATION_CAP = 200.0
# Expected acceptance of a looked-up token by its match's length (1..8 tokens; longer counts as 8)
# before any is tested: on the benchmark's prompts (the oracle's greedy answers, 96 tokens each) a
# copy was right 17% of the time after a 1-token match, 48% after 2, 58% after 3, 67% after 4,
# 71% after 5 and 81-92% after 6-8.
LOOKUP_LENGTH_PRIOR = (0.15, 0.45, 0.55, 0.65, 0.7, 0.8, 0.85, 0.9)
VERIFY_WEIGHT_CAP = 20
VERIFY_TRUSTED_ROUNDS = 3
# Until two depths have been timed, assume each extra verified token costs this share of a step.
ASSUMED_VERIFY_GROWTH = 0.05


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
        s.rtt_oracle_seconds = self._ema(s.rtt_oracle_seconds if s.rounds > 1 else None, round.oracle_network_seconds)
        s.loop_seconds = self._ema(s.loop_seconds if s.rounds > 1 else None, round.loop_seconds)
        self._count_lookup_lengths(round)
        if round.lookup_led:
            self._count(s.lookup_accepted_weight, s.lookup_tested_weight, round)
            s.lookup_acceptance = self._estimates(s.lookup_accepted_weight, s.lookup_tested_weight, self.lookup_prior)
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
        s.acceptance = self._estimates(s.accepted_weight, s.tested_weight)
        fade = 1.0 - 1.0 / self.window
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
            band = min(CALIBRATION_BANDS - 1, max(0, int(confidence * CALIBRATION_BANDS)))
            _count_capped(s.calibration_accepted, s.calibration_tested, band, hit)
        for prob, hit in round.tested_alternatives():
            band = min(CALIBRATION_BANDS - 1, max(0, int(prob * CALIBRATION_BANDS)))
            _count_capped(s.alternative_accepted, s.alternative_tested, band, hit)

    def _count_lookup_lengths(self, round: RoundObservation) -> None:
        """Count each tested looked-up token under the length of its match."""
        s = self.state
        for length, hit in round.tested_lookups():
            entry = min(len(LOOKUP_LENGTH_PRIOR), max(1, length)) - 1
            _count_capped(s.lookup_length_accepted, s.lookup_length_tested, entry, hit)

    def _count(self, accepted: list[float], tested: list[float], round: RoundObservation) -> range:
        """Fade the evidence, then count the positions this round tested (returned).

        Evidence fades with every round of its kind, tested or not: a deep position that is rarely
        reached must not keep an estimate from easier text; it falls back on the one before."""
        fade = 1.0 - 1.0 / self.window
        accepted[:] = [fade * w for w in accepted]
        tested[:] = [fade * w for w in tested]
        # Position i was tested only if positions 1..i-1 were accepted (in a tree: depth i).
        positions = range(min(round.accepted + 1, round.depth, len(tested)))
        for i in positions:
            accepted[i] += 1.0 if i < round.accepted else 0.0
            tested[i] += 1.0
        return positions

    def _estimates(
        self, accepted_weight: list[float], tested_weight: list[float], prior: float | None = None
    ) -> list[float]:
        estimates, previous = [], self.prior_acceptance if prior is None else prior
        for accepted, tested in zip(accepted_weight, tested_weight):
            if tested + self.shrink > 0:  # else untested with no shrink: the position before's estimate
                previous = (accepted + self.shrink * previous) / (tested + self.shrink)
            estimates.append(previous)
        return estimates

    def estimated_acceptance(self) -> list[float]:
        """a_1..a_kmax; a position never tested inherits the estimate of the position before it,
        so a draft that keeps being right is offered longer blocks."""
        return list(self.state.acceptance)

    # -- the model of a round's cost ----------------------------------------------------------
    def verify_seconds(self, k: int) -> float:
        """t_verify(k): the moving average at k once k has run VERIFY_TRUSTED_ROUNDS times (on a CPU
        the cost is flat for a few tokens, then jumps, which no line fits). Elsewhere the slope b >= 0
        of a least-squares line through the per-k averages (each weighted by how often that k ran,
        capped, so a stale or cold-start point cannot dominate), drawn from the nearest trusted
        depth, or from the line's own centre while no depth is trusted yet."""
        seen = self.state.verify_seconds_by_k
        if not seen:
            return 1.0
        counts = self.state.verify_rounds_by_k
        trusted = [x for x in seen if counts.get(x, 0) >= VERIFY_TRUSTED_ROUNDS]
        if k in trusted:
            return seen[k]
        mean_k, mean_t, slope = self._verify_line()
        if trusted:
            anchor = min(trusted, key=lambda x: (abs(x - k), x))
            return max(1e-6, seen[anchor] + slope * (k - anchor))
        return max(1e-6, mean_t + slope * (k - mean_k))

    def verify_growth(self) -> float:
        """Seconds each further verified token adds: the slope of the line through the per-k averages."""
        return self._verify_line()[2] if self.state.verify_seconds_by_k else 0.0

    def _verify_line(self) -> tuple[float, float, float]:
        """(centre k, centre seconds, slope >= 0) of the weighted least-squares line through the per-k
        averages; with one k seen, the slope assumes ASSUMED_VERIFY_GROWTH of a step per token."""
        seen, counts = self.state.verify_seconds_by_k, self.state.verify_rounds_by_k
        weights = {x: min(counts.get(x, 1), VERIFY_WEIGHT_CAP) for x in seen}
        total = sum(weights.values())
        mean_k = sum(w * x for x, w in weights.items()) / total
        mean_t = sum(w * seen[x] for x, w in weights.items()) / total
        var = sum(w * (x - mean_k) ** 2 for x, w in weights.items())
        if var == 0:
            return mean_k, mean_t, ASSUMED_VERIFY_GROWTH * mean_t
        slope = sum(w * (x - mean_k) * (seen[x] - mean_t) for x, w in weights.items()) / var
        return mean_k, mean_t, max(0.0, slope)

    def round_seconds(self, k: int, *, drafted: bool = True) -> float:
        """Predicted wall time of a round of depth k; drafted=False: a copied block (no draft call)."""
        s = self.state
        cost = self.verify_seconds(k) + s.rtt_oracle_seconds + s.loop_seconds
        if k > 0 and drafted:
            draft = s.draft_token_seconds if s.draft_token_seconds is not None else 0.1 * self.verify_seconds(0)
            cost += k * draft + s.rtt_draft_seconds
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
        if k == 0 and self._rounds_since_draft >= self.probe_every:
            return self.k_max if self.confidence_stop else self.probe_k
        return k

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
        middles = [(band + 0.5) / CALIBRATION_BANDS for band in range(CALIBRATION_BANDS)]
        return _non_decreasing_estimates(s.calibration_accepted, s.calibration_tested, middles)

    def alternative_calibration(self) -> list[float]:
        """Expected acceptance of a draft tree's alternative per band of its probability, learned as the
        calibration is; empty until one has been tested (the draft then scales the top choice's)."""
        s = self.state
        if not any(s.alternative_tested):
            return []
        middles = [(band + 0.5) / CALIBRATION_BANDS for band in range(CALIBRATION_BANDS)]
        return _non_decreasing_estimates(s.alternative_accepted, s.alternative_tested, middles)

    def lookup_by_length(self) -> list[float]:
        """Expected acceptance of a looked-up token per length of its match (1..8 tokens), learned the way
        the calibration is, pulled towards LOOKUP_LENGTH_PRIOR."""
        s = self.state
        return _non_decreasing_estimates(s.lookup_length_accepted, s.lookup_length_tested, LOOKUP_LENGTH_PRIOR)

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
        draft = s.draft_token_seconds if s.draft_token_seconds is not None else 0.1 * self.verify_seconds(0)
        goodput, growth = self.draft_goodput(), self.verify_growth()
        return StopRule(
            min_survival=min(1.0, max(0.0, goodput * growth)),
            calibration=tuple(self.calibration()),
            lookup_acceptance=min(1.0, max(0.0, s.lookup_acceptance[0])),
            extend_survival=min(1.0, max(0.0, goodput * (draft + growth))),
            lookup_by_length=tuple(min(1.0, max(0.0, a)) for a in self.lookup_by_length()),
            alternative_calibration=tuple(min(1.0, max(0.0, a)) for a in self.alternative_calibration()),
        )

    def tree_width(self) -> int:
        """Draft trees go with the stop rule, which decides which alternatives pay their verify row."""
        return self._tree_width if self.confidence_stop else 0

    def lookup_goodput(self, k: int) -> float:
        """Expected committed tokens per second of a copied block of depth k."""
        return expected_tokens(self.state.lookup_acceptance, k) / self.round_seconds(k, drafted=False)

    def lookup_depth(self) -> int:
        """The copied block's best depth, or 0 when asking the draft is expected to do better."""
        depth = max(range(1, self.k_max + 1), key=lambda k: (self.lookup_goodput(k), -k))
        return depth if self.lookup_goodput(depth) > self.draft_goodput() else 0

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
        accepted, tested = self._carried(accepted, tested)
        lookup_accepted, lookup_tested = self._carried(
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
            rounds=int(state.get("rounds", 0)),
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
        self.state.acceptance = self._estimates(accepted, tested)
        self.state.lookup_acceptance = self._estimates(lookup_accepted, lookup_tested, self.lookup_prior)

    @staticmethod
    def _bands(values: list[float] | None, size: int = CALIBRATION_BANDS) -> list[float]:
        values = [float(v) for v in values or []]
        return values if len(values) == size else [0.0] * size

    def _carried(self, accepted: list[float], tested: list[float]) -> tuple[list[float], list[float]]:
        """Counts padded to k_max, the pair's history counting as at most `carry` tests per position."""
        if len(accepted) != len(tested):
            accepted, tested = [], []
        tested = tested + [0.0] * (self.k_max - len(tested))
        accepted = accepted + [0.0] * (self.k_max - len(accepted))
        scale = [min(1.0, self.carry / n) if n else 0.0 for n in tested]
        return [a * f for a, f in zip(accepted, scale)], [n * f for n, f in zip(tested, scale)]


POLICY_NAMES = ("goodput", "heuristic", "fixed:K")


GOODPUT_OPTIONS = {
    "smoothing": float, "prior_acceptance": float, "window": float, "shrink": float, "carry": float,
    "probe_every": int, "probe_k": int, "lookup_prior": float, "confidence_stop": int, "tree_width": int,
}


def _goodput_options(text: str) -> dict[str, Any]:
    """'smoothing=0.2,probe_every=8' -> keyword arguments of GoodputDepth (k_max comes from the pair)."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in GOODPUT_OPTIONS or not value:
            raise ValueError(f"bad goodput option {item!r}; known: {', '.join(f'{n}=...' for n in GOODPUT_OPTIONS)}")
        try:
            options[name] = GOODPUT_OPTIONS[name](value)
        except ValueError:
            raise ValueError(f"bad goodput option {item!r}: {value!r} is not a number") from None
    if not 0 < options.get("smoothing", 0.5) <= 1 or not 0 <= options.get("prior_acceptance", 0.5) <= 1:
        raise ValueError("goodput smoothing must be in (0, 1] and prior_acceptance in [0, 1]")
    if not 0 <= options.get("lookup_prior", 0.5) <= 1:
        raise ValueError("goodput lookup_prior must be in [0, 1]")
    if options.get("confidence_stop", 0) not in (0, 1):
        raise ValueError("goodput confidence_stop must be 0 (off) or 1 (on)")
    if not 0 <= options.get("tree_width", 0) <= 16:
        raise ValueError("goodput tree_width must be in 0..16 (0 or 1: chains only)")
    if options.get("probe_every", 1) < 1 or options.get("probe_k", 1) < 1:
        raise ValueError("goodput probe_every and probe_k must be at least 1")
    if options.get("window", 2) <= 1 or options.get("shrink", 0) < 0 or options.get("carry", 0) < 0:
        raise ValueError("goodput window must be > 1, shrink and carry >= 0")
    return options


def make_policy(spec: str, k_max: int, state: dict[str, Any] | None = None) -> DepthPolicy:
    """Build a policy from its spec: 'goodput' (optionally 'goodput:smoothing=0.2,probe_every=8'),
    'heuristic' or 'fixed:K'."""
    spec = spec.strip().lower()
    policy: Any
    if spec.startswith("fixed:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad depth policy {spec!r}: fixed needs an integer, e.g. fixed:4") from None
        if not 0 <= k <= k_max:
            raise ValueError(f"fixed depth {k} is outside 0..{k_max}")
        return FixedDepth(k)
    if spec == "heuristic":
        policy = HeuristicDepth(k_max=k_max)
    elif spec == "goodput" or spec.startswith("goodput:"):
        policy = GoodputDepth(k_max=k_max, **_goodput_options(spec.removeprefix("goodput").lstrip(":")))
    else:
        raise ValueError(f"unknown depth policy {spec!r}; use one of {', '.join(POLICY_NAMES)}")
    if state:
        policy.restore(state)
    return policy


def speedup_bound(alpha: float, cost_ratio: float, k: int) -> float:
    """S(k) = E(k) / (k c + 1) for a constant acceptance alpha (used in docs and tests)."""
    return expected_tokens([alpha] * k, k) / (k * cost_ratio + 1)


def _count_capped(accepted: list[float], tested: list[float], entry: int, hit: bool) -> None:
    """One test of a calibration entry; beyond CALIBRATION_CAP tests older evidence is scaled down."""
    accepted[entry] += 1.0 if hit else 0.0
    tested[entry] += 1.0
    if tested[entry] > CALIBRATION_CAP:
        scale = CALIBRATION_CAP / tested[entry]
        accepted[entry] *= scale
        tested[entry] *= scale


def _non_decreasing_estimates(
    accepted: list[float], tested: list[float], priors: list[float] | tuple[float, ...]
) -> list[float]:
    """Each entry's acceptance pulled towards its prior by CALIBRATION_SHRINK pseudo-tests, then made
    non-decreasing along the entries (neighbours that disagree are pooled, weighted by evidence)."""
    pools: list[list[float]] = []  # [estimate, weight, entries]
    for hits, tests, prior in zip(accepted, tested, priors):
        weight = tests + CALIBRATION_SHRINK
        pools.append([(hits + CALIBRATION_SHRINK * prior) / weight, weight, 1])
        while len(pools) > 1 and pools[-2][0] > pools[-1][0]:
            (high, w1, n1), (low, w2, n2) = pools.pop(-2), pools.pop()
            pools.append([(high * w1 + low * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [estimate for estimate, _, entries in pools for _ in range(int(entries))]
