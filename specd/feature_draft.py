"""A draft that reads the oracle's features: one decoder layer over the oracle's last hidden states.

A standalone draft must rebuild everything the oracle knows from tokens alone, which a small
model does poorly. This draft instead conditions on the oracle's own final hidden state (the
vector its output head reads), which the oracle computes anyway while verifying and returns
with each verdict (specd.v1 `Features`, a few KB per round). The idea is EAGLE's (Li et al.,
2024): predicting the next feature from the current one is much easier than predicting the
next token from scratch.

Positions and what the draft computes at each:

    oracle:  f_j = final hidden state at position j (after the final norm), so head(f_j) -> x_{j+1}
    draft:   g_j = layer(fuse([embed(x_{j+1}); f_j]))  approximates f_{j+1},
             head(g_j) -> the draft's guess for x_{j+2}

After a verdict the committed tokens are x_0..x_n and the oracle has returned f_0..f_{n-1}
(x_n, its own token, is fed at the start of its next pass). The draft feeds every position up
to n-1 with real features, so g_{n-1} gives d_1; each further step feeds the draft's own
output as the feature: (g_{n-1}, d_1) at position n gives d_2, and so on. Those speculative
positions are cropped from the cache before the next round.

The embedding and the output head are the oracle's (frozen; the head may be a subset of its
rows). The trained tensors are the fuse projection and the layer: a few MB. They start as the
identity on f_j (the fuse passes the feature through, the layer's output projections are zero),
so training begins from the oracle's own distribution one position early rather than from noise.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from specd.errors import InvalidArgument
from specd.kv import SessionCache

# Features travel as little-endian float16, row-major [rows, dim]: the draft only conditions on
# them, so their precision affects acceptance, never the output.
WIRE_DTYPE = "<f2"


class FeatureDraftModel(nn.Module):
    """fuse [embed(token); feature] -> one decoder layer of the oracle's kind -> head."""

    # specd.int8_linear keeps `fuse` in float: its input joins an embedding and a feature of very
    # different scales, which one int8 scale per block cannot both resolve (acceptance fell with it).
    int8_exempt = ("fuse",)

    def __init__(self, oracle: nn.Module, head_token_ids: list[int] | None):
        super().__init__()
        decoder = oracle.get_decoder()
        if not all(hasattr(decoder, name) for name in ("layers", "rotary_emb", "embed_tokens")):
            raise InvalidArgument("feature drafts support llama-style oracles (layers, rotary_emb, embed_tokens)")
        config = copy.deepcopy(oracle.config)
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1]
        self.config = config
        hidden = config.hidden_size
        self.embed = decoder.embed_tokens
        self.embed.weight.requires_grad_(False)
        self.fuse = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = type(decoder.layers[0])(config, layer_idx=0)
        self.rotary = type(decoder.rotary_emb)(config=config)
        head = oracle.get_output_embeddings()
        rows = head.weight if head_token_ids is None else head.weight[torch.tensor(head_token_ids, dtype=torch.long)]
        self.head = nn.Linear(hidden, rows.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(rows)
            # The oracle's last layer, with its output projections zeroed: the identity at first.
            self.layer.load_state_dict(decoder.layers[-1].state_dict())
            self.layer.self_attn.o_proj.weight.zero_()
            self.layer.mlp.down_proj.weight.zero_()
            self.fuse.weight.zero_()
            self.fuse.weight[:, hidden:].copy_(torch.eye(hidden))
            self.fuse.bias.zero_()
        self.head.weight.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """What distillation trains and the artifact stores; the embedding and head come from the oracle."""
        return {
            name: param
            for name, param in self.named_parameters()
            if name.startswith(("fuse.", "layer."))
        }

    def forward(
        self,
        features: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None = None,
        logits: Literal["all", "last", "none"] = "all",
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features [B, T, H] at positions [B, T], next_ids [B, T] the tokens after them.

        Returns (g [B, T, H] the predicted next features, the head's logits: [B, T, head vocab] for
        "all", [B, 1, head vocab] for the last position only, None for "none"). The head is most
        of a step's weights, so callers that read fewer rows ask for fewer. `mask`: a [B, 1, T, cached + T]
        bool attention mask (True: may attend) in place of the causal one, for draft trees.
        """
        x = self.fuse(torch.cat([self.embed(next_ids), features.to(self.embed.weight.dtype)], dim=-1))
        if mask is None:
            mask = create_causal_mask(
                config=self.config, inputs_embeds=x, attention_mask=None, past_key_values=cache, position_ids=positions
            )
        x = self.layer(
            x,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=self.rotary(x, position_ids=positions),
        )
        if logits == "none":
            return x, None
        return x, self.head(x if logits == "all" else x[:, -1:])


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


# The conversions below run on a worker's event loop, so they use numpy rather than torch: a torch
# op on a large tensor there would start a second team of OpenMP threads in the process, which
# slows every op of the model thread (specd/local.py).
def features_to_bytes(rows: torch.Tensor) -> bytes:
    """[n, H] float tensor -> the wire format (float16, little-endian, row-major)."""
    rows = rows.detach()
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float16):
        rows = rows.to("cpu", torch.float32)
    return np.ascontiguousarray(rows.numpy(), dtype=WIRE_DTYPE).tobytes()


def features_from_bytes(data: bytes, rows: int, dim: int) -> torch.Tensor:
    """The wire format -> [rows, dim] float32 tensor, with a clear error when the sizes disagree."""
    if rows < 0 or dim <= 0 or len(data) != rows * dim * 2:
        raise InvalidArgument(f"features payload of {len(data)} bytes does not hold {rows} rows of width {dim}")
    if not rows:
        return torch.zeros(0, dim)
    return torch.from_numpy(np.frombuffer(data, dtype=WIRE_DTYPE).reshape(rows, dim).astype(np.float32))
