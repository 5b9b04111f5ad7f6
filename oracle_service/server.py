"""Run an oracle worker process: load the model, serve specd.v1.OracleService."""

from __future__ import annotations

from oracle_service.servicer import OracleServicer
from oracle_service.verifier import Verifier
from specd.config import OracleConfig
from specd.server import ModelExecutor
from specd.worker_service import load_for


def build_servicer(config: OracleConfig, executor: ModelExecutor) -> OracleServicer:
    verifier = Verifier(
        load_for(config),
        max_sessions=config.max_sessions,
        session_ttl_seconds=config.session_ttl_seconds,
        max_depth=config.max_depth,
        prefix_cache_tokens=config.prefix_cache_tokens,
    )
    return OracleServicer(verifier, executor, config)
