"""Where a draft block ends: the stop rule the coordinator sends with each Propose (specd.v1 StopRule).

A block's tokens are accepted in order, so the chance that the first j are all accepted is the
product of each one's expected acceptance. Every further token costs a draft step and a verified
position; it pays while that chance, times the tokens per second the session makes, exceeds its
cost. The coordinator's depth policy turns that into `min_survival` and learns `calibration`
(what the draft's confidence is worth); the drafter applies the rule token by token.
"""

from __future__ import annotations

from dataclasses import dataclass

from specd.errors import InvalidArgument

MAX_CALIBRATION_BANDS = 100


@dataclass(frozen=True)
class StopRule:
    """End a block before the position where the chance that all of it is accepted drops below min_survival."""

    min_survival: float
    calibration: tuple[float, ...] = ()  # expected acceptance by confidence band; empty: the confidence itself
    lookup_acceptance: float = 0.8  # expected acceptance of a looked-up token

    def __post_init__(self) -> None:
        values = (self.min_survival, self.lookup_acceptance, *self.calibration)
        if not all(0.0 <= v <= 1.0 for v in values):  # also refuses NaN
            raise InvalidArgument("stop rule: min_survival, lookup_acceptance and calibration must lie in [0, 1]")
        if len(self.calibration) > MAX_CALIBRATION_BANDS:
            raise InvalidArgument(f"stop rule: at most {MAX_CALIBRATION_BANDS} calibration entries")

    def expected_acceptance(self, confidence: float) -> float:
        if not self.calibration:
            return confidence
        bands = len(self.calibration)
        return self.calibration[min(bands - 1, max(0, int(confidence * bands)))]
