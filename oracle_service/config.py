"""The oracle worker's settings (env prefix SPECD_ORACLE_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from specd.core.defaults import ORACLE_PORT
from specd.rpc.settings import WorkerConfig


class OracleConfig(WorkerConfig):
    model_config = SettingsConfigDict(env_prefix="SPECD_ORACLE_", extra="forbid", validate_assignment=True)

    port: int = Field(ORACLE_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    quantize: Literal["none", "int4"] = Field(
        "none",
        description="On CPU, 'int4' runs the linear layers whose weights are Q4_1 blocks (a Q4_1 GGUF file, like "
        "the embedded oracle) through int4 kernels with bfloat16 activations: an eighth of the bytes per step, "
        "different last bits (specd/kernels/int4_linear.py). 'none' keeps float32.",
    )
