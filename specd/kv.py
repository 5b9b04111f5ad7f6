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
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones; returns logits [len(token_ids), vocab]."""
        input_ids = self._input(token_ids)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        self._fed(token_ids)
        return out.logits[0].float()  # [n, vocab]

    @torch.inference_mode()
    def forward_with_features(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like forward, and also the final hidden states the output head reads: ([n, vocab], [n, H]).

        The decoder and the head are called as the model's own forward calls them, so the logits
        are the same as forward's.
        """
        input_ids = self._input(token_ids)
        hidden = self.model.get_decoder()(
            input_ids=input_ids, past_key_values=self.cache, use_cache=True
        ).last_hidden_state  # [1, n, H]
        logits = self.model.get_output_embeddings()(hidden)
        self._fed(token_ids)
        return logits[0].float(), hidden[0]

    def _input(self, token_ids: list[int]) -> torch.Tensor:
        if not token_ids:
            raise ValueError("forward needs at least one token")
        return torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]

    def _fed(self, token_ids: list[int]) -> None:
        self.cached_ids.extend(token_ids)
        self.forward_passes += 1

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
