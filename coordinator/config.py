"""Validated settings for the coordinator (env prefix SPECD_COORDINATOR_)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from coordinator.depth import make_policy
from specd.core.defaults import COORDINATOR_PORT
from specd.core.settings import PromptLookupSettings


class CoordinatorConfig(PromptLookupSettings):
    model_config = SettingsConfigDict(env_prefix="SPECD_COORDINATOR_", extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Address the client and admin APIs listen on.")
    port: int = Field(COORDINATOR_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus port; 0 picks one, -1 disables.")
    http_port: int = Field(
        -1, ge=-1, le=65535,
        description="Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics) on the same host; 0 picks one, -1 disables.",
    )
    oracles: list[str] = Field(default_factory=list, description="Oracle worker addresses to register at start.")
    drafts: list[str] = Field(default_factory=list, description="Draft worker addresses to register at start.")
    depth_policy: str = Field("goodput", description="Default depth policy: goodput, heuristic or fixed:K.")
    max_depth: int = Field(8, ge=1, le=64, description="Largest k any policy may choose (k_max).")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_concurrent_sessions: int = Field(64, ge=1, description="Sessions run at once; more wait in line.")
    max_waiting: int = Field(
        256,
        ge=0,
        description="Requests that may wait in line for a session slot; beyond it a request gets RESOURCE_EXHAUSTED "
        "at once, with a RetryInfo saying when to retry.",
    )
    health_interval_seconds: float = Field(2.0, gt=0, description="How often workers are health-checked.")
    report_interval_seconds: float = Field(0.5, gt=0, description="How often a session reports its progress.")
    lease_seconds: float = Field(
        60.0, gt=0,
        description="A session's assignment stops counting against its workers when its progress reports stop for "
        "this long (a coordinator that crashed, a session lost between its assignment and its release).",
    )
    oracle_delay_ms: float = Field(
        0.0, ge=0, description="Added to every Verify call: rehearses a distant oracle (benchmarks, tests)."
    )
    draft_delay_ms: float = Field(0.0, ge=0, description="Added to every Propose call: rehearses a distant draft.")
    ray_address: str = Field("", description="Ray cluster to join ('' starts a local Ray; 'auto' finds one).")
    ray_namespace: str = Field("specd", description="Ray namespace of the control-plane actor.")
    plane_name: str = Field("specd-control-plane", description="Name of the control-plane actor to join or create.")
    grace_seconds: float = Field(10.0, ge=0, description="On SIGTERM, in-flight requests get this long.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="gRPC max message size.")

    @field_validator("depth_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        make_policy(value, 64)
        return value

    @field_validator("oracles", "drafts", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
