"""One forward pass over the rows of several sessions: the step of continuous batching.

The rows of every session in a step are packed into one sequence, [1, N], and go through the
model once: embeddings, the linear layers and the norms see all N rows together, which is where
a CPU or a GPU gains from batching. Attention is the only part that mixes rows, and there each
session's rows attend only to that session's own keys and values (its KV cache, specd.runtime.kv)
and under its own mask: causal for a chain or a prompt chunk, its tree mask for a draft tree.
Rows carry their own absolute positions, so rotary embeddings are each session's.

Each session's attention is the same call, on the same tensors, as when it runs alone, and under
a plan whose linear layers give a row the same result whatever the other rows
(specd.kernels.cpu_linear, "onednn", the default on x86), a session's rows in a batched pass are
bit for bit what they are in a pass of its own. This is how vLLM's flattened batches work
(varlen attention over per-request KV), in plain torch.

A session serving a feature draft asks for hidden states besides the final one (`Segment.feature_layers`,
numbered as transformers' output_hidden_states: 0 the embeddings, i the output of decoder layer i, N the
final state after the norm); the pass keeps those of its rows, as computed in this very pass, so they too
are a row's own whatever the other rows. A pass in which nobody asks keeps nothing.

Supported for llama-style decoders (embed_tokens, rotary_emb, layers, norm; `PACKED_MODEL_TYPES`);
other models run one session per pass. The feature draft (specd.models.feature_draft) packs its
one layer the same way (specd.runtime.draft_pass), through `PackedPass`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specd.kernels.attention import row_exact_attention, rows_keys_of

PACKED_ATTENTION = "specd_packed"
PACKED_MODEL_TYPES = ("llama",)
_INNER = "_specd_inner_attention"  # the config attribute keeping the attention the packed one wraps
ROW_EXACT = "_specd_row_exact_attention"  # the config attribute: packed passes attend row by row


@dataclass
class Segment:
    """One session's rows in a pass."""

    cache: DynamicCache  # the session's own KV cache; the pass appends these rows to it
    tokens: list[int]
    positions: list[int]  # each row's absolute position (a tree's rows: by depth)
    tree_mask: torch.Tensor | None = None  # [n, n] bool: which of this pass's rows a row sees; None: causal
    # [n, cached + n] bool: which cached positions and rows each row sees, in place of the above (a feature
    # draft's tree, whose rows see only their ancestors among the speculative positions already cached)
    attend: torch.Tensor | None = None
    # The hidden states to keep (transformers' output_hidden_states numbering; N: the final state after the
    # norm); empty: none beyond the final one, which every pass returns.
    feature_layers: tuple[int, ...] = ()
    # Filled by the pass for a segment with feature_layers: [n, H * len(feature_layers)], those states side by
    # side in the order asked.
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PackedPass:
    """The layout of one packed pass: each segment's rows in the sequence, its mask, and during the pass,
    per layer, each segment's keys and values."""

    segments: list[Segment]
    ids: torch.Tensor  # [1, N] every segment's tokens, in order
    positions: torch.Tensor  # [1, N] their absolute positions
    bounds: list[tuple[int, int]] = field(default_factory=list)  # each segment's rows in the packed sequence
    masks: list[torch.Tensor | None] = field(default_factory=list)  # each segment's [1, 1, n, L] mask, per pass
    rows_keys: list[list[Any]] = field(default_factory=list)  # each segment's rows' keys (row-exact attention)
    states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # layer -> per segment
    taps: frozenset[int] = frozenset()  # decoder layers (1-based) whose output some segment keeps
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # hidden-state index -> the packed rows [N, H]

    @classmethod
    def of(cls, segments: list[Segment], device: torch.device) -> PackedPass:
        ids = torch.tensor([[t for s in segments for t in s.tokens]], dtype=torch.long, device=device)
        positions = torch.tensor([[p for s in segments for p in s.positions]], dtype=torch.long, device=device)
        batch = cls(segments, ids, positions)
        start = 0
        for segment in segments:
            if not len(segment):
                raise ValueError("a segment needs at least one row")
            batch.bounds.append((start, start + len(segment)))
            batch.masks.append(_segment_mask(segment, segment.cache.get_seq_length(), device))
            start += len(segment)
        return batch

    def layers(self, layers: Any, hidden: torch.Tensor, position_embeddings: Any, lean: bool = False) -> torch.Tensor:
        """Run `hidden` [1, N, H] through decoder layers that use packed attention; each session's cache
        then holds its rows. `lean`: llama layers that attend row by row (`use_row_exact_attention`), through
        `_llama_layers` rather than their own forward (the same bits)."""
        cache = _PackedCache(self)
        if lean:
            return _llama_layers(self, cache, layers, hidden, position_embeddings)
        for number, layer in enumerate(layers, 1):
            hidden = layer(
                hidden, attention_mask=None, position_embeddings=position_embeddings, position_ids=self.positions,
                cache=cache, use_cache=True, specd_batch=self,
            )
            if number in self.taps:
                self.kept[number] = hidden[0]
        return hidden

    def keep(self, index: int, hidden: torch.Tensor) -> None:
        """Keep the hidden state `index` ([1, N, H]) where some segment asks for it."""
        if any(index in segment.feature_layers for segment in self.segments):
            self.kept[index] = hidden[0]

    def gather_features(self) -> None:
        """Fill each asking segment's `features` from the states kept during the pass."""
        for segment, (start, end) in zip(self.segments, self.bounds):
            if segment.feature_layers:
                segment.features = torch.cat([self.kept[i][start:end] for i in segment.feature_layers], dim=-1)

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Packed rows [N, ...] as each segment's."""
        return [rows[a:b] for a, b in self.bounds]


class _PackedCache:
    """Stands in for a transformers Cache during a packed pass: each segment's keys and values go into its
    session's own cache, and the attention function reads them back from there."""

    def __init__(self, batch: PackedPass):
        self.batch = batch

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        segments = self.batch.segments
        if len(segments) == 1:  # a pass of one session: no slicing
            self.batch.states[layer_idx] = [segments[0].cache.update(key_states, value_states, layer_idx)]
        else:
            self.batch.states[layer_idx] = [
                segment.cache.update(key_states[:, :, start:end], value_states[:, :, start:end], layer_idx)
                for segment, (start, end) in zip(segments, self.batch.bounds)
            ]
        return key_states, value_states


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A float32 llama RMSNorm in one call: the bits of its module's several (tests/unit/test_engine.py)."""
    return nn.functional.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _llama_layers(
    batch: PackedPass, cache: _PackedCache, layers: Any, hidden: torch.Tensor, position_embeddings: Any
) -> torch.Tensor:
    """transformers' llama decoder layers, op for op (the same arithmetic, bit for bit: tests/unit/test_engine.py),
    without the keyword plumbing, decorators and attention lookup around each call, which took about 2 of the
    default oracle's 13 ms per one-token step; attention row by row."""
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for number, layer in enumerate(layers, 1):
        attn, mlp = layer.self_attn, layer.mlp
        residual = hidden
        normed = _rms_norm(layer.input_layernorm, hidden)
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        query = attn.q_proj(normed).view(shape).transpose(1, 2)
        key = attn.k_proj(normed).view(shape).transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        query = (query * cos) + (_rotate_half(query) * sin)
        key = (key * cos) + (_rotate_half(key) * sin)
        cache.update(key, value, attn.layer_idx)
        out = _row_exact(batch, attn, query, attn.scaling)
        hidden = residual + attn.o_proj(out.reshape(*normed.shape[:-1], -1).contiguous())
        residual = hidden
        normed = _rms_norm(layer.post_attention_layernorm, hidden)
        hidden = residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        if number in batch.taps:
            batch.kept[number] = hidden[0]
    return hidden


def _segment_mask(segment: Segment, cached: int, device: torch.device) -> torch.Tensor | None:
    """[1, 1, n, cached + n] bool (True: may attend), or None for a single row (it sees the whole cache)."""
    if segment.attend is not None:
        return segment.attend.to(device)[None, None]
    n = len(segment)
    if n == 1 and segment.tree_mask is None:
        return None
    mask = torch.ones(n, cached + n, dtype=torch.bool, device=device)
    own = segment.tree_mask.to(device) if segment.tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
    mask[:, cached:] = own.to(device)
    return mask[None, None]


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface. In a packed pass: each segment's queries against its own cache,
    through the attention the model used before (its `_INNER` implementation); otherwise that attention alone."""
    batch: PackedPass | None = kwargs.pop("specd_batch", None)
    inner = ALL_ATTENTION_FUNCTIONS[getattr(module.config, _INNER)]
    if batch is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    if getattr(module.config, ROW_EXACT, False):
        return _row_exact(batch, module, query, kwargs.get("scaling")), None
    states = batch.states[module.layer_idx]
    if len(states) == 1:  # a pass of one session: its attention as it is
        (keys, values), = states
        return inner(module, query, keys, values, batch.masks[0], **kwargs)
    outputs = []
    for index, (start, end) in enumerate(batch.bounds):
        keys, values = batch.states[module.layer_idx][index]
        out, _ = inner(module, query[:, :, start:end], keys, values, batch.masks[index], **kwargs)
        outputs.append(out)  # [1, n, heads, head_dim]
    return torch.cat(outputs, dim=1), None


def _row_exact(batch: PackedPass, module: nn.Module, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    if not batch.rows_keys:
        batch.rows_keys = [rows_keys_of(mask, len(segment)) for segment, mask in zip(batch.segments, batch.masks)]
    outputs = []
    for (keys, values), rows_keys, (start, end) in zip(batch.states[module.layer_idx], batch.rows_keys, batch.bounds):
        outputs.append(row_exact_attention(query[:, :, start:end], keys, values, rows_keys, scaling))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def use_row_exact_attention(model: nn.Module, on: bool = True) -> None:
    """Packed passes of `model` attend row by row (specd.kernels.attention.row_exact_attention), so that a row's
    result is bit for bit the same in a verify block, in a batch, in a prompt chunk and alone."""
    setattr(model.config, ROW_EXACT, on)


def use_packed_attention(model: nn.Module) -> bool:
    """Let `model` run packed passes; returns whether it can. Its unpacked forward is unchanged. `model` is a
    transformers model, or a plain module holding a model's layers and config (the feature draft)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") not in PACKED_MODEL_TYPES:
        return False
    current = getattr(config, "_attn_implementation", None)
    if current == PACKED_ATTENTION:
        return True
    if current is None or "sdpa" not in current:
        return False  # the masks built here are SDPA's (boolean)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    setattr(config, _INNER, current)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(PACKED_ATTENTION)
    else:
        config._attn_implementation = PACKED_ATTENTION
    return True


@torch.inference_mode()
def packed_forward(model: nn.Module, segments: list[Segment]) -> list[torch.Tensor]:
    """Run every segment's rows through the decoder in one pass; returns each segment's final hidden states
    [n, H] (what the output head reads), and fills the `features` of segments that ask for hidden states. Each
    session's cache then holds its rows."""
    if getattr(model.config, "_attn_implementation", None) != PACKED_ATTENTION:
        raise ValueError("packed passes need use_packed_attention(model) first")
    decoder = model.get_decoder()
    layers = model.config.num_hidden_layers
    batch = PackedPass.of(segments, decoder.embed_tokens.weight.device)
    asked = {i for segment in segments for i in segment.feature_layers}
    batch.taps = frozenset(i for i in asked if 0 < i < layers)
    hidden = decoder.embed_tokens(batch.ids)
    if asked:
        batch.keep(0, hidden)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=batch.positions)
    hidden = batch.layers(
        decoder.layers[:layers], hidden, position_embeddings, lean=getattr(model.config, ROW_EXACT, False),
    )
    hidden = decoder.norm(hidden)
    if asked:
        batch.keep(layers, hidden)
        batch.gather_features()
    return batch.split(hidden[0])  # [n, H] each


def joined_hidden_states(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...]) -> torch.Tensor:
    """A decoder's output_hidden_states ([1, n, H] each) as a segment's features [n, H * len(layers)]: the
    unpacked passes' counterpart of `Segment.features`."""
    return torch.cat([hidden_states[i][0] for i in layers], dim=-1)
