"""A draft's forward passes, one session's or several at once.

A draft session's work (opening it, proposing a block: specd.runtime.drafter) is written as a
generator that yields the rows each of its forward passes needs (`DraftRows`) and receives what
the pass computed for them (`DraftOutput`). Run alone, each pass holds that session's rows only
(`run_alone`); in the draft worker's engine (specd.runtime.engine) one pass holds the rows of
every session that wants a token, and each session leaves when its block ends.

Both run the same packed pass (specd.runtime.batch): the draft's linear layers see every row at
once, each session's attention reads its own cache. Under the CPU default (oneDNN float layers,
int8 layers with a scale per row: specd.kernels) a row's result does not depend on the other
rows, so a session's proposals are bit for bit the same alone or batched.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

from specd.runtime.batch import PackedPass, Segment, packed_forward, use_packed_attention

T = TypeVar("T")


@dataclass
class DraftRows:
    """One session's rows in a draft pass."""

    segment: Segment
    # [n, W]: a feature draft's input feature at each row: the oracle's (its feature_width) or the draft's own g (H)
    features: torch.Tensor | None = None
    logits: Literal["all", "last", "none"] = "last"  # which rows' logits the session reads

    def __len__(self) -> int:
        return len(self.segment)


@dataclass(frozen=True)
class DraftOutput:
    g: torch.Tensor | None  # [n, H]: a feature draft's predicted next features
    logits: torch.Tensor | None  # [n or 1, head vocab] as asked; None for "none"


# A session's draft work: yields each pass's rows, receives their output, returns its result.
DraftWork = Generator[DraftRows, DraftOutput, T]


def run_alone(work: DraftWork[T], forward: Callable[[list[DraftRows]], list[DraftOutput]]) -> T:
    """Run one session's work, each of its passes on its own."""
    try:
        rows = next(work)
        while True:
            rows = work.send(forward([rows])[0])
    except StopIteration as done:
        return done.value


class DraftPasses:
    """Forward passes of one draft model: a standalone causal LM (a KV cache of tokens) or a feature draft."""

    def __init__(self, model: nn.Module, *, feature_draft: bool):
        self.model = model
        self.feature_draft = feature_draft
        self.packed = use_packed_attention(model)

    @torch.inference_mode()
    def forward(self, passes: list[DraftRows]) -> list[DraftOutput]:
        if self.packed:
            hidden, g = self._packed(passes)
        else:
            hidden, g = self._one_by_one(passes)
        return self._heads(passes, hidden, g)

    def _packed(self, passes: list[DraftRows]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """(what each session's head reads [n, H], its g or None), all sessions in one pass."""
        segments = [rows.segment for rows in passes]
        if not self.feature_draft:
            return packed_forward(self.model, segments), [None] * len(passes)
        model = self.model
        batch = PackedPass.of(segments, model.embed.weight.device)
        features = torch.cat([model.feature_input(_features(rows)) for rows in passes])[None]  # [1, N, H]
        x = model.fuse(torch.cat([model.embed(batch.ids), features.to(model.embed.weight.dtype)], dim=-1))
        x = batch.layers([model.layer], x, model.rotary(x, position_ids=batch.positions))
        split = batch.split(x[0])
        return split, list(split)

    def _one_by_one(self, passes: list[DraftRows]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The same, a pass per session (models the packed pass does not cover)."""
        hidden: list[torch.Tensor] = []
        gs: list[torch.Tensor | None] = []
        device = next(self.model.parameters()).device
        for rows in passes:
            segment = rows.segment
            ids = torch.tensor([segment.tokens], dtype=torch.long, device=device)
            positions = torch.tensor([segment.positions], dtype=torch.long, device=device)
            if self.feature_draft:
                mask = None if segment.attend is None else segment.attend.to(device)[None, None]
                g, _ = self.model(_features(rows)[None], ids, positions, segment.cache, logits="none", mask=mask)
                hidden.append(g[0])
                gs.append(g[0])
            else:
                out = self.model.get_decoder()(input_ids=ids, position_ids=positions, cache=segment.cache, use_cache=True)
                hidden.append(out.last_hidden_state[0])
                gs.append(None)
        return hidden, gs

    def _heads(
        self, passes: list[DraftRows], hidden: list[torch.Tensor], gs: list[torch.Tensor | None]
    ) -> list[DraftOutput]:
        """The output head over the rows each session reads, in one call."""
        wanted = [h if rows.logits == "all" else h[-1:] for rows, h in zip(passes, hidden) if rows.logits != "none"]
        head = self.model.logits if self.feature_draft else self.model.get_output_embeddings()
        logits = iter(torch.split(head(torch.cat(wanted)), [len(w) for w in wanted])) if wanted else iter(())
        return [
            DraftOutput(g, None if rows.logits == "none" else next(logits)) for rows, g in zip(passes, gs)
        ]


def _features(rows: DraftRows) -> torch.Tensor:
    if rows.features is None:
        raise ValueError("a feature draft's rows need their features")
    return rows.features
