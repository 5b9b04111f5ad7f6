"""Settings more than one service reads: prompt lookup's (the coordinator's session loop and draft workers)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings


class PromptLookupSettings(BaseSettings):
    """Prompt lookup (specd.core.lookup), for the coordinator's session loop and for draft workers."""

    lookup_min_ngram: int = Field(
        3,
        ge=0,
        le=64,
        description="Prompt lookup: where the last N or more tokens (N = this) occurred earlier in the session, "
        "what followed them then is proposed as draft tokens that cost no model step. 0 turns it off.",
    )
    lookup_max_ngram: int = Field(8, ge=1, le=64, description="Prompt lookup: the longest match tried first.")

    @model_validator(mode="after")
    def _lookup_lengths(self) -> PromptLookupSettings:
        if self.lookup_min_ngram > self.lookup_max_ngram:
            raise ValueError(
                f"lookup_min_ngram ({self.lookup_min_ngram}) must not exceed lookup_max_ngram ({self.lookup_max_ngram})"
            )
        return self

    @property
    def lookup_ngram(self) -> tuple[int, int] | None:
        """(min n, max n), or None when prompt lookup is off."""
        return (self.lookup_min_ngram, self.lookup_max_ngram) if self.lookup_min_ngram else None
