"""What the draft and oracle workers share: sessions over a model with a KV cache.

Plain Python, no gRPC. All methods run on the worker's single model thread, so the session
table needs no lock. The servicers translate protobuf to these calls and back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specd.core import validation
from specd.core.errors import AlreadyExists, FailedPrecondition, OutOfRange
from specd.core.lookup import NgramIndex
from specd.core.sampling import SamplingParams
from specd.models.pretrained import LoadedModel
from specd.runtime.batch import Segment
from specd.runtime.feature_session import FeatureSession
from specd.runtime.kv import KVSession
from specd.runtime.prefix_cache import PrefixCache
from specd.runtime.sessions import SessionTable


@dataclass
class WorkerSession:
    kv: KVSession | FeatureSession  # FeatureSession: drafts that read the oracle's features
    params: SamplingParams
    committed: list[int]  # prompt + generated tokens, as agreed with the oracle
    return_features: bool = False  # oracle sessions serving a feature draft
    feature_layers: tuple[int, ...] = ()  # with return_features: the hidden states returned; (): the final ones
    lookup: NgramIndex | None = None  # draft sessions with prompt lookup: the committed tokens' n-grams


@dataclass(frozen=True)
class PositionFeatures:
    """The oracle's features at positions start..start+len(rows)-1: its final hidden states, or the hidden states
    the session asked for side by side."""

    start: int
    rows: torch.Tensor  # [n, H], or [n, H * len(feature_layers)]


@dataclass(frozen=True)
class OpenResult:
    prefill_tokens: int
    prefill_seconds: float
    features: PositionFeatures | None = None  # with return_features: prompt positions 0..n-2
    cached_tokens: int = 0  # prompt positions whose keys and values came from the prefix cache


@dataclass
class Prefill:
    """A session being opened: its prompt's positions go into its cache, in one pass or chunk by chunk."""

    session_id: str
    prompt: list[int]
    params: SamplingParams
    return_features: bool
    kv: KVSession
    cache_namespace: str = ""  # the prefix cache's partition it reads and stores in
    feature_layers: tuple[int, ...] = ()  # with return_features: the hidden states it returns; (): the final ones
    cached: int = 0  # prompt positions taken from the prefix cache
    done: int = 0  # prompt positions in the cache so far
    parts: list[torch.Tensor] = field(default_factory=list)  # features of those positions, in order
    started: float = field(default_factory=time.perf_counter)

    @property
    def prefix(self) -> list[int]:
        """The positions a prefill fills: every prompt token but the last."""
        return self.prompt[:-1]

    def next_chunk(self, chunk_tokens: int) -> tuple[list[int], list[int]]:
        """(tokens, positions) up to the next multiple of chunk_tokens: chunk boundaries depend on the prompt
        alone, never on what else a pass holds, so a session's keys and values do not depend on the load."""
        end = min(len(self.prefix), (self.done // chunk_tokens + 1) * chunk_tokens)
        return self.prefix[self.done : end], list(range(self.done, end))

    @property
    def finished(self) -> bool:
        return self.done >= len(self.prefix)


class ModelWorker:
    def __init__(
        self, loaded: LoadedModel, *, max_sessions: int, session_ttl_seconds: float, max_depth: int,
        prefix_cache_tokens: int = 0,
    ):
        self.loaded = loaded
        self.max_depth = max_depth
        self.sessions: SessionTable[WorkerSession] = SessionTable(max_sessions, session_ttl_seconds)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self._opening: set[str] = set()  # sessions whose prompt is being prefilled

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    @property
    def max_context(self) -> int:
        return self.loaded.max_context

    @property
    def num_layers(self) -> int:
        """The model's decoder layers N: its hidden states are 0..N (specd.runtime.batch.Segment)."""
        return int(getattr(self.loaded.model.config, "num_hidden_layers", 0) or 0)

    def validate_open(
        self, session_id: str, prompt: list[int], return_features: bool = False, feature_layers: tuple[int, ...] = ()
    ) -> tuple[int, ...]:
        """Cheap checks that must fail before any model work is queued; returns the hidden states the session
        returns (specd.core.validation.feature_layers)."""
        validation.prompt_ids(prompt, self.vocab_size, self.max_context)
        layers = validation.feature_layers(feature_layers, self.num_layers, return_features)
        if session_id in self._opening:
            raise AlreadyExists(f"session {session_id!r} is already opening")
        self.sessions.reserve(session_id, pending=len(self._opening))
        return layers

    def begin_open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *, return_features: bool = False,
        cache_namespace: str = "", feature_layers: tuple[int, ...] = (),
    ) -> Prefill:
        """Start opening a session: its cache begins with the longest prefix of the prompt the prefix cache
        holds; the rest of the prompt (all but its last token, which the next forward pass feeds) is still to
        prefill. With return_features, the session returns the hidden states `feature_layers` (empty: the
        final ones)."""
        layers = self.validate_open(session_id, prompt, return_features, feature_layers)
        prefill = Prefill(
            session_id, list(prompt), params, return_features, KVSession(self.loaded.model, self.loaded.device),
            cache_namespace, layers,
        )
        hit = self.prefix_cache.lookup(
            prefill.prefix, features=return_features, namespace=cache_namespace, feature_layers=layers
        )
        if hit is not None:
            cached = hit.length
            prefill.kv.load_prefix(
                prefill.prefix[:cached], [(k[..., :cached, :], v[..., :cached, :]) for k, v in hit.entry.layers]
            )
            if return_features:
                assert hit.entry.features is not None
                prefill.parts.append(hit.entry.features[:cached])
            prefill.cached = prefill.done = cached
        self._opening.add(session_id)
        return prefill

    def finish_open(self, prefill: Prefill) -> OpenResult:
        """The session is open once its whole prompt is in its cache."""
        self._opening.discard(prefill.session_id)
        features = None
        if prefill.return_features:
            width = self.loaded.model.config.hidden_size * max(1, len(prefill.feature_layers))
            rows = torch.cat(prefill.parts) if prefill.parts else torch.zeros(0, width)
            features = PositionFeatures(0, rows)
        if prefill.done > prefill.cached:
            self.prefix_cache.store(
                prefill.prefix, prefill.kv.layer_states(), None if features is None else features.rows,
                namespace=prefill.cache_namespace, feature_layers=prefill.feature_layers,
            )
        session = WorkerSession(
            kv=prefill.kv, params=prefill.params, committed=list(prefill.prompt), return_features=prefill.return_features,
            feature_layers=prefill.feature_layers,
        )
        self.sessions.add(prefill.session_id, session)
        return OpenResult(
            prefill_tokens=len(prefill.prompt), prefill_seconds=time.perf_counter() - prefill.started,
            features=features, cached_tokens=prefill.cached,
        )

    def prefilled(self, prefill: Prefill, segment: Segment, hidden: torch.Tensor | None) -> None:
        """A chunk of the prompt went through a pass (specd.runtime.engine): its rows are in the cache."""
        prefill.kv.record_fed(segment.tokens)
        if prefill.return_features:
            rows = segment.features if prefill.feature_layers else hidden
            assert rows is not None
            prefill.parts.append(rows)
        prefill.done += len(segment)

    def abandon_open(self, prefill: Prefill) -> None:
        self._opening.discard(prefill.session_id)

    def open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *, return_features: bool = False,
        cache_namespace: str = "", feature_layers: tuple[int, ...] = (),
    ) -> OpenResult:
        """Open a session and prefill its prompt in one pass."""
        prefill = self.begin_open(
            session_id, prompt, params, return_features=return_features, cache_namespace=cache_namespace,
            feature_layers=feature_layers,
        )
        try:
            rest = prefill.prefix[prefill.done :]
            if rest:
                rows = prefill.kv.prefill(rest, features=prefill.return_features, feature_layers=prefill.feature_layers)
                if rows is not None:
                    prefill.parts.append(rows)
                prefill.done += len(rest)
        except BaseException:
            self.abandon_open(prefill)
            raise
        return self.finish_open(prefill)

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
