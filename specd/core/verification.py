"""Verification of a draft block: the one place where tokens are accepted or rejected.

Pure tensors in, a small `Verdict` out: no gRPC, no model code. The oracle service calls
`verify_greedy` or `verify_sampled`; nothing else re-implements this logic.

Terms, used with these meanings throughout specd (code, metrics, README):

- depth k: the number of tokens the draft proposes in one round (d_1..d_k).
- q_i: the draft's proposal distribution at position i (d_i ~ q_i);
  p_i: the oracle's distribution at position i, for i = 1..k+1, from one forward pass.
- accepted tokens: the prefix d_1..d_m the oracle keeps (0 <= m <= k).
- recovered token: after the first rejection (position m+1 <= k), the oracle's own token,
  drawn from norm(max(0, p_{m+1} - q_{m+1})) (greedy: argmax p_{m+1}).
- bonus token: when all k are accepted, the oracle's token drawn from p_{k+1}.
- Each round commits m + 1 tokens: the accepted ones and one recovered or bonus token.
- acceptance rate (alpha) = accepted / drafted tokens.
- mean acceptance length = 1 + accepted / rounds that drafted (tokens committed per round).

Greedy (temperature 0): accept while d_i == argmax p_i; then the oracle's argmax. A greedy block
may also be a tree (specd.core.tree): the accepted tokens are then the path along the oracle's argmax.
Sampled: Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1 (also Chen et al. 2023): accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)). The committed tokens are distributed exactly as the oracle's own
samples, whatever q is, so the draft may propose from any distribution it reports faithfully.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specd.core.sampling import Stream, keyed_uniform, sample_from
from specd.core.tree import greedy_path


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one draft block."""

    accepted: int  # m: number of draft tokens kept
    next_token: int  # the recovered token (m < k) or the bonus token (m == k)

    def committed(self, draft_tokens: list[int]) -> list[int]:
        """The tokens this round appends to the sequence: d_1..d_m and the oracle's token."""
        return list(draft_tokens[: self.accepted]) + [self.next_token]

    def is_bonus(self, k: int) -> bool:
        return self.accepted == k


def verify_greedy(draft_tokens: list[int], oracle_logits: torch.Tensor) -> Verdict:
    """Greedy verification.

    draft_tokens: d_1..d_k; oracle_logits: [k+1, vocab], row i scores position i+1.
    """
    k = len(draft_tokens)
    if oracle_logits.shape[0] != k + 1:
        raise ValueError(f"need k+1={k + 1} rows of oracle logits, got {oracle_logits.shape[0]}")
    argmax = oracle_logits.argmax(dim=-1).tolist()  # [k+1]
    m = 0
    while m < k and draft_tokens[m] == argmax[m]:
        m += 1
    return Verdict(accepted=m, next_token=argmax[m])


def verify_greedy_tree(
    draft_tokens: list[int], parents: list[int], oracle_logits: torch.Tensor
) -> tuple[Verdict, list[int]]:
    """Greedy verification of a draft tree (specd.core.tree): accept the path along which every token is
    the oracle's argmax. oracle_logits: [k+1, vocab], row 0 scores the position after the committed
    sequence, row i + 1 the position after tree token i. Returns the verdict (accepted = the path's
    length) and the path (indices into draft_tokens, root side first)."""
    k = len(draft_tokens)
    if oracle_logits.shape[0] != k + 1:
        raise ValueError(f"need k+1={k + 1} rows of oracle logits, got {oracle_logits.shape[0]}")
    path, next_token = greedy_path(draft_tokens, parents, oracle_logits.argmax(dim=-1).tolist())
    return Verdict(accepted=len(path), next_token=next_token), path


def verify_sampled(
    draft_tokens: list[int],
    q: torch.Tensor,
    p: torch.Tensor,
    seed: int,
    start_position: int,
) -> Verdict:
    """Lossless speculative sampling (Leviathan et al. 2023, Algorithm 1).

    draft_tokens: d_1..d_k.
    q: [k, vocab] the draft's proposal distributions (d_i was drawn from q[i-1]).
    p: [k+1, vocab] the oracle's (warped) distributions for positions 1..k+1.
    seed, start_position: key the random numbers; start_position is the absolute
    sequence position of d_1, so position i uses start_position + i - 1.
    """
    k = len(draft_tokens)
    if p.shape[0] != k + 1 or q.shape[0] != k:
        raise ValueError(f"shape mismatch: k={k}, q rows={q.shape[0]}, p rows={p.shape[0]}")
    for i, token in enumerate(draft_tokens):
        position = start_position + i
        q_i = float(q[i, token])
        p_i = float(p[i, token])
        if q_i <= 0.0:
            raise ValueError(f"draft token {token} at offset {i} has zero proposal probability")
        alpha = keyed_uniform(seed, position, Stream.ACCEPT)
        if alpha * q_i < p_i:  # accept with probability min(1, p_i / q_i)
            continue
        residual = torch.clamp(p[i].double() - q[i].double(), min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is p itself
            residual = p[i].double()
        recovered = sample_from(residual, keyed_uniform(seed, position, Stream.ORACLE))
        return Verdict(accepted=i, next_token=recovered)
    bonus = sample_from(p[k], keyed_uniform(seed, start_position + k, Stream.ORACLE))
    return Verdict(accepted=k, next_token=bonus)


def acceptance_rate(accepted: int, drafted: int) -> float:
    """accepted / drafted tokens (0 when nothing was drafted)."""
    return accepted / drafted if drafted else 0.0


def mean_acceptance_length(accepted: int, rounds_with_draft: int) -> float:
    """1 + accepted / rounds that drafted: tokens committed per such round (1 when none drafted, as a
    round of the oracle alone commits one)."""
    return 1.0 + accepted / rounds_with_draft if rounds_with_draft else 1.0


def sparse_to_dense(token_ids: list[int], probs: list[float], vocab_size: int) -> torch.Tensor:
    """A proposal distribution sent as (ids, probs) back to a dense [vocab] row."""
    row = torch.zeros(vocab_size, dtype=torch.float32)
    if token_ids:
        row[torch.tensor(token_ids, dtype=torch.long)] = torch.tensor(probs, dtype=torch.float32)
    return row
