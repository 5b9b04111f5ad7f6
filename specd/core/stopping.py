"""Where a draft block ends: the stop rule the coordinator sends with each Propose (specd.v1 StopRule).

A block's tokens are accepted in order, so the chance that the first j are all accepted is the
product of each one's expected acceptance. Once the draft has computed a position, keeping its
token costs one more verified position; computing the next position costs a draft step as
well. Each pays while that chance, times the tokens per second the session makes, exceeds its
cost: hence two thresholds, `min_survival` to keep a computed token and `extend_survival` to
compute another. The coordinator's depth policy turns that into `min_survival` and learns `calibration`
(what the draft's confidence is worth); the drafter applies the rule token by token.

A token proposed by prompt lookup is worth what its match is worth: a copy after a long match is
right far more often than one after a short match (measured: docs/design.md, "Prompt lookup"), so
the rule carries an expected acceptance per match length (`lookup_by_length`).
"""

from __future__ import annotations

from dataclasses import dataclass

from specd.core.errors import InvalidArgument

MAX_CALIBRATION_BANDS = 100
MAX_LOOKUP_LENGTHS = 32


@dataclass(frozen=True)
class StopRule:
    """End a block before the position where the chance that all of it is accepted drops below min_survival."""

    min_survival: float  # keep a token whose position the draft has computed while the survival stays at least this
    calibration: tuple[float, ...] = ()  # expected acceptance by confidence band; empty: the confidence itself
    lookup_acceptance: float = 0.8  # expected acceptance of a looked-up token
    extend_survival: float = 0.0  # compute a further position only while the survival is at least this
    lookup_by_length: tuple[float, ...] = ()  # entry i: a looked-up token after an (i + 1)-token match
    # A draft tree's alternatives (tokens other than the draft's top choice at their position): expected
    # acceptance by band of their own probability; empty: their probability relative to the top one's, times
    # the top choice's expected acceptance.
    alternative_calibration: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        values = (
            self.min_survival, self.lookup_acceptance, self.extend_survival,
            *self.calibration, *self.lookup_by_length, *self.alternative_calibration,
        )
        if not all(0.0 <= v <= 1.0 for v in values):  # also refuses NaN
            raise InvalidArgument(
                "stop rule: min_survival, extend_survival, lookup_acceptance, calibration, "
                "lookup_by_length and alternative_calibration must lie in [0, 1]"
            )
        if max(len(self.calibration), len(self.alternative_calibration)) > MAX_CALIBRATION_BANDS:
            raise InvalidArgument(f"stop rule: at most {MAX_CALIBRATION_BANDS} calibration entries")
        if len(self.lookup_by_length) > MAX_LOOKUP_LENGTHS:
            raise InvalidArgument(f"stop rule: at most {MAX_LOOKUP_LENGTHS} lookup_by_length entries")

    @property
    def extend_threshold(self) -> float:
        return max(self.min_survival, self.extend_survival)

    def expected_acceptance(self, confidence: float) -> float:
        if not self.calibration:
            return confidence
        bands = len(self.calibration)
        return self.calibration[min(bands - 1, max(0, int(confidence * bands)))]

    def alternative_expected(self, prob: float, confidence: float) -> float:
        """Expected acceptance of a tree alternative of probability `prob` where the top one is `confidence`."""
        if not self.alternative_calibration:
            return self.expected_acceptance(confidence) * min(1.0, prob / confidence) if confidence > 0 else 0.0
        bands = len(self.alternative_calibration)
        return self.alternative_calibration[min(bands - 1, max(0, int(prob * bands)))]

    def lookup_expected(self, match_length: int) -> float:
        """Expected acceptance of a token copied after a match of this many tokens."""
        if not self.lookup_by_length:
            return self.lookup_acceptance
        return self.lookup_by_length[min(len(self.lookup_by_length), max(1, match_length)) - 1]
