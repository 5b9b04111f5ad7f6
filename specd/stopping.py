"""Where a draft block ends: the stop rule the coordinator sends with each Propose (specd.v1 StopRule).

A block's tokens are accepted in order, so the chance that the first j are all accepted is the
product of each one's expected acceptance. Once the draft has computed a position, keeping its
token costs one more verified position; computing the next position costs a draft step as
well. Each pays while that chance, times the tokens per second the session makes, exceeds its
cost: hence two thresholds, `min_survival` to keep a computed token and `extend_survival` to
compute another. The coordinator's depth policy turns that into `min_survival` and learns `calibration`
(what the draft's confidence is worth); the drafter applies the rule token by token.
"""

from __future__ import annotations

from dataclasses import dataclass

from specd.errors import InvalidArgument

MAX_CALIBRATION_BANDS = 100


@dataclass(frozen=True)
class StopRule:
    """End a block before the position where the chance that all of it is accepted drops below min_survival."""

    min_survival: float  # keep a token whose position the draft has computed while the survival stays at least this
    calibration: tuple[float, ...] = ()  # expected acceptance by confidence band; empty: the confidence itself
    lookup_acceptance: float = 0.8  # expected acceptance of a looked-up token
    extend_survival: float = 0.0  # compute a further position only while the survival is at least this

    def __post_init__(self) -> None:
        values = (self.min_survival, self.lookup_acceptance, self.extend_survival, *self.calibration)
        if not all(0.0 <= v <= 1.0 for v in values):  # also refuses NaN
            raise InvalidArgument(
                "stop rule: min_survival, extend_survival, lookup_acceptance and calibration must lie in [0, 1]"
            )
        if len(self.calibration) > MAX_CALIBRATION_BANDS:
            raise InvalidArgument(f"stop rule: at most {MAX_CALIBRATION_BANDS} calibration entries")

    @property
    def extend_threshold(self) -> float:
        return max(self.min_survival, self.extend_survival)

    def expected_acceptance(self, confidence: float) -> float:
        if not self.calibration:
            return confidence
        bands = len(self.calibration)
        return self.calibration[min(bands - 1, max(0, int(confidence * bands)))]
