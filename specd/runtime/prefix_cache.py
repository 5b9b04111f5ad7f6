"""A worker's cache of keys and values for prompt prefixes that sessions have already prefilled.

Requests often share their beginning: every chat request of an application carries the same
system prompt, and each turn of a conversation repeats the turns before it. A session that opens
on a prompt whose first tokens an earlier session prefilled copies those positions' keys and
values (and, for an oracle serving a feature draft, their final hidden states) instead of
computing them again, and prefills only the rest.

Prefixes are kept in whole blocks of BLOCK tokens. Each entry holds one prompt's first n
positions (n a multiple of BLOCK) and is found through the hash of each of its block boundaries,
so a new prompt finds the longest cached prefix it shares with any entry, even one that ran on
past where the two part. A hit is checked against the entry's tokens, never trusted on the hash
alone. The least recently used entries go first once the cache holds more than its capacity in
positions. Copies in and out keep entries independent of the sessions' own caches, which grow,
roll back and rewrite positions in place.

Entries belong to a namespace, the coordinator's partition of the cache per tenant (and per request
`cache_salt`): the block hashes start from it and a hit must match it, so a prompt finds only what
its own tenant stored, and a reply's count of cached prompt positions says nothing about other
tenants' prompts.

An entry's features are the hidden states its session asked for: the final ones, or several layers'
side by side (`feature_layers`, specd.runtime.batch). Entries of several layers go in a partition of
their own per choice of layers (its hashes start from the layers too), so a prompt gets features of
the layers it asked for or none; sessions without features share the entries of final states only.

Only prefills are stored, never the positions a session generated (those were computed in
verification blocks). Where the model's layers give each row of a forward pass the same result
whatever the other rows (specd/kernels/cpu_linear.py, "onednn", the default on x86), a prompt
opened on a cached prefix then holds bit for bit the keys and values a prefill of the whole
prompt computes, so a seeded request writes the same tokens with or without a hit. Positions
computed in verify blocks come from passes of other shapes than a prefill's, which that guarantee
does not cover, so they are not stored (measured: docs/design.md, "Sessions and the prefix
cache").
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

BLOCK = 8


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]  # the prefix, a whole number of blocks
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [..., len(tokens), head_dim]
    # [len(tokens), H] final hidden states, or [len(tokens), H * len(feature_layers)], where the session had them
    features: torch.Tensor | None = None
    hashes: list[bytes] = field(default_factory=list)  # the hash of each block boundary, first block first
    namespace: str = ""  # the partition it belongs to (a tenant's): only prompts of the same one find it
    feature_layers: tuple[int, ...] = ()  # the hidden states its features join; (): the final ones (or no features)


@dataclass(frozen=True)
class PrefixHit:
    entry: PrefixEntry
    length: int  # positions of the entry the prompt shares, a multiple of BLOCK


def block_hashes(
    tokens: list[int] | tuple[int, ...], blocks: int, namespace: str = "", feature_layers: tuple[int, ...] = ()
) -> list[bytes]:
    """The hash of each of the first `blocks` block boundaries: each chains the one before, the first the
    namespace (and the feature layers, where there are any), so partitions never share a hash."""
    hashes: list[bytes] = []
    previous = namespace.encode()
    if feature_layers:
        previous = hashlib.blake2b(
            previous + b"\0" + b"".join(i.to_bytes(4, "little") for i in feature_layers), digest_size=16
        ).digest()
    for b in range(blocks):
        chunk = tokens[b * BLOCK : (b + 1) * BLOCK]
        previous = hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixCache:
    def __init__(self, capacity_tokens: int):
        self.capacity_tokens = capacity_tokens
        self.entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # id -> entry, least recently used first
        self.index: dict[bytes, int] = {}  # block boundary hash -> id of the entry that holds it
        self.tokens_held = 0
        self._next_id = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_tokens >= BLOCK

    def lookup(
        self, tokens: list[int], *, features: bool = False, namespace: str = "", feature_layers: tuple[int, ...] = ()
    ) -> PrefixHit | None:
        """The longest cached prefix of `tokens` stored in `namespace`, in whole blocks (with features: only entries
        that have them, of `feature_layers`)."""
        if not self.enabled:
            return None
        layers = feature_layers if features else ()
        hashes = block_hashes(tokens, len(tokens) // BLOCK, namespace, layers)
        found = self._find(tokens, hashes, namespace, features, layers)
        if found is None:
            return None
        entry_id, hit = found
        self.entries.move_to_end(entry_id)
        return hit

    def _find(
        self, tokens: list[int], hashes: list[bytes], namespace: str, features: bool = False,
        feature_layers: tuple[int, ...] = (),
    ) -> tuple[int, PrefixHit] | None:
        """The entry of `namespace` (and `feature_layers`) holding the longest prefix of `tokens` (`hashes`: theirs,
        one per whole block)."""
        for blocks in range(len(hashes), 0, -1):
            entry_id = self.index.get(hashes[blocks - 1], -1)
            entry = self.entries.get(entry_id)
            if entry is None or entry.namespace != namespace or entry.feature_layers != feature_layers:
                continue
            if features and entry.features is None:
                continue
            length = blocks * BLOCK
            if list(entry.tokens[:length]) == tokens[:length]:
                return entry_id, PrefixHit(entry, length)
        return None

    def store(
        self, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], features: torch.Tensor | None = None,
        *, namespace: str = "", feature_layers: tuple[int, ...] = (),
    ) -> bool:
        """Keep the whole blocks of `tokens` whose keys and values are `layers` (per layer, the positions of
        `tokens` at least; copied), and their `features` (the hidden states `feature_layers` side by side, or
        the final ones). Returns whether a new entry was made: not when an entry with features (or, without
        features, any entry) already holds that prefix, or it is under one block."""
        length = min(len(tokens), self.capacity_tokens) // BLOCK * BLOCK
        if not self.enabled or length == 0:
            return False
        feature_layers = feature_layers if features is not None else ()
        hashes = block_hashes(tokens, length // BLOCK, namespace, feature_layers)
        held = self._find(tokens[:length], hashes, namespace, feature_layers=feature_layers)
        if held is not None:
            held_id, hit = held
            if hit.length == length and (features is None or hit.entry.features is not None):
                return False
            if hit.length == len(hit.entry.tokens) and (features is not None or hit.entry.features is None):
                self._remove(held_id)  # the new entry holds all of it, and at least as much
        entry = PrefixEntry(
            tokens=tuple(tokens[:length]),
            layers=[(k[..., :length, :].clone(), v[..., :length, :].clone()) for k, v in layers],
            features=None if features is None else features[:length].clone(),
            hashes=hashes,
            namespace=namespace,
            feature_layers=feature_layers,
        )
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self.entries[entry_id] = entry
        for h in entry.hashes:
            self.index[h] = entry_id
        self.tokens_held += length
        while self.tokens_held > self.capacity_tokens and len(self.entries) > 1:
            self._remove(next(iter(self.entries)))
        return True

    def _remove(self, entry_id: int) -> None:
        entry = self.entries.pop(entry_id)
        self.tokens_held -= len(entry.tokens)
        for h in entry.hashes:
            if self.index.get(h) == entry_id:
                del self.index[h]
                # Another entry may hold the same prefix: point the hash at the most recent one that does.
                for other_id in reversed(self.entries):
                    if h in self.entries[other_id].hashes:
                        self.index[h] = other_id
                        break
