"""The oracle worker's settings (env prefix SPECD_ORACLE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from specd.core.defaults import ORACLE_PORT
from specd.rpc.settings import WorkerConfig


class OracleConfig(WorkerConfig):
    model_config = SettingsConfigDict(env_prefix="SPECD_ORACLE_", extra="forbid", validate_assignment=True)

    port: int = Field(ORACLE_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
