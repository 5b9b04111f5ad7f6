"""Run a draft worker: load the model, serve specd.v1.DraftService."""

from __future__ import annotations

from draft_service.config import DraftConfig
from draft_service.servicer import SERVICE_NAME, DraftServicer
from specd.rpc.launch import LocalWorker, WorkerService, start_worker
from specd.runtime.drafter import Drafter
from specd.runtime.executor import ModelExecutor
from specd.runtime.loading import load_worker_model
from specd.v1.draft_pb2_grpc import add_DraftServiceServicer_to_server


def build_servicer(config: DraftConfig, executor: ModelExecutor) -> DraftServicer:
    drafter = Drafter(
        load_worker_model(config.model_spec(int8=config.quantize == "int8")),
        proposal_top_n=config.proposal_top_n,
        lookup_ngram=config.lookup_ngram,
        max_sessions=config.max_sessions,
        session_ttl_seconds=config.session_ttl_seconds,
        max_depth=config.max_depth,
        prefix_cache_tokens=config.prefix_cache_tokens,
    )
    return DraftServicer(drafter, executor, config)


SERVICE = WorkerService("draft", SERVICE_NAME, build_servicer, add_DraftServiceServicer_to_server)


async def start(config: DraftConfig) -> LocalWorker:
    """Serve a draft worker in this process."""
    return await start_worker(SERVICE, config)
