"""The two kinds of worker by role name, and starting either from its config.

Importing this module does not import torch (the CLI builds its parser from the configs before
it sets up threads); the services load on first use.
"""

from __future__ import annotations

from draft_service.config import DraftConfig
from oracle_service.config import OracleConfig
from specd.rpc.launch import SWEEP_SECONDS, LocalWorker, WorkerService
from specd.rpc.settings import WorkerConfig

CONFIGS: dict[str, type[WorkerConfig]] = {"oracle": OracleConfig, "draft": DraftConfig}


def service(role: str) -> WorkerService:
    """The worker service of `role` ("draft" or "oracle")."""
    if role == "draft":
        from draft_service.server import SERVICE as DRAFT_SERVICE

        return DRAFT_SERVICE
    if role == "oracle":
        from oracle_service.server import SERVICE as ORACLE_SERVICE

        return ORACLE_SERVICE
    raise ValueError(f"unknown worker role {role!r} (draft or oracle)")


def role_of(config: WorkerConfig) -> str:
    for role, config_cls in CONFIGS.items():
        if isinstance(config, config_cls):
            return role
    raise TypeError(f"not a worker config: {type(config).__name__}")


async def start_local_worker(config: WorkerConfig, sweep_seconds: float = SWEEP_SECONDS) -> LocalWorker:
    """Serve the worker `config` describes (a DraftConfig or an OracleConfig) in this process."""
    from specd.rpc.launch import start_worker

    return await start_worker(service(role_of(config)), config, sweep_seconds)
