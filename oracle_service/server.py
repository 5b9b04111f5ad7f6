"""Run an oracle worker: load the model, serve specd.v1.OracleService."""

from __future__ import annotations

from oracle_service.config import OracleConfig
from oracle_service.servicer import SERVICE_NAME, OracleServicer
from specd.rpc.launch import LocalWorker, WorkerService, start_worker
from specd.runtime.executor import ModelExecutor
from specd.runtime.loading import load_worker_model
from specd.runtime.verifier import Verifier
from specd.v1.oracle_pb2_grpc import add_OracleServiceServicer_to_server


def build_servicer(config: OracleConfig, executor: ModelExecutor) -> OracleServicer:
    verifier = Verifier(
        load_worker_model(config.model_spec()),
        max_sessions=config.max_sessions,
        session_ttl_seconds=config.session_ttl_seconds,
        max_depth=config.max_depth,
        prefix_cache_tokens=config.prefix_cache_tokens,
    )
    return OracleServicer(verifier, executor, config)


SERVICE = WorkerService("oracle", SERVICE_NAME, build_servicer, add_OracleServiceServicer_to_server)


async def start(config: OracleConfig) -> LocalWorker:
    """Serve an oracle worker in this process."""
    return await start_worker(SERVICE, config)
