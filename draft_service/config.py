"""The draft worker's settings (env prefix SPECD_DRAFT_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from specd.core.defaults import DEFAULT_DRAFT, DRAFT_PORT
from specd.core.settings import PromptLookupSettings
from specd.rpc.settings import WorkerConfig


class DraftConfig(WorkerConfig, PromptLookupSettings):
    model_config = SettingsConfigDict(env_prefix="SPECD_DRAFT_", extra="forbid", validate_assignment=True)

    port: int = Field(DRAFT_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    model: str = Field(
        DEFAULT_DRAFT,
        description="Model source: a shipped draft ('smollm2-135m-feature-draft', 'smollm2-135m-draft'), "
        "'smollm2-135m-instruct', a .gguf file, a local dir (a model or a `specd distill` artifact) or a hub id.",
    )
    quantize: Literal["none", "int8"] = Field(
        "int8",
        description="On CPU, the draft's linear layers (its output head and decoder layers) as int8 weights, a "
        "quarter of the bytes a draft step reads (specd/kernels/int8_linear.py). Lossless either way: the oracle accepts "
        "by its own arithmetic; a draft's changes only how often. 'none' keeps them in the model's dtype.",
    )
    proposal_top_n: int = Field(
        64,
        ge=1,
        description="Sampled sessions propose from the draft's top-N tokens (renormalised) and send that "
        "distribution q exactly; lossless for any N, smaller N means smaller messages.",
    )
