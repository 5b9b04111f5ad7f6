"""The draft worker's logic: propose k tokens per round from a KV-cached small model.

No gRPC here. Each round the coordinator sends the tokens committed since the last round
(accepted draft tokens and the oracle's own token); the drafter rolls its cache back to them
and proposes the next block. For sampled sessions each token is drawn from a proposal
distribution q (the warped distribution restricted to the top-N tokens, renormalised), and q
is returned exactly, so the oracle's rejection sampling stays lossless.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specd import validation
from specd.errors import InvalidArgument
from specd.models import LoadedModel
from specd.sampling import Stream, keyed_uniform, sample_from, warp_probs
from specd.worker import ModelWorker


@dataclass(frozen=True)
class SparseDistribution:
    token_ids: list[int]
    probs: list[float]


@dataclass(frozen=True)
class DraftProposal:
    tokens: list[int]
    distributions: list[SparseDistribution]  # empty for greedy sessions
    seconds: float


class Drafter(ModelWorker):
    def __init__(self, loaded: LoadedModel, *, proposal_top_n: int = 64, **limits):
        super().__init__(loaded, **limits)
        self.proposal_top_n = proposal_top_n
        # Maps head rows to shared token ids when the draft's head covers part of the vocabulary.
        self._head_ids = (
            torch.tensor(loaded.head_token_ids, dtype=torch.long) if loaded.head_token_ids is not None else None
        )
        self._head_size = len(loaded.head_token_ids) if loaded.head_token_ids is not None else loaded.vocab_size

    def _token_id(self, head_index: int) -> int:
        return head_index if self._head_ids is None else int(self._head_ids[head_index])

    def propose(self, session_id: str, append: list[int], committed_length: int, k: int) -> DraftProposal:
        session = self.sessions.get(session_id)
        if any(not 0 <= t < self.vocab_size for t in append):
            raise InvalidArgument(f"appended token ids must be in [0, {self.vocab_size})")
        if k < 1:
            raise InvalidArgument(f"a proposal needs depth k >= 1, got {k}")
        validation.depth(k, self.max_depth)
        expected = len(session.committed) + len(append)
        if committed_length and committed_length != expected:
            raise InvalidArgument(
                f"session out of sync: appending gives {expected} committed tokens, caller says {committed_length}"
            )
        self.check_room(expected, k)
        session.committed.extend(append)
        started = time.perf_counter()
        feed = session.kv.sync(session.committed)
        tokens: list[int] = []
        distributions: list[SparseDistribution] = []
        position = len(session.committed)
        for i in range(k):
            logits = session.kv.forward(feed)[-1, : self._head_size]  # [head vocab]
            if session.params.greedy:
                token = self._token_id(int(logits.argmax()))
            else:
                probs = warp_probs(logits[None], session.params)[0]
                top = torch.topk(probs, min(self.proposal_top_n, self._head_size))
                q = top.values / top.values.sum()
                keep = q > 0
                ids = top.indices[keep] if self._head_ids is None else self._head_ids[top.indices[keep]]
                q = q[keep]
                token = int(ids[sample_from(q, keyed_uniform(session.params.seed, position + i, Stream.DRAFT))])
                distributions.append(SparseDistribution(ids.tolist(), q.tolist()))
            tokens.append(token)
            feed = [token]
        return DraftProposal(tokens=tokens, distributions=distributions, seconds=time.perf_counter() - started)
