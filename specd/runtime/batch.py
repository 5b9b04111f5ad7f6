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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specd.kernels.attention import row_exact_attention, row_exact_rows, rows_keys_of
from specd.kernels.cpu_linear import GroupedLinear
from specd.kernels.weights import PlannedLinear

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


def _rows_product(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer's y = x W^T + b for 2-D float inputs [rows, in], by its shortest route: a weights plan's
    product itself, or the module."""
    return module.product if isinstance(module, PlannedLinear) else module


def _joined_product(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The outputs of linear layers that read one input, side by side: their FusedGroup's one product when they
    are its members in order, else each layer's, joined (the same bits either way: a group's product is its
    members' stacked)."""
    groups = {id(getattr(m, "group", None)) for m in modules}
    if all(isinstance(m, GroupedLinear) for m in modules) and len(groups) == 1:
        group = modules[0].group
        if [m.member for m in modules] == list(range(len(group.sizes))):
            return group.joined
    products = [_rows_product(m) for m in modules]
    return lambda rows: torch.cat([product(rows) for product in products], dim=-1)


@dataclass
class _LlamaParts:
    """One llama decoder layer's weights and products, reached directly (`_llama_layers`)."""

    source: tuple[nn.Module, ...]  # the modules read, to see that they are still the layer's
    input_norm: tuple[torch.Tensor, float]
    post_norm: tuple[torch.Tensor, float]
    qkv: Callable[[torch.Tensor], torch.Tensor]  # [n, H] -> [n, (heads + 2 * kv_heads) * head_dim]
    o: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]  # [n, H] -> [n, 2 * intermediate]
    down: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    scaling: float
    layer_idx: int

    @classmethod
    def of(cls, layer: nn.Module) -> _LlamaParts:
        modules, attn_modules, mlp_modules = layer._modules, layer.self_attn._modules, layer.mlp._modules
        source = (
            modules["input_layernorm"], modules["post_attention_layernorm"], *attn_modules.values(),
            *mlp_modules.values(),
        )
        parts = layer.__dict__.get("_specd_parts")
        if parts is not None and parts.source == source:  # the same modules (a plan may swap them)
            return parts
        attn, mlp = layer.self_attn, layer.mlp
        config = attn.config
        parts = cls(
            source=source,
            input_norm=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
            post_norm=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
            qkv=_joined_product([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=_rows_product(attn.o_proj),
            gate_up=_joined_product([mlp.gate_proj, mlp.up_proj]),
            down=_rows_product(mlp.down_proj),
            act=mlp.act_fn,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            intermediate=mlp.gate_proj.out_features,
            scaling=attn.scaling,
            layer_idx=attn.layer_idx,
        )
        layer.__dict__["_specd_parts"] = parts
        return parts


def _rms_norm(hidden: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """A float32 llama RMSNorm in one call: the bits of its module's several (tests/unit/test_engine.py)."""
    weight, eps = norm
    return nn.functional.rms_norm(hidden, weight.shape, weight, eps)


def _llama_layers(
    batch: PackedPass, cache: _PackedCache, layers: Any, hidden: torch.Tensor, position_embeddings: Any
) -> torch.Tensor:
    """transformers' llama decoder layers, op for op (the same arithmetic, bit for bit: tests/unit/test_engine.py),
    attention row by row, in as few calls as that arithmetic allows: each layer's products reached directly
    (`_LlamaParts`), rotary embeddings on the queries and keys together, rows kept 2-D [N, H]. A one-token step
    of the default oracle is some 1,800 small torch calls; each one saved is a few microseconds of every token."""
    cos, sin = position_embeddings  # [1, N, D] each
    half = cos.shape[-1] // 2
    cos = cos[0].unsqueeze(1)  # [N, 1, D]
    # rotate_half(x) * sin == cat(x2, x1) * sin_signed bit for bit: negating a factor negates its product exactly
    sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).unsqueeze(1)
    rows = hidden.shape[1]
    hidden = hidden[0]
    for number, layer in enumerate(layers, 1):
        parts = _LlamaParts.of(layer)
        heads, kv_heads, dim = parts.heads, parts.kv_heads, parts.head_dim
        residual = hidden
        joined = parts.qkv(_rms_norm(hidden, parts.input_norm))
        qk = joined[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
        turned = torch.cat((qk[..., half:], qk[..., :half]), dim=-1)
        qk = (qk * cos) + (turned * sin_signed)
        key = qk[:, heads:].transpose(0, 1).unsqueeze(0)  # [1, KV, N, D], as caches take them
        value = joined[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim).transpose(0, 1).unsqueeze(0)
        cache.update(key, value, parts.layer_idx)
        out = _row_exact_rows(batch, parts, qk[:, :heads])
        hidden = residual + parts.o(out)
        residual = hidden
        gate, up = parts.gate_up(_rms_norm(hidden, parts.post_norm)).split(parts.intermediate, dim=-1)
        hidden = residual + parts.down(parts.act(gate) * up)
        if number in batch.taps:
            batch.kept[number] = hidden
    return hidden.unsqueeze(0)


def _row_exact_rows(batch: PackedPass, parts: _LlamaParts, query: torch.Tensor) -> torch.Tensor:
    """Row-by-row attention for the lean layers: query [N, heads, D] -> [N, heads * D]."""
    if not batch.rows_keys:
        batch.rows_keys = [rows_keys_of(mask, len(segment)) for segment, mask in zip(batch.segments, batch.masks)]
    outputs = [
        row_exact_rows(query[start:end], keys, values, rows_keys, parts.scaling)
        for (keys, values), rows_keys, (start, end) in zip(
            batch.states[parts.layer_idx], batch.rows_keys, batch.bounds
        )
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


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
