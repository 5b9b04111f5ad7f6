"""Grouped-query attention for blocks of several tokens without copying the KV cache.

In a model with grouped-query attention (the default oracle has 9 query heads over 3 key/value
heads) transformers' SDPA path copies every key and value head once per query head it serves
(`repeat_kv`) whenever a forward pass of more than one token comes with a mask, which a verify
block over a KV cache always does. That copy is the whole cache, twice per layer, per verify,
so its cost grows with the context (measured: docs/design.md, "Verify blocks attend on the
key/value heads").

`grouped_sdpa` instead folds each key/value head's query heads into one: queries
[B, KV * G, n, D] are read as [B, KV, G * n, D] (query head h belongs to key/value head
h // G, as in `repeat_kv`), the [B, 1, n, L] mask is repeated G times along the query rows, and
one attention call runs on the key/value heads as they are. Every query row sees the same keys,
values and mask as before, so each row is the same computation; only the cache copy is gone.
Calls it does not cover (one token, no mask, per-head masks, position biases) go to
transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUPED_SDPA = "specd_grouped_sdpa"


def grouped_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: SDPA over the key/value heads for multi-token blocks."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, rows, dim = query.shape
    covered = (
        groups > 1
        and rows > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and key.shape[1] * groups == heads
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and kwargs.get("cache") is None
    )
    if not covered:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    folded = query.reshape(batch, heads // groups, groups * rows, dim)
    out = nn.functional.scaled_dot_product_attention(
        folded,
        key,
        value,
        attn_mask=attention_mask.repeat(1, 1, groups, 1),
        dropout_p=dropout,
        scale=scaling,
    )
    return out.reshape(batch, heads, rows, value.shape[-1]).transpose(1, 2).contiguous(), None


def row_exact_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows_keys: list[int | torch.Tensor | None],
    scaling: float | None,
) -> torch.Tensor:
    """Attention in which each query row's result is the same whatever other rows its pass holds.

    query [1, H, n, D]; key and value [1, KV, L, D] (H = KV * G, query head h reading key/value head h // G);
    rows_keys[j]: the keys row j sees: a count (the first m), an index tensor (a tree row's own), or None (all L).
    Each row is one SDPA call on the key/value heads, its G query heads as G query rows, over exactly its own
    keys: the very call a one-token step over a cache of those keys makes. torch's CPU attention gives a row of
    a block other last bits than that row alone (it blocks its sums by the block's shape), so a verified token
    would not get the logits of its one-token step. Returns [1, n, H, D].
    """
    _, heads, rows, _ = query.shape
    out = row_exact_rows(query[0].transpose(0, 1), key, value, rows_keys, scaling)
    return out.view(1, rows, heads, value.shape[-1])


def row_exact_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows_keys: list[int | torch.Tensor | None],
    scaling: float | None,
) -> torch.Tensor:
    """`row_exact_attention` for queries laid out by row: query [n, H, D] -> [n, H * Dv], each row the same call
    on the same numbers (its G query heads as G query rows of its key/value heads)."""
    rows, heads, dim = query.shape
    kv_heads = key.shape[1]
    outputs = []
    for j, keys in enumerate(rows_keys):
        if keys is None:
            k, v = key, value
        elif isinstance(keys, int):
            k, v = key[:, :, :keys], value[:, :, :keys]
        else:
            k, v = key.index_select(2, keys), value.index_select(2, keys)
        row = query[j].view(1, kv_heads, heads // kv_heads, dim)
        outputs.append(nn.functional.scaled_dot_product_attention(row, k, v, scale=scaling).reshape(1, -1))
    return outputs[0] if rows == 1 else torch.cat(outputs, dim=0)


def rows_keys_of(mask: torch.Tensor | None, rows: int) -> list[int | torch.Tensor | None]:
    """Per row, the keys a boolean mask [1, 1, n, L] lets it see, as `row_exact_attention` takes them: a count
    where they are the first m, their indices otherwise; None for one row and no mask (all of them)."""
    if mask is None:
        return [None] * rows
    out: list[int | torch.Tensor | None] = []
    for row in mask[0, 0]:
        seen = int(row.sum())
        out.append(seen if bool(row[:seen].all()) else torch.nonzero(row).flatten())
    return out


def _register() -> None:
    """Make the name known to transformers (registering again replaces the entry with itself)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks SDPA takes


def use_grouped_attention(model: nn.Module) -> bool:
    """Switch a CPU model that uses transformers' SDPA attention with grouped key/value heads to
    `grouped_sdpa`; returns whether it did. Other models are left as they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", 0)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads == heads:
        return False
    if any(p.device.type != "cpu" for p in model.parameters()):
        return False
    _register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(GROUPED_SDPA)
    else:  # a plain module holding a model's layers and config (the feature draft)
        config._attn_implementation = GROUPED_SDPA
    log.info("grouped attention for multi-token blocks: %d query heads over %d key/value heads", heads, kv_heads)
    return True
