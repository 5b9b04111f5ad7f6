"""The estimators the goodput policy learns with. Each works on plain lists and dicts that the policy
keeps in its state (GoodputState), so what they learn crosses processes as it is.

- `DiscountedRates`: acceptance per draft position j, a_j, from a discounted count of the rounds
  that tested it. A round tests position j only if positions 1..j-1 were accepted (in a tree: if
  it reached depth j). Each test weighs 1, and all evidence fades by f = 1 - 1/window per round
  of its kind, tested or not, so a position the draft rarely reaches does not keep a stale
  estimate. With h_j and n_j the discounted accepted and tested counts and s = `shrink`,

      a_j = (h_j + s * a_{j-1}) / (n_j + s),     a_0 = the prior,

  so a position tested a few times cannot swing k by itself, and an untested one inherits the
  estimate of the position before it. Carried to a new session, each position's counts are
  scaled down to at most `carry` tests (its rate is kept), so a request whose text is easier or
  harder than the last one's is followed within a few rounds.
- `CalibrationBands`: acceptance per entry of a table, an entry being a band of a probability (the
  draft's confidence in a token, an alternative's probability) or a looked-up token's match
  length. Each test adds 1 to its entry; beyond `cap` tests an entry's counts are scaled back to
  `cap`, so old evidence gives way at a rate of 1/cap per test. An entry's estimate is pulled
  towards its prior p_e by `shrink` pseudo-tests, (h_e + s * p_e) / (n_e + s), and the table is
  then made non-decreasing along the entries (a more confident token or a longer match is never
  expected to be right less often): neighbours that disagree are pooled into their mean weighted
  by n_e + s (pool-adjacent-violators), which is the least-squares non-decreasing fit.
- `VerifyCostModel`: the oracle's verify time per depth k, t_verify(k), from exponential moving
  averages T_x of the depths x that ran. The cost is not linear in k on every device (on a CPU
  it is flat for a few tokens and then jumps, which no line fits), so a depth's own average is
  used once it ran `trusted_rounds` times. Elsewhere the slope b of a weighted least-squares
  line through the averages is used, each depth weighing min(rounds at x, `weight_cap`) so a
  stale or cold-start point cannot dominate:

      b = sum_x w_x (x - x̄)(T_x - T̄) / sum_x w_x (x - x̄)^2,   clamped at b >= 0
      t_verify(k) = T_a + b (k - a)      a: the nearest trusted depth (ties: the smaller)
                  = T̄ + b (k - x̄)        while no depth is trusted

  with x̄ and T̄ the weighted means. With a single depth timed there is no slope to fit, and
  each further token is assumed to cost `assumed_growth` x T̄. b is also the verify growth per
  token the stop rule prices a row at. Before any of this, each T_x is capped by the averages of
  the trusted deeper depths (a longer block never verifies faster): a depth no longer chosen keeps
  the average of when it last ran, and without the cap one stall then would price it out for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass

# A floor on a modelled verify time: a line drawn below a trusted depth must not predict a free or
# negative verify, which would make the goodput of that depth infinite or negative.
MIN_VERIFY_SECONDS = 1e-6
# What t_verify reads before any depth was timed: the same for every k, so the verify cost favours no
# depth until one is measured.
UNTIMED_VERIFY_SECONDS = 1.0


@dataclass(frozen=True)
class DiscountedRates:
    """Per-position acceptance from discounted counts (the positions 0..size-1 stand for a_1..a_size)."""

    size: int
    _: KW_ONLY
    window: float  # evidence fades over about this many rounds (> 1)
    shrink: float  # pseudo-tests pulling an estimate towards the position before's
    carry: float  # the most tests a position's history weighs in a new session

    @property
    def fade(self) -> float:
        return 1.0 - 1.0 / self.window

    def count(self, accepted: list[float], tested: list[float], reached: int, kept: int) -> range:
        """Fade the evidence, then count a round that tested positions 0..reached-1 and kept the first
        `kept` of them (in place); returns the positions tested."""
        accepted[:] = [self.fade * w for w in accepted]
        tested[:] = [self.fade * w for w in tested]
        positions = range(min(reached, len(tested)))
        for i in positions:
            accepted[i] += 1.0 if i < kept else 0.0
            tested[i] += 1.0
        return positions

    def estimates(self, accepted: Sequence[float], tested: Sequence[float], prior: float) -> list[float]:
        """Each position's acceptance, pulled towards the position before's (the first: towards `prior`)."""
        estimates, previous = [], prior
        for hits, tests in zip(accepted, tested):
            if tests + self.shrink > 0:  # else untested with no shrink: the position before's estimate
                previous = (hits + self.shrink * previous) / (tests + self.shrink)
            estimates.append(previous)
        return estimates

    def carried(self, accepted: list[float], tested: list[float]) -> tuple[list[float], list[float]]:
        """Counts padded to `size`, a pair's history weighing at most `carry` tests per position.
        Counts of different lengths cannot be matched up by position, so none of them is carried."""
        if len(accepted) != len(tested):
            accepted, tested = [], []
        tested = tested + [0.0] * (self.size - len(tested))
        accepted = accepted + [0.0] * (self.size - len(accepted))
        scale = [min(1.0, self.carry / n) if n else 0.0 for n in tested]
        return [a * f for a, f in zip(accepted, scale)], [n * f for n, f in zip(tested, scale)]


@dataclass(frozen=True)
class CalibrationBands:
    """Acceptance per entry of a table (bands of a probability, or match lengths), capped and non-decreasing."""

    bands: int
    _: KW_ONLY
    shrink: float  # pseudo-tests pulling an entry towards its prior
    cap: float  # the most tests an entry keeps; older evidence is scaled down beyond it

    def band(self, probability: float) -> int:
        """The band of a probability in [0, 1]: equal widths, 1.0 in the top band."""
        return min(self.bands - 1, max(0, int(probability * self.bands)))

    def middles(self) -> list[float]:
        """Each band's own probability, the natural prior for what it is worth."""
        return [(band + 0.5) / self.bands for band in range(self.bands)]

    def count(self, accepted: list[float], tested: list[float], entry: int, hit: bool) -> None:
        """One test of an entry (in place); beyond `cap` tests older evidence is scaled down."""
        accepted[entry] += 1.0 if hit else 0.0
        tested[entry] += 1.0
        if tested[entry] > self.cap:
            scale = self.cap / tested[entry]
            accepted[entry] *= scale
            tested[entry] *= scale

    def estimates(self, accepted: Sequence[float], tested: Sequence[float], priors: Sequence[float]) -> list[float]:
        """Each entry's acceptance pulled towards its prior by `shrink` pseudo-tests, then made non-decreasing
        along the entries (neighbours that disagree are pooled, weighted by evidence)."""
        pools: list[list[float]] = []  # [estimate, weight, entries]
        for hits, tests, prior in zip(accepted, tested, priors):
            weight = tests + self.shrink
            pools.append([(hits + self.shrink * prior) / weight, weight, 1])
            while len(pools) > 1 and pools[-2][0] > pools[-1][0]:
                (high, w1, n1), (low, w2, n2) = pools.pop(-2), pools.pop()
                pools.append([(high * w1 + low * w2) / (w1 + w2), w1 + w2, n1 + n2])
        return [estimate for estimate, _, entries in pools for _ in range(int(entries))]


@dataclass(frozen=True)
class VerifyCostModel:
    """t_verify(k) from the per-k moving averages in the policy's state (read here, never written)."""

    seconds_by_k: dict[int, float]  # moving average of the verify time at each depth that ran
    rounds_by_k: dict[int, int]  # how often each depth ran
    _: KW_ONLY
    trusted_rounds: int  # runs after which a depth's own average is used
    weight_cap: int  # the most weight one depth has in the line
    assumed_growth: float  # share of a step each further token costs while one depth is timed

    def seconds(self, k: int) -> float:
        """t_verify(k): the moving average at k once k ran `trusted_rounds` times; elsewhere the line's slope
        (each depth weighted by how often it ran, capped, so a stale or cold-start point cannot dominate), drawn
        from the nearest trusted depth, or from the line's own centre while no depth is trusted yet. Never above
        a deeper trusted depth's average (`averages`)."""
        seen = self.averages()
        if not seen:
            return UNTIMED_VERIFY_SECONDS
        trusted = self._trusted()
        if k in trusted:
            return seen[k]
        mean_k, mean_t, slope = self.line()
        if trusted:
            anchor = min(trusted, key=lambda x: (abs(x - k), x))
            estimate = seen[anchor] + slope * (k - anchor)
        else:
            estimate = mean_t + slope * (k - mean_k)
        return max(MIN_VERIFY_SECONDS, min([estimate, *(seen[x] for x in trusted if x > k)]))

    def _trusted(self) -> list[int]:
        return [x for x in self.seconds_by_k if self.rounds_by_k.get(x, 0) >= self.trusted_rounds]

    def averages(self) -> dict[int, float]:
        """The per-depth averages, each capped by those of the trusted deeper depths. A block never verifies
        faster than a shorter one, so an average above a deeper one's is stale: a depth the policy stopped
        choosing keeps the average of when it last ran, and one slow step then (a stall of the host) would make
        it look dear for good, as nothing measures it again."""
        trusted = self._trusted()
        return {
            x: min([t, *(self.seconds_by_k[j] for j in trusted if j > x)]) for x, t in self.seconds_by_k.items()
        }

    def growth(self) -> float:
        """Seconds each further verified token adds: the slope of the line through the per-k averages."""
        return self.line()[2] if self.seconds_by_k else 0.0

    def line(self) -> tuple[float, float, float]:
        """(centre k, centre seconds, slope >= 0) of the weighted least-squares line through the (capped) averages;
        with one k seen, the slope assumes `assumed_growth` of a step per token. A negative fitted slope (noise:
        a deeper block never verifies faster) reads 0."""
        seen = self.averages()
        weights = {x: min(self.rounds_by_k.get(x, 1), self.weight_cap) for x in seen}
        total = sum(weights.values())
        mean_k = sum(w * x for x, w in weights.items()) / total
        mean_t = sum(w * seen[x] for x, w in weights.items()) / total
        var = sum(w * (x - mean_k) ** 2 for x, w in weights.items())
        if var == 0:
            return mean_k, mean_t, self.assumed_growth * mean_t
        slope = sum(w * (x - mean_k) * (seen[x] - mean_t) for x, w in weights.items()) / var
        return mean_k, mean_t, max(0.0, slope)
