"""The benchmark's results as typed data; results.json is `asdict` of `BenchResults`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specd.bench.llama_cpp import LlamaCppResult
from specd.bench.measure import Cell, RequestRecord, StreamSummary

ORACLE_ALONE = "specd-k0"
ADAPTIVE = "specd-adaptive"
ADAPTIVE_MODEL_ONLY = "specd-adaptive-no-lookup"  # the same, prompt lookup off in coordinator and draft
ADAPTIVE_FIXED_BLOCKS = "specd-adaptive-no-stop-rule"  # the same, blocks of the modelled best k (no stop rule)
ADAPTIVE_CHAINS = "specd-adaptive-chains"  # the same, draft trees off (goodput:tree_width=0)
HF_PLAIN = "transformers-generate"
HF_ASSISTED = "transformers-assisted"
# The concurrency section's rows.
CONCURRENT_ADAPTIVE = "adaptive"
CONCURRENT_ORACLE_ALONE = "oracle alone"
UNBATCHED = ", no batching"  # suffix of a policy run on workers with continuous batching off
STATIC_BATCH = "transformers static batch"


def fixed_key(k: int) -> str:
    return f"specd-k{k}"


@dataclass
class ConfigResult:
    """One way of generating, measured over the prompt set."""

    key: str  # specd-k0 (the oracle alone through specd), specd-k1..k8, specd-adaptive, transformers-*
    label: str
    engine: str  # "specd" or "transformers"
    depth: int | None  # fixed k; None lets the coordinator's policy choose
    by_category: dict[str, Cell]
    overall: Cell
    requests: list[RequestRecord] = field(default_factory=list)


@dataclass
class BestFixed:
    category: str
    k: int
    tokens_per_second: float
    adaptive_tokens_per_second: float
    adaptive_over_best: float


@dataclass
class SpeedResult:
    """Single client, every configuration, one temperature."""

    temperature: float
    prompts_per_category: int
    seed: int | None  # base seed of sampled requests (prompt i uses seed + i)
    warmup: str
    configs: list[ConfigResult]
    best_fixed: list[BestFixed]
    passes: int = 1  # passes over the prompts; per (configuration, prompt) the fastest counts

    def config(self, key: str) -> ConfigResult | None:
        return next((c for c in self.configs if c.key == key), None)


@dataclass
class RttPoint:
    delay_ms: float
    oracle_alone: ConfigResult
    adaptive: ConfigResult
    ratio_by_category: dict[str, float]
    ratio_overall: float


@dataclass
class RttResult:
    """An injected round trip on every coordinator -> oracle call: adaptive vs the oracle alone."""

    prompts_per_category: int
    warmup: str
    points: list[RttPoint]


@dataclass
class ConcurrencyPoint:
    policy: str  # "adaptive" or "oracle alone"
    clients: int
    summary: StreamSummary


@dataclass
class ConcurrencyResult:
    warmup: str
    points: list[ConcurrencyPoint]

    def point(self, policy: str, clients: int) -> ConcurrencyPoint | None:
        return next((p for p in self.points if p.policy == policy and p.clients == clients), None)


@dataclass
class GoalCheck:
    goal: str
    measured: str
    value: float | None
    passed: bool | None  # None: not measured in this run


@dataclass
class BenchResults:
    machine: dict[str, Any]
    setup: dict[str, Any]
    speed: SpeedResult | None = None  # temperature 0
    sampled: SpeedResult | None = None  # temperature > 0, seeded
    rtt: RttResult | None = None
    concurrency: ConcurrencyResult | None = None
    llama_cpp: LlamaCppResult | None = None  # llama.cpp on the oracle's GGUF file, one stream (--llama-cpp)
    # each worker process's resident memory at the end, idle (its engine hands freed memory back), and at its peak
    memory_mb: dict[str, tuple[float, float]] = field(default_factory=dict)
    goals: list[GoalCheck] = field(default_factory=list)
    duration_seconds: float = 0.0
    section_seconds: dict[str, float] = field(default_factory=dict)  # start (workers, Ray) and each section


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: BenchResults, path: Path) -> None:
    path.write_text(json.dumps(_clean(asdict(results)), indent=1) + "\n")
