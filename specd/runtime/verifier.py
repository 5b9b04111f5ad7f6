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
from specd.models.pretrained import LoadedModel
from specd.runtime.batch import (
    Segment,
    joined_hidden_states,
    packed_forward,
    use_packed_attention,
    use_row_exact_attention,
)
from specd.runtime.worker import ModelWorker, PositionFeatures, WorkerSession


@dataclass(frozen=True)
class VerifyResult:
    verdict: Verdict
    k: int
    committed_length: int
    seconds: float
    features: PositionFeatures | None = None  # sessions opened with return_features
    path: list[int] | None = None  # draft trees: indices of the accepted tokens, root side first
    step_sessions: int = 1  # sessions in the pass that verified it (specd.runtime.engine)
    row_seconds: float = 0.0  # what one more row adds to such a pass, at the recent load


@dataclass
class VerifyPlan:
    """A verification ready for its forward pass: the session's rows (what its cache lacks of the committed
    sequence, then the draft block) and what deciding on them needs."""

    session: WorkerSession
    draft_tokens: list[int]
    parents: list[int]  # a draft tree's; empty for a chain
    q: torch.Tensor | None  # [k, vocab] the draft's proposals (sampled sessions)
    feed: list[int]  # committed tokens the cache lacks, fed before the block
    first_position: int  # the position of feed[0]
    segment: Segment
    started: float


class Verifier(ModelWorker):
    def __init__(self, loaded: LoadedModel, **limits):
        super().__init__(loaded, **limits)
        # Sessions share forward passes where the model allows it (specd.runtime.batch). On CPU those passes
        # attend row by row, so that a verified token gets the very logits of its one-token step.
        self.packed = use_packed_attention(loaded.model)
        if self.packed and loaded.device.type == "cpu":
            use_row_exact_attention(loaded.model)

    def verify(
        self,
        session_id: str,
        draft_tokens: list[int],
        draft_distributions: list[tuple[list[int], list[float]]],
        committed_length: int,
        parents: list[int] | None = None,
    ) -> VerifyResult:
        """Verify one session's block in a pass of its own. parents: a draft tree's (specd.core.tree); None
        or empty for a chain."""
        plan = self.plan_verify(session_id, draft_tokens, draft_distributions, committed_length, parents)
        (hidden,) = self.forward([plan.segment])
        return self.finish_verify(plan, hidden)

    def plan_verify(
        self,
        session_id: str,
        draft_tokens: list[int],
        draft_distributions: list[tuple[list[int], list[float]]],
        committed_length: int,
        parents: list[int] | None = None,
    ) -> VerifyPlan:
        """Check the request and lay out its rows; raises a SpecdError for a caller's mistake."""
        session = self.sessions.get(session_id)
        k = len(draft_tokens)
        self.check_length(len(session.committed), committed_length)
        self.check_room(len(session.committed), k)
        if any(not 0 <= t < self.vocab_size for t in draft_tokens):
            raise InvalidArgument(f"draft token ids must be in [0, {self.vocab_size})")
        parents = list(parents or [])
        if parents:
            tree.check_parents(parents, k)
            if tree.is_chain(parents):
                parents = []
            elif not session.params.greedy:
                raise InvalidArgument("draft trees are for greedy sessions (temperature 0); send a chain")
        q = None
        if not session.params.greedy and k:
            q = self._proposal_matrix(draft_tokens, draft_distributions)
        started = time.perf_counter()
        feed = session.kv.sync(session.committed)
        first = len(session.committed) - len(feed)
        if parents:
            tree_mask = tree.attention_mask(parents, 0, len(feed), torch.device("cpu"))[0, 0]
            positions = tree.position_ids(parents, first, len(feed), torch.device("cpu"))[0].tolist()
        else:
            tree_mask, positions = None, list(range(first, first + len(feed) + k))
        segment = Segment(session.kv.cache, feed + draft_tokens, positions, tree_mask, feature_layers=session.feature_layers)
        return VerifyPlan(session, draft_tokens, parents, q, feed, first, segment, started)

    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Every segment's final hidden states [n, H] (and the `features` of those that ask for hidden states):
        one packed pass, or one pass each where the model cannot share them."""
        if self.packed:
            return packed_forward(self.loaded.model, segments)
        return [self._forward_alone(segment) for segment in segments]

    @torch.inference_mode()
    def _forward_alone(self, segment: Segment) -> torch.Tensor:
        device = self.loaded.device
        cached = segment.cache.get_seq_length()
        mask = None
        if segment.tree_mask is not None:
            mask = torch.ones(len(segment), cached + len(segment), dtype=torch.bool)
            mask[:, cached:] = segment.tree_mask
            mask = mask[None, None].to(device)
        out = self.loaded.model.get_decoder()(
            input_ids=torch.tensor([segment.tokens], dtype=torch.long, device=device),
            position_ids=torch.tensor([segment.positions], dtype=torch.long, device=device),
            attention_mask=mask, cache=segment.cache, use_cache=True, output_hidden_states=bool(segment.feature_layers),
        )
        if segment.feature_layers:
            segment.features = joined_hidden_states(out.hidden_states, segment.feature_layers)
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def finish_verify(self, plan: VerifyPlan, hidden: torch.Tensor) -> VerifyResult:
        """Decide on the block from the pass's final hidden states [n, H], commit, and roll the cache back. The
        features returned are those hidden states, or the ones the session asked for (`plan.segment.features`)."""
        session, draft_tokens, feed = plan.session, plan.draft_tokens, plan.feed
        session.kv.record_fed(plan.segment.tokens)
        k = len(draft_tokens)
        head = self.loaded.model.get_output_embeddings()
        logits = head(hidden[len(feed) - 1 :]).float()[:, : self.vocab_size]  # [k+1, vocab]
        path: list[int] | None = None
        if plan.parents:
            verdict, path = verify_greedy_tree(draft_tokens, plan.parents, logits)
            session.kv.keep_path(plan.first_position + len(feed), draft_tokens, path)
            session.committed.extend([draft_tokens[i] for i in path] + [verdict.next_token])
            kept = [len(feed) + i for i in path]
        else:
            if session.params.greedy:
                verdict = verify_greedy(draft_tokens, logits)
            else:
                p = warp_probs(logits, session.params).cpu()  # [k+1, vocab], beside q for the acceptance tests
                q = plan.q if plan.q is not None else torch.zeros(0, self.vocab_size)
                verdict = verify_sampled(draft_tokens, q, p, session.params.seed, start_position=len(session.committed))
            session.committed.extend(verdict.committed(draft_tokens))
            session.kv.sync(session.committed)  # drop the rejected suffix now, freeing its memory
            kept = [len(feed) + i for i in range(verdict.accepted)]
        features = None
        if session.return_features:
            # Rows whose input token is now committed: the fed tokens and the accepted draft tokens.
            rows = plan.segment.features if session.feature_layers else hidden
            assert rows is not None
            features = PositionFeatures(plan.first_position, rows[list(range(len(feed))) + kept])
        return VerifyResult(
            verdict=verdict, k=k, committed_length=len(session.committed),
            seconds=time.perf_counter() - plan.started, features=features, path=path,
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
