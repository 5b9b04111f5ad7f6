"""The draft worker's logic: propose k tokens per round from a KV-cached small model.

No gRPC here. Each round the coordinator sends the tokens committed since the last round
(accepted draft tokens and the oracle's own token); the drafter rolls its cache back to them
and proposes the next block. A feature draft (specd.models.feature_draft) also receives the oracle's
final hidden states for the committed positions and drafts from them. For sampled sessions
each token is drawn from a proposal distribution q (the warped distribution restricted to the
top-N tokens, renormalised), and q is returned exactly, so the oracle's rejection sampling
stays lossless.

With a stop rule the block ends early where the draft stops trusting it: each position's
expected acceptance comes from the draft's confidence there (the highest probability of the
distribution the token is drawn from, mapped through the coordinator's calibration), and the
block keeps a token while the product of those expectations, the chance that the whole block
so far is accepted, stays above one threshold, and computes a further position only while it
stays above a second. The decision reads the distribution only, never the token drawn from it,
so rejection sampling stays lossless.

With prompt lookup (specd.core.lookup), a position whose last n tokens occurred earlier in the
session takes the token that followed them instead of the model's guess, at no model cost; the
model only runs for positions the lookup cannot fill, catching up on the looked-up tokens
before them. A sampled session sends a looked-up token as a one-token q. Under a stop rule a
looked-up token is expected to be accepted as often as matches of its length are.

Asked for a tree (tree_width > 1), a greedy session of a feature draft proposes a draft tree
(specd.core.tree) instead of a chain: the draft grows it level by level, one forward pass per level
over several tokens under a tree mask, continues any candidate whose text repeats the session's
with the tokens prompt lookup copies, and keeps the tokens the stop rule says pay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specd.core import tree, validation
from specd.core.errors import InvalidArgument
from specd.core.lookup import NgramIndex
from specd.core.sampling import SamplingParams, Stream, keyed_uniform, sample_from, warp_probs
from specd.core.stopping import StopRule
from specd.models.pretrained import LoadedModel
from specd.runtime.batch import Segment
from specd.runtime.draft_pass import DraftOutput, DraftPasses, DraftRows, DraftWork, run_alone
from specd.runtime.draft_tree import TreeBuilder
from specd.runtime.feature_session import FeatureSession
from specd.runtime.kv import KVSession
from specd.runtime.worker import ModelWorker, OpenResult, PositionFeatures, WorkerSession

# Most alternatives a tree block may offer per position.
MAX_TREE_WIDTH = 16


@dataclass(frozen=True)
class SparseDistribution:
    token_ids: list[int]
    probs: list[float]


@dataclass(frozen=True)
class DraftProposal:
    tokens: list[int]
    distributions: list[SparseDistribution]  # empty for greedy sessions
    seconds: float
    looked_up: list[int] = field(default_factory=list)  # positions proposed by prompt lookup, not the model
    lookup_lengths: list[int] = field(default_factory=list)  # per looked-up position: its match's length
    # Per token: the top probability where it was drawn (in a tree: the token's own probability); 1 if copied.
    confidences: list[float] = field(default_factory=list)
    model_steps: int = 0  # positions the model computed, kept or not (for a tree: its forward passes)
    parents: list[int] = field(default_factory=list)  # a draft tree's (specd.core.tree); empty for a chain


class Drafter(ModelWorker):
    def __init__(
        self, loaded: LoadedModel, *, proposal_top_n: int = 64, lookup_ngram: tuple[int, int] | None = None, **limits
    ):
        """lookup_ngram: (min n, max n) for prompt lookup; None drafts with the model alone."""
        super().__init__(loaded, **limits)
        self.proposal_top_n = proposal_top_n
        self.lookup_ngram = lookup_ngram
        if lookup_ngram is not None:
            NgramIndex(*lookup_ngram)  # reject bad lengths at start-up
        # Maps head rows to shared token ids when the draft's head covers part of the vocabulary.
        self._head_ids = (
            torch.tensor(loaded.head_token_ids, dtype=torch.long) if loaded.head_token_ids is not None else None
        )
        self._head_size = len(loaded.head_token_ids) if loaded.head_token_ids is not None else loaded.vocab_size
        self.passes = DraftPasses(loaded.model, feature_draft=bool(loaded.feature_dim))

    def _token_id(self, head_index: int) -> int:
        return head_index if self._head_ids is None else int(self._head_ids[head_index])

    @property
    def feature_dim(self) -> int:
        return self.loaded.feature_dim

    def forward(self, passes: list[DraftRows]) -> list[DraftOutput]:
        """One forward pass over the rows of one or more sessions (specd.runtime.draft_pass)."""
        return self.passes.forward(passes)

    def open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *,
        features: PositionFeatures | None = None,
    ) -> OpenResult:
        return run_alone(self.open_work(session_id, prompt, params, features=features), self.forward)

    def propose(
        self, session_id: str, append: list[int], committed_length: int, k: int,
        features: PositionFeatures | None = None, stop: StopRule | None = None, tree_width: int = 0,
    ) -> DraftProposal:
        return run_alone(
            self.propose_work(session_id, append, committed_length, k, features, stop, tree_width), self.forward
        )

    def open_work(
        self, session_id: str, prompt: list[int], params: SamplingParams, *,
        features: PositionFeatures | None = None, chunk: int = 0, cache_namespace: str = "",
    ) -> DraftWork[OpenResult]:
        """Open a session: standalone drafts prefill the prompt (from the prefix cache where it holds it), feature
        drafts take the prompt's features; in passes of up to `chunk` prompt positions (0: one pass)."""
        if self.feature_dim:
            result = yield from self._open_features(session_id, prompt, params, features, chunk)
        else:
            result = yield from self._open_tokens(session_id, prompt, params, chunk, cache_namespace)
        if self.lookup_ngram is not None:
            index = NgramIndex(*self.lookup_ngram)
            index.extend(prompt)
            self.sessions.get(session_id).lookup = index
        return result

    def _open_tokens(
        self, session_id: str, prompt: list[int], params: SamplingParams, chunk: int, cache_namespace: str
    ) -> DraftWork[OpenResult]:
        prefill = self.begin_open(session_id, prompt, params, cache_namespace=cache_namespace)
        try:
            while not prefill.finished:
                tokens, positions = prefill.next_chunk(chunk or len(prefill.prefix))
                segment = Segment(prefill.kv.cache, tokens, positions)
                yield DraftRows(segment, logits="none")
                self.prefilled(prefill, segment, None)
        except BaseException:
            self.abandon_open(prefill)
            raise
        return self.finish_open(prefill)

    def _open_features(
        self, session_id: str, prompt: list[int], params: SamplingParams, features: PositionFeatures | None,
        chunk: int,
    ) -> DraftWork[OpenResult]:
        self.validate_open(session_id, prompt)
        started = time.perf_counter()
        state = FeatureSession(self.loaded.model, self.loaded.device, self.passes)
        if features is not None:
            state.receive(features.start, features.rows)
        self._check_features(state, len(prompt))
        self._opening.add(session_id)
        try:
            yield from state.catch_up_work(prompt, chunk)
        finally:
            self._opening.discard(session_id)
        self.sessions.add(session_id, WorkerSession(kv=state, params=params, committed=list(prompt)))
        return OpenResult(prefill_tokens=len(prompt), prefill_seconds=time.perf_counter() - started)

    def propose_work(
        self, session_id: str, append: list[int], committed_length: int, k: int,
        features: PositionFeatures | None = None, stop: StopRule | None = None, tree_width: int = 0,
    ) -> DraftWork[DraftProposal]:
        """k tokens, or fewer when `stop` ends the block early. tree_width > 1: the block may be a
        tree (specd.core.tree) of at most k tokens with up to tree_width alternatives per position."""
        session = self.sessions.get(session_id)
        if any(not 0 <= t < self.vocab_size for t in append):
            raise InvalidArgument(f"appended token ids must be in [0, {self.vocab_size})")
        if k < 1:
            raise InvalidArgument(f"a proposal needs depth k >= 1, got {k}")
        if not 0 <= tree_width <= MAX_TREE_WIDTH:
            raise InvalidArgument(f"tree_width must be in 0..{MAX_TREE_WIDTH}, got {tree_width}")
        validation.depth(k, self.max_depth)
        expected = len(session.committed) + len(append)
        self.check_length(expected, committed_length)
        self.check_room(expected, k)
        state = session.kv
        if isinstance(state, FeatureSession):
            if features is not None:
                state.receive(features.start, features.rows)
            self._check_features(state, expected)
        session.committed.extend(append)
        if session.lookup is not None:
            session.lookup.extend(append)
        started = time.perf_counter()
        if tree_width > 1 and isinstance(state, FeatureSession) and session.params.greedy:
            yield from state.catch_up_work(session.committed)
            if state.last is not None:
                return (yield from self._propose_tree(state, session, k, stop, tree_width, started))
        model = _FeatureSteps(self, state, session.committed) if isinstance(state, FeatureSession) else (
            _TokenSteps(session)
        )
        tokens: list[int] = []
        distributions: list[SparseDistribution] = []
        confidences: list[float] = []
        survival = 1.0  # the chance, as the stop rule estimates it, that the whole block is accepted
        position = len(session.committed)
        logits: torch.Tensor | None = None
        unfed = 0  # drafted tokens the model has not read yet
        looked_up: list[int] = []
        lookup_lengths: list[int] = []
        model_steps = 0
        for i in range(k):
            found = None
            if session.lookup is not None:
                found = session.lookup.match(session.committed[-session.lookup.max_n :] + tokens)
            if found is not None:
                guess, length = found
                if stop is not None:
                    survival *= stop.lookup_expected(length)
                    if survival < stop.min_survival:
                        break
                token, confidence = guess, 1.0
                looked_up.append(i)
                lookup_lengths.append(length)
                if not session.params.greedy:
                    distributions.append(SparseDistribution([token], [1.0]))
            else:
                if logits is None:
                    logits = yield from model.first()
                for fed in tokens[len(tokens) - unfed :]:
                    logits = yield from model.feed(fed)
                unfed = 0
                model_steps += 1
                token, distribution, confidence = self._choose(logits[: self._head_size], session.params, position + i)
                if stop is not None:
                    survival *= stop.expected_acceptance(confidence)
                    if survival < stop.min_survival:  # decided on the distribution, not on the token drawn
                        break
                if distribution is not None:
                    distributions.append(distribution)
            tokens.append(token)
            confidences.append(confidence)
            unfed += 1
            if stop is not None and survival < stop.extend_threshold:  # the next position would not pay its step
                break
        return DraftProposal(
            tokens=tokens, distributions=distributions, seconds=time.perf_counter() - started, looked_up=looked_up,
            lookup_lengths=lookup_lengths, confidences=confidences, model_steps=model_steps,
        )

    def _propose_tree(
        self, state: FeatureSession, session: WorkerSession, k: int, stop: StopRule | None, width: int,
        started: float,
    ) -> DraftWork[DraftProposal]:
        """The best tree of at most k tokens (specd.runtime.draft_tree)."""
        grown = yield from TreeBuilder(
            state, session.committed, session.lookup, k, stop, width, self._head_size, self._token_id
        ).build()
        return DraftProposal(
            tokens=grown.tokens, distributions=[], seconds=time.perf_counter() - started,
            looked_up=grown.looked_up, lookup_lengths=grown.lookup_lengths, confidences=grown.confidences,
            model_steps=grown.model_steps, parents=[] if tree.is_chain(grown.parents) else grown.parents,
        )

    def _choose(
        self, logits: torch.Tensor, params: SamplingParams, position: int
    ) -> tuple[int, SparseDistribution | None, float]:
        """The model's token at a position (its argmax, or a draw from q), q for sampled sessions
        (None for greedy ones), and the confidence there: the highest probability of the distribution
        the token comes from (the softmax for greedy sessions, q for sampled ones)."""
        if params.greedy:
            logits = logits.float()
            top, index = logits.max(0)
            return self._token_id(int(index)), None, float(1.0 / torch.exp(logits - top).sum())
        probs = warp_probs(logits[None], params)[0]
        top = torch.topk(probs, min(self.proposal_top_n, self._head_size))
        values, indices = top.values.cpu(), top.indices.cpu()  # off the model's device: N values at most
        q = values / values.sum()
        keep = q > 0
        ids = indices[keep] if self._head_ids is None else self._head_ids[indices[keep]]
        q = q[keep]
        token = int(ids[sample_from(q, keyed_uniform(params.seed, position, Stream.DRAFT))])
        return token, SparseDistribution(ids.tolist(), q.tolist()), float(q[0])

    @staticmethod
    def _check_features(state: FeatureSession, committed_length: int) -> None:
        """Every committed position but the last must have its feature (the oracle returns them all)."""
        if state.received != committed_length - 1:
            raise InvalidArgument(
                f"a feature draft needs the oracle's features for positions 0..{committed_length - 2}, "
                f"it holds {state.received}; open the oracle session with return_features and pass them on"
            )


class _TokenSteps:
    """A standalone draft's logits along a block: first after feeding what its cache lacks, then after each token."""

    def __init__(self, session: WorkerSession):
        assert isinstance(session.kv, KVSession)
        self.session, self.kv = session, session.kv

    def first(self) -> DraftWork[torch.Tensor]:
        return (yield from self._feed(self.kv.sync(self.session.committed)))

    def feed(self, token: int) -> DraftWork[torch.Tensor]:
        return (yield from self._feed([token]))

    def _feed(self, tokens: list[int]) -> DraftWork[torch.Tensor]:
        start = self.kv.cached_length
        out = yield DraftRows(Segment(self.kv.cache, tokens, list(range(start, start + len(tokens)))))
        self.kv.record_fed(tokens)
        assert out.logits is not None
        return out.logits[-1]


class _FeatureSteps:
    """A feature draft's logits along a block: first from the last real position, then each from its own feature."""

    def __init__(self, drafter: Drafter, state: FeatureSession, committed: list[int]):
        self.drafter, self.state, self.committed = drafter, state, committed
        self.g: torch.Tensor | None = None

    def first(self) -> DraftWork[torch.Tensor]:
        state = self.state
        yield from state.catch_up_work(self.committed)
        if state.last is None:  # a one-token prompt: no feature exists yet, so start from a zero feature
            zero = torch.zeros(1, self.drafter.feature_dim, device=self.drafter.loaded.device)
            state.last = yield from state.step_work(zero, self.committed[-1])
        self.g, logits = state.last
        return logits

    def feed(self, token: int) -> DraftWork[torch.Tensor]:
        assert self.g is not None
        self.g, logits = yield from self.state.step_work(self.g, token)
        return logits
