"""The oracle worker's settings (env prefix SPECD_ORACLE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from specd.core.defaults import ORACLE_PORT
from specd.rpc.settings import WorkerConfig


class OracleConfig(WorkerConfig):
    model_config = SettingsConfigDict(env_prefix="SPECD_ORACLE_", extra="forbid", validate_assignment=True)

    port: int = Field(ORACLE_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_batch_rows: int = Field(
        256,
        ge=1,
        description="Rows (tokens) one forward pass may hold across all sessions: every queued verify block, then "
        "prompt chunks while room is left (a step with nothing else takes one chunk anyway).",
    )
    prefill_chunk_tokens: int = Field(
        64,
        ge=1,
        description="Prompts are prefilled in chunks of this many tokens, one chunk per session per step, so a long "
        "prompt holds other sessions' rounds back by one chunk at most.",
    )
    batching: bool = Field(
        True,
        description="Continuous batching: each forward pass serves every session with work queued. false runs one "
        "session's work per pass (for comparison).",
    )
