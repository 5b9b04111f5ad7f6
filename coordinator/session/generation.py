"""From a client request to a completion: tokenize, run the speculative session, detokenize.

Plain Python, no gRPC server code: the Generation servicer and the local CLI both call
`stream_generation`. The tokenizer comes from the oracle over gRPC (GetTokenizer), so this
layer needs no model files.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from coordinator.depth import DepthPolicy
from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.loop import (
    DEFAULT_MIGRATION_LIMIT,
    Finish,
    Moving,
    Reassign,
    RoundHook,
    SessionRequest,
    SpeculativeSession,
)
from coordinator.session.stats import SpeculationStats
from specd.core import validation
from specd.core.errors import InvalidArgument, OutOfRange
from specd.v1 import common_pb2, oracle_pb2


class TextCodec:
    """The pair's tokenizer, rebuilt from the oracle's TokenizerSpec."""

    def __init__(self, spec: oracle_pb2.TokenizerSpec):
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(spec.tokenizer_json),
            bos_token=spec.bos_token or None,
            eos_token=spec.eos_token or None,
            pad_token=spec.pad_token or None,
        )
        self.chat_template = spec.chat_template or None
        self.vocab_fingerprint = spec.vocab_fingerprint

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.chat_template:
            raise InvalidArgument("this oracle's model has no chat template; send the prompt as text")
        for message in messages:
            if not message.get("role") or "content" not in message:
                raise InvalidArgument("every chat message needs a role and content")
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=True
            )
        except Exception as error:  # the template's own checks (jinja's raise_exception) and its errors
            raise InvalidArgument(f"the chat template refused these messages: {error}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


MAX_MIGRATION_LIMIT = 16
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_CHAT_MESSAGES = 1024


@dataclass
class Pair:
    """A compatible draft/oracle pair and what a session needs to know about it."""

    oracle: OracleClient
    draft: DraftClient | None
    codec: TextCodec
    eos_token_ids: frozenset[int]
    max_context: int
    max_depth: int
    name: str = ""

    @classmethod
    def build(
        cls, oracle: OracleClient, draft: DraftClient | None, codec: TextCodec, oracle_info: common_pb2.ModelInfo,
        max_depth: int, name: str,
    ) -> Pair:
        return cls(
            oracle=oracle,
            draft=draft,
            codec=codec,
            eos_token_ids=frozenset(oracle_info.eos_token_ids),
            max_context=oracle_info.max_context,
            max_depth=max_depth,
            name=name,
        )


@dataclass
class GenerationRequest:
    text: str | None = None
    chat: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    sampling: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    deadline: float | None = None  # time.monotonic() value
    request_id: str = ""
    migration_limit: int = DEFAULT_MIGRATION_LIMIT  # moves to another oracle when the oracle fails
    tenant: str = "default"  # who asked (the name of the client credential)
    cache_salt: str = ""  # partitions the prefix cache within the tenant


@dataclass
class Delta:
    """New output since the previous delta; the last one carries the finish reason and stats."""

    text: str
    token_ids: list[int]
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: SpeculationStats | None = None


def validate_request(request: GenerationRequest, max_tokens_limit: int) -> None:
    if request.max_tokens <= 0:
        raise InvalidArgument(f"max_tokens must be at least 1, got {request.max_tokens}")
    if request.max_tokens > max_tokens_limit:
        raise OutOfRange(f"max_tokens {request.max_tokens} is over this server's limit of {max_tokens_limit}")
    s = request.sampling
    validation.sampling_params(s.temperature, s.top_k, s.top_p, s.seed if s.HasField("seed") else 0)
    if sum(x is not None for x in (request.text, request.chat, request.token_ids)) != 1:
        raise InvalidArgument("send the prompt as exactly one of text, chat messages or token ids")
    if any(not stop for stop in request.stop):
        raise InvalidArgument("stop strings must not be empty")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise OutOfRange(f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    if any(len(stop) > MAX_STOP_CHARS for stop in request.stop):
        raise OutOfRange(f"stop strings may be at most {MAX_STOP_CHARS} characters long")
    if request.chat is not None and len(request.chat) > MAX_CHAT_MESSAGES:
        raise OutOfRange(f"at most {MAX_CHAT_MESSAGES} chat messages, got {len(request.chat)}")
    if not 0 <= request.migration_limit <= MAX_MIGRATION_LIMIT:
        raise InvalidArgument(f"migration_limit must be in 0..{MAX_MIGRATION_LIMIT}, got {request.migration_limit}")


def cache_namespace(tenant: str, salt: str) -> str:
    """The workers' prefix-cache partition for a tenant and salt: a prompt can only reuse what its own tenant
    (with the same salt) stored, so the cache reveals nothing of other tenants' prompts."""
    return hashlib.blake2b(f"{tenant}\0{salt}".encode(), digest_size=16).hexdigest()


def seeded(sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
    """A sampled request without a seed gets one here, so that both workers, and any oracle the session moves
    to, draw from the same keyed stream."""
    if sampling.temperature == 0 or sampling.HasField("seed"):
        return sampling
    chosen = common_pb2.SamplingParams()
    chosen.CopyFrom(sampling)
    chosen.seed = random.getrandbits(63)
    return chosen


def prompt_ids(request: GenerationRequest, pair: Pair) -> list[int]:
    if request.text is not None:
        if not request.text:
            raise InvalidArgument("the prompt is empty")
        ids = pair.codec.encode(request.text)
    elif request.chat is not None:
        if not request.chat:
            raise InvalidArgument("the chat has no messages")
        ids = pair.codec.encode_chat(request.chat)
    else:
        ids = list(request.token_ids or [])
    validation.prompt_ids(ids, len(pair.codec.tokenizer), pair.max_context)
    return ids


class TextTracker:
    """Incremental detokenization with stop strings.

    Text is released only once it can no longer turn out to be the start of a stop string or an
    unfinished multi-byte character, and token ids only together with the text they spell. On a
    stop string the text ends just before it; the ids end with the token that completes the
    text (which may also hold the first characters of the stop string).
    """

    def __init__(self, codec: TextCodec, stop: list[str]):
        self.codec = codec
        self.stop = stop
        self.hold = max([len(s) - 1 for s in stop] + [0])
        self.ids: list[int] = []
        self.emitted_text = ""
        self.emitted_ids = 0
        self.stopped = False

    def add(self, tokens: list[int]) -> tuple[str, list[int]]:
        self.ids.extend(tokens)
        text = self.codec.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i != -1]
        if cuts:
            self.stopped = True
            text = text[: min(cuts)]
            keep = len(self.ids)
            while keep > self.emitted_ids and self.codec.decode(self.ids[: keep - 1]).startswith(text):
                keep -= 1
            del self.ids[keep:]
            return self._release(text, len(text), every_id=True)
        safe = len(text) - self.hold - (1 if text.endswith("\ufffd") else 0)
        return self._release(text, max(len(self.emitted_text), safe))

    def flush(self) -> tuple[str, list[int]]:
        """Everything not yet released (the generation has ended)."""
        if self.stopped:
            return "", []
        text = self.codec.decode(self.ids)
        return self._release(text, len(text), every_id=True)

    def _release(self, text: str, upto: int, every_id: bool = False) -> tuple[str, list[int]]:
        delta = text[len(self.emitted_text) : upto]
        self.emitted_text = text[:upto]
        count = len(self.ids)
        if not every_id:
            while count > self.emitted_ids and not self.emitted_text.startswith(self.codec.decode(self.ids[:count])):
                count -= 1
        new_ids = self.ids[self.emitted_ids : count]
        self.emitted_ids = count
        return delta, new_ids


async def stream_generation(
    request: GenerationRequest,
    pair: Pair,
    policy: DepthPolicy,
    session_id: str | None = None,
    on_round: RoundHook | None = None,
    lookup_ngram: tuple[int, int] | None = None,
    reassign: Reassign | None = None,
    moving: Moving | None = None,
) -> AsyncIterator[Delta]:
    """Run one request on a pair; yields deltas as rounds complete. Sessions are always closed.
    lookup_ngram: (min n, max n) of the session loop's prompt lookup; None turns it off. reassign: where the
    session goes when its oracle fails (None: nowhere)."""
    prompt = prompt_ids(request, pair)
    session_request = SessionRequest(
        prompt=prompt,
        sampling=seeded(request.sampling),
        migration_limit=request.migration_limit,
        cache_namespace=cache_namespace(request.tenant, request.cache_salt),
        max_tokens=request.max_tokens,
        eos_token_ids=pair.eos_token_ids if request.stop_at_eos else frozenset(),
        max_context=pair.max_context,
        max_depth=pair.max_depth,
        deadline=request.deadline,
        lookup_ngram=lookup_ngram,
    )
    if session_id:
        session_request.session_id = session_id
    session = SpeculativeSession(session_request, pair.draft, pair.oracle, policy, on_round, reassign, moving)
    tracker = TextTracker(pair.codec, request.stop)
    started = time.perf_counter()
    try:
        await session.open()
        async for tokens in session.rounds():
            text, ids = tracker.add(tokens)
            if text or ids:
                yield Delta(text=text, token_ids=ids)
            if tracker.stopped:
                session.finish = Finish.STOP
                break
        text, ids = tracker.flush()
        session.stats.total_seconds = time.perf_counter() - started
        yield Delta(
            text=text,
            token_ids=ids,
            finish=session.finish or Finish.LENGTH,
            prompt_tokens=len(prompt),
            completion_tokens=len(tracker.ids),
            stats=session.stats,
        )
    finally:
        await session.close()
