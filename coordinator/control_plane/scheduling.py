"""Where a new session runs: the least-loaded usable oracle, and the least-loaded compatible draft.

Every healthy draft that specd.core.compat finds compatible with an oracle forms a pair with it.
With no usable draft a session runs on the oracle alone (k = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.control_plane.registry import Registry, Worker
from specd.core.compat import pair_id, pair_problem


@dataclass
class Assignment:
    """Where a new session runs and how it chooses k."""

    session_id: str
    oracle_name: str
    oracle_address: str
    draft_name: str
    draft_address: str  # "" when the session runs on the oracle alone
    pair_id: str
    policy: str
    policy_state: dict[str, Any]
    max_depth: int


def compatible(draft: Worker, oracle: Worker) -> bool:
    return pair_problem(draft, oracle) is None


def choose_pair(registry: Registry, use_draft: bool, exclude: list[str] | None = None) -> tuple[Worker, Worker | None] | None:
    """(oracle, draft or None) for a new session, on an oracle not in `exclude`; None when no oracle is usable."""
    oracles = [w for w in registry.oracles() if w.usable() and w.name not in (exclude or [])]
    if not oracles:
        return None
    oracle = min(oracles, key=lambda w: (w.occupancy(), w.name))
    drafts = [w for w in registry.drafts() if w.usable() and compatible(w, oracle)] if use_draft else []
    draft = min(drafts, key=lambda w: (w.occupancy(), w.name)) if drafts else None
    return oracle, draft


def pairs(registry: Registry) -> list[tuple[str, Worker | None, Worker]]:
    """Every pair the registry can form, (pair id, draft or None, oracle): each oracle alone, then with each
    compatible draft."""
    out: list[tuple[str, Worker | None, Worker]] = []
    for oracle in registry.oracles():
        out.append((pair_id("", oracle.name), None, oracle))
        for draft in registry.drafts():
            if compatible(draft, oracle):
                out.append((pair_id(draft.name, oracle.name), draft, oracle))
    return out
