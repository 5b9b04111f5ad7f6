"""Settings every worker service shares (WorkerConfig).

Each service has one pydantic settings model built on these (draft_service.config.DraftConfig,
oracle_service.config.OracleConfig, coordinator.config.CoordinatorConfig). Every field can come
from the command line, from the environment (prefix SPECD_DRAFT_, SPECD_ORACLE_ or
SPECD_COORDINATOR_, e.g. SPECD_ORACLE_PORT=50051) or from the defaults, which work on the
embedded default pair.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from specd.core.defaults import EMBEDDED_ORACLE
from specd.runtime.model_spec import ModelSpec


class WorkerConfig(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all interfaces).")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        -1, ge=-1, le=65535, description="Prometheus metrics port; 0 picks a free one, -1 disables."
    )
    model: str = Field(
        EMBEDDED_ORACLE, description="Model source: 'smollm2-135m-instruct', a .gguf file, a local dir or a hub id."
    )
    layers: int = Field(0, ge=0, description="Keep only the first N decoder layers (0 keeps all).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("cpu", description="Torch device: cpu, cuda or cuda:N.")
    torch_threads: int = Field(0, ge=0, description="Intra-op threads for torch (0 keeps torch's default).")
    cpu_linear: Literal["auto", "onednn", "packed", "dual", "stock"] = Field(
        "auto",
        description="float32 on CPU: how linear layers multiply (specd/kernels/cpu_linear.py). 'onednn' through "
        "oneDNN's re-laid-out weights, 'packed' through a transposed copy and MKL packed copies for blocks of 4, 6 and "
        "9 rows (five times the weights' memory), 'dual' through a transposed copy, 'stock' keeps torch's layers; "
        "'auto' times 'onednn' and 'dual' on this machine at start-up (blocks of 1 to 32 rows through every layer) "
        "and keeps the faster, while its copy takes at most 3 GiB.",
    )
    weights: Literal["auto", "float32", "float16", "int4"] = Field(
        "auto",
        description="On CPU, in what form the linear layers keep and multiply their weights (specd/kernels/weights.py, "
        "docs/weights.md). 'float32' as loaded; 'float16' half the bytes, float32 arithmetic (fbgemm); 'int4' the "
        "layers that came as Q4_1 blocks as those blocks (torch's int4 kernel, bfloat16 inputs), the rest float16; "
        "'auto': for a model loaded from a GGUF file, each layer through the kernel of float32, float16 and int4 "
        "that costs least per token over blocks of 1 to 64 rows, timed at start-up; for other models float32. "
        "Speculation is exact against the "
        "worker's own output under any of them; replicas of one oracle should share one setting.",
    )
    grouped_attention: bool = Field(
        True,
        description="On CPU, attend from a block of several tokens (a verify block, a prompt after a cached "
        "prefix) on the key/value heads themselves instead of a per-query-head copy of the KV cache; same "
        "arithmetic per row, without a copy of the whole cache per verify (which grows with the context).",
    )
    max_sessions: int = Field(64, ge=1, description="Sessions held at once; more get RESOURCE_EXHAUSTED.")
    prefix_cache_tokens: int = Field(
        2048,
        ge=0,
        description="Positions of keys and values kept after sessions close, for later prompts that begin the same "
        "way (a shared system prompt, earlier turns of a conversation) to reuse instead of prefilling them again; "
        "kept in blocks of 8 tokens, least recently used dropped first (specd/runtime/prefix_cache.py). 0 turns it off.",
    )
    session_ttl_seconds: float = Field(300.0, gt=0, description="Idle sessions are evicted after this long.")
    max_context: int = Field(0, ge=0, description="Max tokens per session (0 uses the model's own limit).")
    max_depth: int = Field(16, ge=1, le=64, description="Largest speculation depth k accepted.")
    grace_seconds: float = Field(5.0, ge=0, description="On SIGTERM, in-flight calls get this long to finish.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="gRPC max message size.")
    cache_dir: str = Field("", description="Where de-quantized GGUF weights are cached ('' = ~/.cache/specd).")

    max_batch_rows: int = Field(
        256,
        ge=1,
        description="Continuous batching: rows (tokens) one forward pass may hold across all sessions. Decode work "
        "first (verify blocks; a draft's next positions), then prompt chunks while room is left (a step with nothing "
        "else takes one chunk anyway).",
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

    def model_spec(self, *, int8: bool = False) -> ModelSpec:
        return ModelSpec(
            source=self.model, dtype=self.dtype, device=self.device, layers=self.layers,
            max_context=self.max_context, cache_dir=self.cache_dir, torch_threads=self.torch_threads,
            cpu_linear=self.cpu_linear, grouped_attention=self.grouped_attention, int8=int8, weights=self.weights,
        )
