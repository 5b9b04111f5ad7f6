"""Growing a draft tree (specd.core.tree) for one greedy session of a feature draft.

The tree is the best set of at most k tokens by survival, the chance (as the stop rule
estimates it) that a token is reached and accepted. A token's expected acceptance is the stop
rule's: for the draft's top choice at a position, by the confidence there; for an alternative,
by its own probability; for a token copied by prompt lookup (which continues any candidate whose
text repeats the session's, at no model cost), by the length of its match. Its survival is that
times its parent's. Level by level, the draft computes the children of the `width` most likely
tokens of the level whose survival reaches the rule's extend threshold and that can still be
among the k best, in one forward pass per level. The block is then the k tokens of highest
survival above min_survival; a child's survival never exceeds its parent's, so every kept
token's parent is kept too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specd.core import tree
from specd.core.lookup import NgramIndex
from specd.core.stopping import StopRule
from specd.core.tree import ROOT
from specd.runtime.draft_pass import DraftWork
from specd.runtime.feature_session import FeatureSession


@dataclass
class TreeNode:
    token: int
    parent: int  # index into the candidate list, or ROOT
    depth: int
    survival: float
    prob: float  # the draft's probability of the token (-1: only prompt lookup proposed it)
    match: int = 0  # > 0: prompt lookup proposed it, after a match of this many tokens
    g: torch.Tensor | None = None  # the draft's feature after it, once computed
    row: int = -1  # its speculative row in the draft's cache, once computed


@dataclass(frozen=True)
class DraftTree:
    """The chosen tokens in output order: by depth, then by parent; siblings the model offered first,
    by descending probability, then copied ones."""

    tokens: list[int]
    parents: list[int]  # specd.core.tree's parent indices
    looked_up: list[int]  # indices of the tokens prompt lookup proposed
    lookup_lengths: list[int]  # per looked-up token: its match's length
    confidences: list[float]  # the draft's probability of each token (1 for copied ones)
    model_steps: int  # forward passes the draft made


class TreeBuilder:
    def __init__(
        self,
        state: FeatureSession,
        committed: list[int],
        lookup: NgramIndex | None,
        k: int,
        stop: StopRule | None,
        width: int,
        head_size: int,
        token_id: Callable[[int], int],
    ):
        """`head_size`: rows of the draft's head that score tokens; `token_id`: a head row's shared token id."""
        self.state, self.committed, self.lookup = state, committed, lookup
        self.k, self.stop, self.width = k, stop, width
        self.head_size, self.token_id = head_size, token_id
        self.keep_at = stop.min_survival if stop is not None else 0.0
        self.extend_at = stop.extend_threshold if stop is not None else 0.0
        # The most a model-proposed child can be expected to be accepted (calibrations are non-decreasing).
        self.ceiling = 1.0
        if stop is not None:
            self.ceiling = max(stop.expected_acceptance(1.0), stop.alternative_expected(1.0, 1.0))
        self.nodes: list[TreeNode] = []
        self.children: dict[int, dict[int, int]] = {}  # candidate -> its children's token -> their index
        self.copied: dict[int, bool] = {}  # candidates that prompt lookup continues
        self.steps = 0  # forward passes

    def build(self) -> DraftWork[DraftTree]:
        """The tree, grown in a forward pass per level (specd.runtime.draft_pass)."""
        yield from self._grow()
        return self._select()

    # -- candidates ------------------------------------------------------------------------------
    def _add(self, parent: int, token: int, expected: float, prob: float, match: int = 0) -> int | None:
        """A candidate child of `parent` (its index, or None when it was there already). A token both the
        model and a copy offer there counts as proposed by the one that expects more of it."""
        nodes = self.nodes
        survival = (1.0 if parent == ROOT else nodes[parent].survival) * expected
        known = self.children.setdefault(parent, {}).get(token)
        self.copied[parent] = self.copied.get(parent, False) or match > 0
        if known is not None:
            node = nodes[known]
            if survival > node.survival:
                node.survival, node.match = survival, match
            node.prob = max(node.prob, prob)
            return None
        depth = 1 if parent == ROOT else nodes[parent].depth + 1
        self.children[parent][token] = len(nodes)
        nodes.append(TreeNode(token, parent, depth, survival, prob, match))
        return len(nodes) - 1

    def _copy(self, start: int) -> None:
        """Tokens prompt lookup continues `start` with, each after the last, while they may be kept."""
        lookup, nodes = self.lookup, self.nodes
        node: int | None = start
        while lookup is not None and node is not None:
            if (nodes[node].depth if node != ROOT else 0) >= self.k:
                return
            path = [nodes[a].token for a in tree.ancestors([n.parent for n in nodes], node)]
            found = lookup.match((self.committed[-lookup.max_n :] + path)[-lookup.max_n :])
            if found is None:
                return
            token, length = found
            expected = self.stop.lookup_expected(length) if self.stop is not None else 1.0
            node = self._add(node, token, expected, -1.0, length)
            if node is not None and nodes[node].survival < self.keep_at:
                return

    def _offer(self, parent: int, logits: torch.Tensor) -> None:
        """The `width` likeliest children of `parent` as the model sees them, each continued by lookup."""
        probs_all = torch.softmax(logits[: self.head_size].float(), dim=-1)
        top = torch.topk(probs_all, min(self.width, self.head_size))
        probs, rows = top.values.tolist(), top.indices.tolist()
        for rank, (prob, row) in enumerate(zip(probs, rows)):
            if self.stop is None:
                expected = prob
            elif rank == 0:
                expected = self.stop.expected_acceptance(prob)
            else:
                expected = self.stop.alternative_expected(prob, probs[0])
            added = self._add(parent, self.token_id(row), expected, prob)
            if added is not None:
                self._copy(added)

    # -- growing level by level ------------------------------------------------------------------
    def _pays(self, i: int, kth: float) -> bool:
        """Computing a token's children pays only if one of them could be among the k best so far."""
        node = self.nodes[i]
        return node.survival >= self.extend_at and node.survival * self.ceiling > kth

    def _copy_end(self, i: int) -> int:
        """The last token of the copied span that continues `i` (`i` itself when none does)."""
        while self.copied.get(i) and self.nodes[i].g is None and len(self.children[i]) == 1:
            i = next(iter(self.children[i].values()))
        return i

    def _level(self, depth: int) -> list[int]:
        """The tokens at `depth` whose children the next forward pass computes."""
        nodes = self.nodes
        ranked = sorted((node.survival for node in nodes), reverse=True)
        kth = ranked[self.k - 1] if len(ranked) >= self.k else -1.0
        # As in a chain, the model runs along a copied span only to continue after its end: a token a copy
        # continues is computed when the span's last token is worth continuing.
        level = []
        for i, node in enumerate(nodes):
            if node.depth != depth or not self._pays(i, kth):
                continue
            if node.parent != ROOT and nodes[node.parent].g is None:
                continue
            if self.copied.get(i):
                end = self._copy_end(i)
                if not (self._pays(end, kth) and nodes[end].depth < self.k):
                    continue
            level.append(i)
        return sorted(level, key=lambda i: -nodes[i].survival)[: self.width]

    def _grow(self) -> DraftWork[None]:
        assert self.state.last is not None
        root_g, root_logits = self.state.last
        self._copy(ROOT)
        self._offer(ROOT, root_logits)
        computed = 0  # speculative rows in the draft's cache
        nodes = self.nodes
        for depth in range(1, self.k):
            expand = self._level(depth)
            if not expand:
                break
            features = [root_g[0] if nodes[i].parent == ROOT else nodes[nodes[i].parent].g for i in expand]
            parents = [node.parent for node in nodes]
            sees = [[nodes[a].row for a in tree.ancestors(parents, nodes[i].parent)] for i in expand]
            g, logits = yield from self.state.tree_step_work(
                torch.stack(features), [nodes[i].token for i in expand], [depth] * len(expand), sees
            )
            self.steps += 1
            for row, i in enumerate(expand):
                nodes[i].g, nodes[i].row = g[row], computed + row
                self._offer(i, logits[row])
            computed += len(expand)

    def _select(self) -> DraftTree:
        nodes = self.nodes
        chosen = sorted(
            (i for i, node in enumerate(nodes) if node.survival >= self.keep_at),
            key=lambda i: (-nodes[i].survival, nodes[i].depth, i),
        )[: self.k]
        order: list[int] = []
        index = {ROOT: ROOT}
        for depth in range(1, max((nodes[i].depth for i in chosen), default=0) + 1):
            level = [i for i in chosen if nodes[i].depth == depth]
            for i in sorted(level, key=lambda i: (index[nodes[i].parent], -nodes[i].prob)):
                index[i] = len(order)
                order.append(i)
        copied = [n for n, i in enumerate(order) if nodes[i].match]
        return DraftTree(
            tokens=[nodes[i].token for i in order],
            parents=[index[nodes[i].parent] for i in order],
            looked_up=copied,
            lookup_lengths=[nodes[order[n]].match for n in copied],
            confidences=[1.0 if nodes[i].match else nodes[i].prob for i in order],
            model_steps=self.steps,
        )
