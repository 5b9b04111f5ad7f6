"""A feature draft's session: its cache over positions fed with the oracle's real features, then speculation.

See specd.models.feature_draft for what the draft computes at each position.
"""

from __future__ import annotations

import torch

from specd.core.errors import InvalidArgument
from specd.models.feature_draft import FeatureDraftModel
from specd.runtime.kv import SessionCache


class FeatureSession:
    """One session's draft cache: positions fed with the oracle's real features, then speculation."""

    def __init__(self, model: FeatureDraftModel, device: torch.device):
        self.model = model
        self.device = device
        self.cache = SessionCache()
        self.fed = 0  # positions 0..fed-1 are in the cache, each with its real feature
        self.pending: list[torch.Tensor] = []  # real features received but not fed yet, [rows, H] each
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (g, logits) of the last real position

    @property
    def received(self) -> int:
        """Positions whose real features the session holds (fed or pending)."""
        return self.fed + sum(len(rows) for rows in self.pending)

    def receive(self, start: int, rows: torch.Tensor) -> None:
        """Take the features of positions start.. (rows [n, H]); overlap with what is held is skipped."""
        if rows.shape[-1] != self.model.hidden_size:
            raise InvalidArgument(f"features have width {rows.shape[-1]}, the draft expects {self.model.hidden_size}")
        have = self.received
        if start > have:
            raise InvalidArgument(f"features start at position {start}, but the draft holds only {have}")
        if start + len(rows) > have:
            self.pending.append(rows[have - start :].to(self.device))

    @torch.inference_mode()
    def catch_up(self, committed: list[int]) -> None:
        """Drop speculative positions and feed every pending real feature with its next token."""
        self._crop(self.fed)
        if not self.pending:
            return
        features = torch.cat(self.pending)  # [n, H]
        self.pending = []
        n = len(features)
        if self.fed + n > len(committed) - 1:
            raise InvalidArgument(
                f"features for {self.fed + n} positions, but only {len(committed) - 1} have a committed next token"
            )
        ids = torch.tensor([committed[self.fed + 1 : self.fed + n + 1]], dtype=torch.long, device=self.device)
        positions = torch.arange(self.fed, self.fed + n, device=self.device)[None]
        g, logits = self.model(features[None], ids, positions, self.cache, logits="last")
        assert logits is not None
        self.fed += n
        self.last = (g[0, -1:], logits[0, -1])

    @torch.inference_mode()
    def step(self, feature: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one speculative position (the draft's own feature and its token); returns (g [1, H], logits)."""
        position = self.cache.get_seq_length()
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        positions = torch.tensor([[position]], device=self.device)
        g, logits = self.model(feature[None], ids, positions, self.cache)
        assert logits is not None
        return g[0], logits[0, -1]

    @torch.inference_mode()
    def tree_step(
        self, features: torch.Tensor, tokens: list[int], depths: list[int], sees: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed several speculative positions of a draft tree at once: row i is a token at `depths[i]`
        (1: right after the committed sequence) with its parent's feature features[i]. Row i attends to
        the real positions, to the speculative rows sees[i] (indices counted from the first speculative
        row in the cache: its ancestors') and to itself. Returns (g [n, H], logits [n, head vocab]);
        the rows join the cache after the speculative rows already there."""
        speculative = self.cache.get_seq_length() - self.fed
        n = len(tokens)
        mask = torch.zeros(n, self.fed + speculative + n, dtype=torch.bool)
        mask[:, : self.fed] = True
        for i, rows in enumerate(sees):
            mask[i, [self.fed + r for r in rows]] = True
            mask[i, self.fed + speculative + i] = True
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.tensor([[self.fed + d - 1 for d in depths]], device=self.device)
        g, logits = self.model(features[None], ids, positions, self.cache, mask=mask[None, None].to(self.device))
        assert logits is not None
        return g[0], logits[0]

    def _crop(self, keep: int) -> None:
        drop = self.cache.get_seq_length() - keep
        if drop > 0:
            self.cache.crop(-drop)
