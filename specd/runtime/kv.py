"""A model's KV cache for one session, with rollback to the committed prefix.

Both workers keep the same invariant: the cache holds every committed token except the
last one, which is fed at the start of the next forward pass. After a round, `sync` crops
the cache to the longest common prefix of what it holds and the committed sequence, so a
rejected suffix is dropped without recomputing the prompt.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specd.core import tree
from specd.runtime.batch import ROW_EXACT, Segment, joined_hidden_states, packed_forward

# Room a layer's buffers keep beyond what they hold: at least this many positions, or a quarter more.
SPARE_POSITIONS = 256


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values live in buffers with room to spare.

    transformers' DynamicLayer appends by concatenation, which copies the layer's whole cache on
    every forward pass (twice per layer: keys and values). Here a pass writes its positions into
    the spare room, and `keys`/`values` are views of the filled part; only when the room runs out
    are the buffers replaced by larger ones (a quarter more than needed, at least SPARE_POSITIONS),
    so copies are rare. Cropping just moves the end. The views hold the same numbers as the
    concatenated tensors would, so attention computes the same."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._key_buffer is None or self._value_buffer is None or end > self._key_buffer.shape[-2]:
            room = end + max(SPARE_POSITIONS, end // 4)
            self._key_buffer = self._grown(self._key_buffer, key_states, room)
            self._value_buffer = self._grown(self._value_buffer, value_states, room)
        self._key_buffer[..., self.length : end, :].copy_(key_states)
        self._value_buffer[..., self.length : end, :].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def _grown(self, buffer: torch.Tensor | None, states: torch.Tensor, room: int) -> torch.Tensor:
        grown = states.new_empty((*states.shape[:-2], room, states.shape[-1]))
        if buffer is not None and self.length:
            grown[..., : self.length, :].copy_(buffer[..., : self.length, :])
        return grown

    def _set_length(self, length: int) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.length = length
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized and self._key_buffer is not None:
            self._set_length(max(0, self.length + tokens_to_remove))

    def keep(self, start: int, rows: list[int]) -> None:
        """Keep positions [0, start) and then the positions start + r for r in rows, in that order;
        drop the rest (what a verified draft tree leaves: its accepted path)."""
        if not self.is_initialized or self._key_buffer is None or self._value_buffer is None:
            return
        index = torch.tensor([start + r for r in rows], dtype=torch.long, device=self._key_buffer.device)
        for buffer in (self._key_buffer, self._value_buffer):
            buffer[..., start : start + len(rows), :] = buffer.index_select(-2, index)
        self._set_length(start + len(rows))

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self.length = 0
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a session cache holds one sequence")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a session cache holds one sequence")


class SessionCache(DynamicCache):
    """A DynamicCache of GrowingLayer: appending a forward pass's positions copies no earlier ones."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer

    def keep(self, start: int, rows: list[int]) -> None:
        """GrowingLayer.keep on every layer."""
        for layer in self.layers:
            layer.keep(start, rows)


class KVSession:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.cache = SessionCache()
        self.cached_ids: list[int] = []  # tokens whose keys/values the cache holds, in order
        self.forward_passes = 0

    @property
    def cached_length(self) -> int:
        return len(self.cached_ids)

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones; returns logits [len(token_ids), vocab]."""
        input_ids = self._input(token_ids)
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True)
        self._fed(token_ids)
        return out.logits[0].float()  # [n, vocab]

    @torch.inference_mode()
    def prefill(
        self, token_ids: list[int], *, features: bool = False, feature_layers: tuple[int, ...] = ()
    ) -> torch.Tensor | None:
        """Feed tokens whose next-token logits nobody reads (a prompt): the decoder alone, no output
        head, which on a large vocabulary is a sizeable part of a long prefill. Returns, when `features`,
        the final hidden states [n, H], or with `feature_layers` those hidden states side by side
        [n, H * len(feature_layers)]; else None."""
        layers = feature_layers if features else ()
        if getattr(self.model.config, ROW_EXACT, False):  # as an engine's prompt chunks run, row for row
            start = self.cached_length
            segment = Segment(self.cache, token_ids, list(range(start, start + len(token_ids))), feature_layers=layers)
            (rows,) = packed_forward(self.model, [segment])
            self._fed(token_ids)
            if not features:
                return None
            return segment.features if layers else rows
        input_ids = self._input(token_ids)
        out = self.model.get_decoder()(
            input_ids=input_ids, cache=self.cache, use_cache=True, output_hidden_states=bool(layers)
        )
        self._fed(token_ids)
        if not features:
            return None
        return joined_hidden_states(out.hidden_states, layers) if layers else out.last_hidden_state[0]

    @torch.inference_mode()
    def forward_tree(
        self, feed: list[int], tokens: list[int], parents: list[int], *, features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed `feed` (tokens of the sequence after the cached ones), then a draft tree (specd.core.tree) in
        the same pass. Returns logits [len(feed) + k, vocab] and, with `features`, the final hidden
        states [len(feed) + k, H]. The cache then holds every fed row; `keep_path` keeps the accepted ones."""
        context = self.cached_length
        mask = tree.attention_mask(parents, context, len(feed), self.device)
        positions = tree.position_ids(parents, context, len(feed), self.device)
        hidden = self.model.get_decoder()(
            input_ids=self._input(feed + tokens), attention_mask=mask, position_ids=positions,
            cache=self.cache, use_cache=True,
        ).last_hidden_state  # [1, n, H]
        logits = self.model.get_output_embeddings()(hidden)
        self._fed(feed + tokens)
        return logits[0].float(), hidden[0] if features else None

    @torch.inference_mode()
    def keep_path(self, tree_start: int, tokens: list[int], path: list[int]) -> None:
        """After forward_tree: keep the cached rows before the tree (tree_start of them), then the
        tree's rows on `path`, in order, as if that chain alone had been fed."""
        self.cache.keep(tree_start, path)
        del self.cached_ids[tree_start:]
        self.cached_ids.extend(tokens[i] for i in path)

    @torch.inference_mode()
    def load_prefix(self, tokens: list[int] | tuple[int, ...], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start an empty session from stored keys and values (per layer, [..., len(tokens), head_dim];
        copied in, as a prefill of `tokens` would have written them)."""
        if self.cached_ids:
            raise ValueError("a prefix loads into an empty session only")
        for index, (keys, values) in enumerate(layers):
            self.cache.update(keys.to(self.device), values.to(self.device), index)
        self.cached_ids = list(tokens)

    def layer_states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of the cached positions (views, not copies)."""
        return [(layer.keys, layer.values) for layer in self.cache.layers if layer.is_initialized]

    def _input(self, token_ids: list[int]) -> torch.Tensor:
        if not token_ids:
            raise ValueError("forward needs at least one token")
        return torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]

    def record_fed(self, token_ids: list[int]) -> None:
        """Note tokens whose keys and values a pass run elsewhere (specd.runtime.batch) appended to the cache."""
        self._fed(token_ids)

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
