"""A draft that reads the oracle's features: one decoder layer over the oracle's last hidden states.

A standalone draft must rebuild everything the oracle knows from tokens alone, which a small
model does poorly. This draft instead conditions on the oracle's own final hidden state (the
vector its output head reads), which the oracle computes anyway while verifying and returns
with each verdict (specd.v1 `Features`, a few KB per round; specd.runtime.feature_session feeds them). The idea is EAGLE's (Li et al.,
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

A draft may read more of the oracle than its final state (`feature_layers`, EAGLE-3's idea: Li et
al., 2025): the hidden states after a low, a middle and the last layer, concatenated, which a
`reduce` projection maps to one feature. The layers are numbered as transformers' hidden states
are: 0 the embeddings, i the output of decoder layer i, N (the oracle's layer count) the final
state after its norm, which is what a draft reads when `feature_layers` is empty. Such a draft's
own output g is fed back where the reduced feature went, so it need not be the oracle's
feature: it carries its own norm before the head (`head_norm`), and training judges it by the
tokens it leads to alone (specd.training.features). `reduce` starts as the identity on the last
listed layer, so with N among the layers such a draft too begins from today's starting point.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from specd.core import validation
from specd.core.errors import InvalidArgument


class FeatureDraftModel(nn.Module):
    """fuse [embed(token); feature] -> one decoder layer of the oracle's kind -> head (reduce: several of the
    oracle's hidden states to one feature first; norm: before the head)."""

    # specd.kernels.int8_linear keeps `fuse` in float: its input joins an embedding and a feature of very
    # different scales, which one int8 scale per block cannot both resolve (acceptance fell with it). `reduce`
    # joins hidden states of several layers, whose scales differ as much.
    int8_exempt = ("fuse", "reduce")

    def __init__(
        self, oracle: nn.Module, head_token_ids: list[int] | None, feature_layers: tuple[int, ...] = (),
        head_norm: bool = False,
    ):
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
        self.feature_layers = validation.feature_layers(feature_layers, oracle.config.num_hidden_layers, True)
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
        self.reduce: nn.Linear | None = None
        if self.reads > 1:
            self.reduce = nn.Linear(self.reads * hidden, hidden, bias=False)
            with torch.no_grad():
                self.reduce.weight.zero_()
                self.reduce.weight[:, -hidden:].copy_(torch.eye(hidden))
        self.norm: nn.Module | None = None
        if head_norm:
            self.norm = type(decoder.norm)(hidden, eps=config.rms_norm_eps)  # weight ones: the head's argmax unchanged

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def reads(self) -> int:
        """How many of the oracle's hidden states a real feature joins."""
        return max(1, len(self.feature_layers))

    @property
    def feature_width(self) -> int:
        """The width of the oracle's features this draft reads: its hidden size per layer read."""
        return self.reads * self.hidden_size

    def feature_input(self, features: torch.Tensor) -> torch.Tensor:
        """A position's feature as the fuse reads it [..., H]: the oracle's (feature_width wide, reduced when it
        joins several layers) or the draft's own g (H wide)."""
        width = features.shape[-1]
        if width == self.hidden_size:
            return features
        if self.reduce is None or width != self.feature_width:
            raise InvalidArgument(
                f"features have width {width}; this draft reads {self.feature_width} (or its own {self.hidden_size})"
            )
        return self.reduce(features.to(self.reduce.weight.dtype))

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """The head's logits for predicted features g [..., H]."""
        return self.head(g if self.norm is None else self.norm(g))

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """What distillation trains and the artifact stores; the embedding and head come from the oracle."""
        return {
            name: param
            for name, param in self.named_parameters()
            if name.startswith(("fuse.", "layer.", "reduce.", "norm."))
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
        features = self.feature_input(features)
        x = self.fuse(torch.cat([self.embed(next_ids), features.to(self.embed.weight.dtype)], dim=-1))
        if mask is None:
            mask = create_causal_mask(
                config=self.config, inputs_embeds=x, attention_mask=None, cache=cache, position_ids=positions
            )
        x = self.layer(
            x,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=self.rotary(x, position_ids=positions),
        )
        if logits == "none":
            return x, None
        return x, self.logits(x if logits == "all" else x[:, -1:])

