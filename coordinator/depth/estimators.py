"""The estimators the goodput policy learns with, each on plain lists and dicts so its state crosses processes.

- `DiscountedRates`: acceptance per draft position from a discounted count of the rounds that
  tested it. Each test weighs 1, and all evidence fades by (1 - 1/window) per round of its kind,
  so a position the draft rarely reaches does not keep a stale estimate. `shrink` pseudo-tests
  pull each estimate towards the position before's (the first: towards a prior), so a position
  tested a few times cannot swing k by itself and an untested one inherits the one before it.
  Carried to a new session, the counts weigh at most `carry` tests per position.
- `CalibrationBands`: acceptance per band of a probability (the draft's confidence, an
  alternative's probability, or a looked-up token's match length), counted with a cap so old
  evidence gives way, pulled towards a prior per band and made non-decreasing along the bands
  (neighbours that disagree are pooled, weighted by their evidence).
- `VerifyCostModel`: the oracle's verify time per depth k. On a CPU the cost is flat for a few
  tokens and then jumps, which no line fits: a depth's own moving average is used once it ran
  `trusted_rounds` times; elsewhere the slope of a weighted least-squares line through the
  per-k averages, drawn from the nearest trusted depth.
"""

from __future__ import annotations

from collections.abc import Sequence


class DiscountedRates:
    def __init__(self, size: int, *, window: float, shrink: float, carry: float):
        self.size, self.window, self.shrink, self.carry = size, window, shrink, carry

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
        """Counts padded to `size`, a pair's history weighing at most `carry` tests per position."""
        if len(accepted) != len(tested):
            accepted, tested = [], []
        tested = tested + [0.0] * (self.size - len(tested))
        accepted = accepted + [0.0] * (self.size - len(accepted))
        scale = [min(1.0, self.carry / n) if n else 0.0 for n in tested]
        return [a * f for a, f in zip(accepted, scale)], [n * f for n, f in zip(tested, scale)]


class CalibrationBands:
    def __init__(self, bands: int, *, shrink: float, cap: float):
        self.bands, self.shrink, self.cap = bands, shrink, cap

    def band(self, probability: float) -> int:
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


class VerifyCostModel:
    def __init__(
        self, seconds_by_k: dict[int, float], rounds_by_k: dict[int, int], *, trusted_rounds: int, weight_cap: int,
        assumed_growth: float,
    ):
        """seconds_by_k, rounds_by_k: the policy's state (read, never written here)."""
        self.seconds_by_k, self.rounds_by_k = seconds_by_k, rounds_by_k
        self.trusted_rounds, self.weight_cap, self.assumed_growth = trusted_rounds, weight_cap, assumed_growth

    def seconds(self, k: int) -> float:
        """t_verify(k): the moving average at k once k ran `trusted_rounds` times; elsewhere the line's slope
        (each depth weighted by how often it ran, capped, so a stale or cold-start point cannot dominate), drawn
        from the nearest trusted depth, or from the line's own centre while no depth is trusted yet."""
        seen = self.seconds_by_k
        if not seen:
            return 1.0
        trusted = [x for x in seen if self.rounds_by_k.get(x, 0) >= self.trusted_rounds]
        if k in trusted:
            return seen[k]
        mean_k, mean_t, slope = self.line()
        if trusted:
            anchor = min(trusted, key=lambda x: (abs(x - k), x))
            return max(1e-6, seen[anchor] + slope * (k - anchor))
        return max(1e-6, mean_t + slope * (k - mean_k))

    def growth(self) -> float:
        """Seconds each further verified token adds: the slope of the line through the per-k averages."""
        return self.line()[2] if self.seconds_by_k else 0.0

    def line(self) -> tuple[float, float, float]:
        """(centre k, centre seconds, slope >= 0) of the weighted least-squares line through the per-k averages;
        with one k seen, the slope assumes `assumed_growth` of a step per token."""
        seen = self.seconds_by_k
        weights = {x: min(self.rounds_by_k.get(x, 1), self.weight_cap) for x in seen}
        total = sum(weights.values())
        mean_k = sum(w * x for x, w in weights.items()) / total
        mean_t = sum(w * seen[x] for x, w in weights.items()) / total
        var = sum(w * (x - mean_k) ** 2 for x, w in weights.items())
        if var == 0:
            return mean_k, mean_t, self.assumed_growth * mean_t
        slope = sum(w * (x - mean_k) * (seen[x] - mean_t) for x, w in weights.items()) / var
        return mean_k, mean_t, max(0.0, slope)
