"""Run a draft worker process: load the model, serve specd.v1.DraftService."""

from __future__ import annotations

from draft_service.drafter import Drafter
from draft_service.servicer import DraftServicer
from specd.config import DraftConfig
from specd.server import ModelExecutor
from specd.worker_service import load_for


def build_servicer(config: DraftConfig, executor: ModelExecutor) -> DraftServicer:
    drafter = Drafter(
        load_for(config, int8=config.quantize == "int8"),
        proposal_top_n=config.proposal_top_n,
        lookup_ngram=config.lookup_ngram,
        max_sessions=config.max_sessions,
        session_ttl_seconds=config.session_ttl_seconds,
        max_depth=config.max_depth,
        prefix_cache_tokens=config.prefix_cache_tokens,
    )
    return DraftServicer(drafter, executor, config)
