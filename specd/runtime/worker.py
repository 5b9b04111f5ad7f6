"""What the draft and oracle workers share: sessions over a model with a KV cache.

Plain Python, no gRPC. All methods run on the worker's single model thread, so the session
table needs no lock. The servicers translate protobuf to these calls and back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specd.core.errors import FailedPrecondition, OutOfRange
from specd.runtime.feature_session import FeatureSession
from specd.runtime.kv import KVSession
from specd.core.lookup import NgramIndex
from specd.models.pretrained import LoadedModel
from specd.runtime.prefix_cache import PrefixCache
from specd.core.sampling import SamplingParams
from specd.runtime.sessions import SessionTable
from specd.core import validation


@dataclass
class WorkerSession:
    kv: KVSession | FeatureSession  # FeatureSession: drafts that read the oracle's features
    params: SamplingParams
    committed: list[int]  # prompt + generated tokens, as agreed with the oracle
    return_features: bool = False  # oracle sessions serving a feature draft
    lookup: NgramIndex | None = None  # draft sessions with prompt lookup: the committed tokens' n-grams


@dataclass(frozen=True)
class PositionFeatures:
    """The oracle's final hidden states at positions start..start+len(rows)-1."""

    start: int
    rows: torch.Tensor  # [n, H]


@dataclass(frozen=True)
class OpenResult:
    prefill_tokens: int
    prefill_seconds: float
    features: PositionFeatures | None = None  # with return_features: prompt positions 0..n-2
    cached_tokens: int = 0  # prompt positions whose keys and values came from the prefix cache


class ModelWorker:
    def __init__(
        self, loaded: LoadedModel, *, max_sessions: int, session_ttl_seconds: float, max_depth: int,
        prefix_cache_tokens: int = 0,
    ):
        self.loaded = loaded
        self.max_depth = max_depth
        self.sessions: SessionTable[WorkerSession] = SessionTable(max_sessions, session_ttl_seconds)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    @property
    def max_context(self) -> int:
        return self.loaded.max_context

    def validate_open(self, session_id: str, prompt: list[int]) -> None:
        """Cheap checks that must fail before any model work is queued."""
        validation.prompt_ids(prompt, self.vocab_size, self.max_context)
        self.sessions.reserve(session_id)

    def open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *, return_features: bool = False
    ) -> OpenResult:
        """Prefill the prompt (all but its last token, which the next forward pass feeds), after the
        longest prefix of it the prefix cache holds."""
        self.validate_open(session_id, prompt)
        started = time.perf_counter()
        kv = KVSession(self.loaded.model, self.loaded.device)
        prefix = prompt[:-1]
        hit = self.prefix_cache.lookup(prefix, features=return_features)
        cached = 0
        parts: list[torch.Tensor] = []
        if hit is not None:
            cached = hit.length
            kv.load_prefix(prefix[:cached], [(k[..., :cached, :], v[..., :cached, :]) for k, v in hit.entry.layers])
            if return_features:
                assert hit.entry.features is not None
                parts.append(hit.entry.features[:cached])
        if len(prefix) > cached:
            rows = kv.prefill(prefix[cached:], features=return_features)
            if rows is not None:
                parts.append(rows)
        features = None
        if return_features:
            rows = torch.cat(parts) if parts else torch.zeros(0, self.loaded.model.config.hidden_size)
            features = PositionFeatures(0, rows)
        if len(prefix) > cached:
            self.prefix_cache.store(prefix, kv.layer_states(), None if features is None else features.rows)
        session = WorkerSession(
            kv=kv, params=params, committed=list(prompt), return_features=return_features
        )
        self.sessions.add(session_id, session)
        return OpenResult(
            prefill_tokens=len(prompt), prefill_seconds=time.perf_counter() - started, features=features,
            cached_tokens=cached,
        )

    def close(self, session_id: str) -> bool:
        return self.sessions.pop(session_id) is not None

    def evict_idle(self) -> list[str]:
        return self.sessions.expired()

    def check_room(self, committed_length: int, k: int) -> None:
        """A round of depth k must fit the context: committed + k tokens, plus the oracle's own."""
        validation.depth(k, self.max_depth)
        if committed_length + k + 1 > self.max_context:
            raise OutOfRange(
                f"a round of depth {k} would take the session past the context of {self.max_context} "
                f"tokens (it holds {committed_length})"
            )

    @staticmethod
    def check_length(held: int, committed_length: int) -> None:
        """A caller that names its committed length (0: unchecked) must agree with the `held` tokens."""
        if committed_length and committed_length != held:
            raise FailedPrecondition(
                f"session out of sync: caller expects {committed_length} committed tokens, worker holds {held}"
            )
