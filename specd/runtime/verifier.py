"""The oracle worker's logic: verify a draft block in one forward pass.

No gRPC here. The oracle feeds its pending token and the k draft tokens at once, gets the
distributions p_1..p_{k+1}, calls specd.core.verification (the only place tokens are accepted or
rejected), commits the accepted prefix plus its own token, and rolls its KV cache back to
the committed sequence. A greedy block may be a draft tree (specd.core.tree): its tokens are fed in
the same one pass under a tree mask, and the cache keeps the accepted path's rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specd.core import tree
from specd.core.errors import InvalidArgument
from specd.core.sampling import warp_probs
from specd.core.verification import Verdict, sparse_to_dense, verify_greedy, verify_greedy_tree, verify_sampled
from specd.runtime.worker import ModelWorker, PositionFeatures, WorkerSession


@dataclass(frozen=True)
class VerifyResult:
    verdict: Verdict
    k: int
    committed_length: int
    seconds: float
    features: PositionFeatures | None = None  # sessions opened with return_features
    path: list[int] | None = None  # draft trees: indices of the accepted tokens, root side first


class Verifier(ModelWorker):
    def verify(
        self,
        session_id: str,
        draft_tokens: list[int],
        draft_distributions: list[tuple[list[int], list[float]]],
        committed_length: int,
        parents: list[int] | None = None,
    ) -> VerifyResult:
        """parents: a draft tree's (specd.core.tree); None or empty for a chain."""
        session = self.sessions.get(session_id)
        k = len(draft_tokens)
        self.check_length(len(session.committed), committed_length)
        self.check_room(len(session.committed), k)
        if any(not 0 <= t < self.vocab_size for t in draft_tokens):
            raise InvalidArgument(f"draft token ids must be in [0, {self.vocab_size})")
        if parents:
            tree.check_parents(parents, k)
            if not tree.is_chain(parents):
                if not session.params.greedy:
                    raise InvalidArgument("draft trees are for greedy sessions (temperature 0); send a chain")
                return self._verify_tree(session, draft_tokens, parents)
        q = None
        if not session.params.greedy and k:
            q = self._proposal_matrix(draft_tokens, draft_distributions)
        started = time.perf_counter()
        feed = session.kv.sync(session.committed)
        first_position = len(session.committed) - len(feed)
        hidden = None
        if session.return_features:
            logits, hidden = session.kv.forward_with_features(feed + draft_tokens)  # [n, vocab], [n, H]
        else:
            logits = session.kv.forward(feed + draft_tokens)
        logits = logits[-(k + 1) :, : self.vocab_size]  # [k+1, vocab]
        if session.params.greedy:
            verdict = verify_greedy(draft_tokens, logits)
        else:
            p = warp_probs(logits, session.params).cpu()  # [k+1, vocab], beside q for the acceptance tests
            if q is None:
                q = torch.zeros(0, self.vocab_size)
            verdict = verify_sampled(draft_tokens, q, p, session.params.seed, start_position=len(session.committed))
        session.committed.extend(verdict.committed(draft_tokens))
        session.kv.sync(session.committed)  # drop the rejected suffix now, freeing its memory
        features = None
        if hidden is not None:
            # Rows whose input token is now committed: the fed tokens and the accepted draft tokens.
            features = PositionFeatures(first_position, hidden[: len(feed) + verdict.accepted])
        return VerifyResult(
            verdict=verdict, k=k, committed_length=len(session.committed), seconds=time.perf_counter() - started,
            features=features,
        )

    def _verify_tree(self, session: WorkerSession, draft_tokens: list[int], parents: list[int]) -> VerifyResult:
        started = time.perf_counter()
        feed = session.kv.sync(session.committed)
        first_position = len(session.committed) - len(feed)
        logits, hidden = session.kv.forward_tree(feed, draft_tokens, parents, features=session.return_features)
        verdict, path = verify_greedy_tree(draft_tokens, parents, logits[len(feed) - 1 :, : self.vocab_size])
        session.kv.keep_path(first_position + len(feed), draft_tokens, path)
        session.committed.extend([draft_tokens[i] for i in path] + [verdict.next_token])
        features = None
        if hidden is not None:
            # The fed rows, then the accepted tokens' rows: the positions whose input is now committed.
            rows = torch.cat([hidden[: len(feed)], hidden[[len(feed) + i for i in path]]])
            features = PositionFeatures(first_position, rows)
        return VerifyResult(
            verdict=verdict, k=len(draft_tokens), committed_length=len(session.committed),
            seconds=time.perf_counter() - started, features=features, path=path,
        )

    def _proposal_matrix(
        self, draft_tokens: list[int], distributions: list[tuple[list[int], list[float]]]
    ) -> torch.Tensor:
        """Rebuild q [k, vocab] from the draft's sparse rows, checking it is a faithful proposal."""
        if len(distributions) != len(draft_tokens):
            raise InvalidArgument(
                f"sampled sessions need one proposal distribution per draft token: "
                f"{len(draft_tokens)} tokens, {len(distributions)} distributions"
            )
        rows = []
        for i, ((ids, probs), token) in enumerate(zip(distributions, draft_tokens)):
            if len(ids) != len(probs) or any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidArgument(f"proposal distribution {i} is malformed")
            row = sparse_to_dense(ids, probs, self.vocab_size)
            total = float(row.sum())
            if not 0.99 < total < 1.01 or bool((row < 0).any()):
                raise InvalidArgument(f"proposal distribution {i} does not sum to 1 (sums to {total:.4f})")
            if row[token] <= 0:
                raise InvalidArgument(f"draft token {token} has zero probability in its own proposal {i}")
            rows.append(row / total)
        return torch.stack(rows)  # [k, vocab]
