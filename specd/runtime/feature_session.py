"""A feature draft's session: its cache over positions fed with the oracle's real features, then speculation.

See specd.models.feature_draft for what the draft computes at each position. Each method that runs
the model comes in two forms: `*_work`, a generator of its passes (specd.runtime.draft_pass) for
the draft worker's engine to batch with other sessions', and the plain method, which runs them alone.
"""

from __future__ import annotations

import torch

from specd.core.errors import InvalidArgument
from specd.models.feature_draft import FeatureDraftModel
from specd.runtime.batch import Segment
from specd.runtime.draft_pass import DraftPasses, DraftRows, DraftWork, run_alone
from specd.runtime.kv import SessionCache


class FeatureSession:
    """One session's draft cache: positions fed with the oracle's real features, then speculation."""

    def __init__(self, model: FeatureDraftModel, device: torch.device, passes: DraftPasses | None = None):
        """passes: how the plain methods run the model (a worker shares one; by default, a pass per call)."""
        self.model = model
        self.device = device
        self.passes = passes or DraftPasses(model, feature_draft=True)
        self.cache = SessionCache()
        self.fed = 0  # positions 0..fed-1 are in the cache, each with its real feature
        self.pending: list[torch.Tensor] = []  # real features received but not fed yet, [rows, feature_width] each
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (g [1, H], logits) of the last real position

    @property
    def received(self) -> int:
        """Positions whose real features the session holds (fed or pending)."""
        return self.fed + sum(len(rows) for rows in self.pending)

    def receive(self, start: int, rows: torch.Tensor) -> None:
        """Take the features of positions start.. (rows [n, feature_width]); overlap with what is held is skipped."""
        if rows.shape[-1] != self.model.feature_width:
            raise InvalidArgument(f"features have width {rows.shape[-1]}, the draft expects {self.model.feature_width}")
        have = self.received
        if start > have:
            raise InvalidArgument(f"features start at position {start}, but the draft holds only {have}")
        if start + len(rows) > have:
            self.pending.append(rows[have - start :].to(self.device))

    def catch_up_work(self, committed: list[int], chunk: int = 0) -> DraftWork[None]:
        """Drop speculative positions and feed every pending real feature with its next token, in passes of
        rows up to the next multiple of `chunk` positions (0: one pass)."""
        self._crop(self.fed)
        if not self.pending:
            return
        features = torch.cat(self.pending)  # [n, feature_width]
        self.pending = []
        n = len(features)
        if self.fed + n > len(committed) - 1:
            raise InvalidArgument(
                f"features for {self.fed + n} positions, but only {len(committed) - 1} have a committed next token"
            )
        first, end = self.fed, self.fed + n
        while self.fed < end:
            stop = min(end, (self.fed // chunk + 1) * chunk) if chunk else end
            out = yield DraftRows(
                Segment(self.cache, committed[self.fed + 1 : stop + 1], list(range(self.fed, stop))),
                features[self.fed - first : stop - first],
                "last" if stop == end else "none",
            )
            self.fed = stop
        assert out.g is not None and out.logits is not None
        self.last = (out.g[-1:], out.logits[-1])

    def step_work(self, feature: torch.Tensor, token: int) -> DraftWork[tuple[torch.Tensor, torch.Tensor]]:
        """Feed one speculative position (the draft's own feature [1, H] and its token); returns (g [1, H], logits)."""
        position = self.cache.get_seq_length()
        out = yield DraftRows(Segment(self.cache, [token], [position]), feature)
        assert out.g is not None and out.logits is not None
        return out.g, out.logits[-1]

    def tree_step_work(
        self, features: torch.Tensor, tokens: list[int], depths: list[int], sees: list[list[int]]
    ) -> DraftWork[tuple[torch.Tensor, torch.Tensor]]:
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
        positions = [self.fed + d - 1 for d in depths]
        out = yield DraftRows(Segment(self.cache, tokens, positions, attend=mask), features, "all")
        assert out.g is not None and out.logits is not None
        return out.g, out.logits

    def catch_up(self, committed: list[int]) -> None:
        run_alone(self.catch_up_work(committed), self.passes.forward)

    def step(self, feature: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        return run_alone(self.step_work(feature, token), self.passes.forward)

    def tree_step(
        self, features: torch.Tensor, tokens: list[int], depths: list[int], sees: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return run_alone(self.tree_step_work(features, tokens, depths, sees), self.passes.forward)

    def _crop(self, keep: int) -> None:
        drop = self.cache.get_seq_length() - keep
        if drop > 0:
            self.cache.crop(-drop)
