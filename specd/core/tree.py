"""Draft trees: a block whose tokens may branch, verified in one forward pass.

A chain d_1..d_k is accepted up to the first position where the oracle disagrees; when the draft
is unsure there, its second guess is often the oracle's token. A tree offers such alternatives:
token i of the block has a parent, an earlier token of the block or -1 for the committed
sequence, and continues its parent's text. The chain is the tree whose parents are -1, 0, 1, ...

Layout used by the draft, the oracle and the coordinator alike:
- parents come before their children (parents[i] < i);
- siblings appear in descending order of the draft's probability, so the first child of a node
  is the draft's top choice there; tokens that only prompt lookup proposed come after the
  model's (the proposal lists them in its lookup positions).

The oracle feeds every token of the block at once. Token i sits at the position its depth gives
(depth 1 right after the committed sequence) and attends to the cached context, to the tokens
fed before the block in the same pass, to its ancestors and to itself, never to a sibling's
branch: each row computes what a chain along that token's path would compute. Greedy
verification then walks from the root: while a child of the current node is the oracle's argmax
there, step to it. The tokens on that path are accepted, and the oracle's argmax after the last
one is its own token, exactly as for a chain; so greedy output stays the oracle's own.
Trees are for greedy sessions only: rejection sampling over several candidates per position
needs a different acceptance rule, and sampled sessions keep chains.
"""

from __future__ import annotations

import torch

from specd.core.errors import InvalidArgument

ROOT = -1


def check_parents(parents: list[int], k: int) -> None:
    """Refuse a parent list that does not describe a tree over k tokens in the layout above."""
    if len(parents) != k:
        raise InvalidArgument(f"a draft tree needs one parent per token: {k} tokens, {len(parents)} parents")
    for i, parent in enumerate(parents):
        if not ROOT <= parent < i:
            raise InvalidArgument(
                f"draft tree: token {i} has parent {parent}; a parent must be -1 (the committed sequence) "
                f"or an earlier token of the block"
            )


def is_chain(parents: list[int]) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of each token: 1 for children of the committed sequence."""
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent == ROOT else out[parent] + 1)
    return out


def ancestors(parents: list[int], i: int) -> list[int]:
    """Tokens on the path from the root to token i, i included, root side first."""
    path = []
    while i != ROOT:
        path.append(i)
        i = parents[i]
    return path[::-1]


def attention_mask(parents: list[int], context: int, fed: int, device: torch.device) -> torch.Tensor:
    """[1, 1, fed + k, context + fed + k] bool mask (True: may attend) for a pass that feeds `fed`
    tokens of the sequence after `context` cached ones, then the k tokens of the tree."""
    k = len(parents)
    rows = fed + k
    mask = torch.zeros(rows, context + rows, dtype=torch.bool)
    mask[:, :context] = True
    mask[:, context : context + fed] = _fed_block(rows, fed)
    for i in range(k):
        for j in ancestors(parents, i):
            mask[fed + i, context + fed + j] = True
    return mask[None, None].to(device)


def _fed_block(rows: int, fed: int) -> torch.Tensor:
    """Which fed tokens each row sees: causal among the fed rows, all of them for the tree's rows."""
    block = torch.ones(rows, fed, dtype=torch.bool)
    block[:fed] = torch.ones(fed, fed, dtype=torch.bool).tril()
    return block


def position_ids(parents: list[int], context: int, fed: int, device: torch.device) -> torch.Tensor:
    """[1, fed + k] positions: the fed tokens in order, then each tree token at its depth."""
    last = context + fed - 1  # the position of the last fed token
    positions = list(range(context, context + fed)) + [last + d for d in depths(parents)]
    return torch.tensor([positions], dtype=torch.long, device=device)


def greedy_path(tokens: list[int], parents: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """Walk the tree along the oracle's argmax.

    argmax[0] is the oracle's token after the committed sequence, argmax[i + 1] its token after
    tree token i. Returns (indices of the accepted tokens, root side first; the oracle's own
    token after them)."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    path: list[int] = []
    node = ROOT
    while True:
        want = argmax[node + 1]
        step = next((c for c in children.get(node, ()) if tokens[c] == want), None)
        if step is None:
            return path, want
        path.append(step)
        node = step
