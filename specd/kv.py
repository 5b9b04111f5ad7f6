"""A model's KV cache for one session, with rollback to the committed prefix.

Both workers keep the same invariant: the cache holds every committed token except the
last one, which is fed at the start of the next forward pass. After a round, `sync` crops
the cache to the longest common prefix of what it holds and the committed sequence, so a
rejected suffix is dropped without recomputing the prompt.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVSession:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.cache = DynamicCache()
        self.cached_ids: list[int] = []  # tokens whose keys/values the cache holds, in order
        self.forward_passes = 0

    @property
    def cached_length(self) -> int:
        return len(self.cached_ids)

    @torch.inference_mode()
    def forward(self, token_ids: list[int], output_hidden: bool = False) -> torch.Tensor:
        """Feed tokens after the cached ones; returns logits [len(token_ids), vocab]."""
        if not token_ids:
            raise ValueError("forward needs at least one token")
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        self.cached_ids.extend(token_ids)
        self.forward_passes += 1
        return out.logits[0].float()  # [n, vocab]

    def rollback(self, keep: int) -> None:
        """Drop cached entries beyond the first `keep` tokens."""
        drop = len(self.cached_ids) - keep
        if drop < 0:
            raise ValueError(f"cannot roll back to {keep} tokens: only {len(self.cached_ids)} cached")
        if drop:
            self.cache.crop(-drop)
            del self.cached_ids[keep:]

    def sync(self, committed: list[int]) -> list[int]:
        """Roll back to the committed sequence; returns the tokens still to feed (at least one)."""
        limit = min(len(self.cached_ids), len(committed) - 1)
        keep = 0
        while keep < limit and self.cached_ids[keep] == committed[keep]:
            keep += 1
        self.rollback(keep)
        return committed[keep:]
