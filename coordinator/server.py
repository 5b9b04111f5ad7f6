"""Run the coordinator: a grpc.aio server (client and admin APIs) in a Ray driver process.

The client API is a plain grpc.aio server rather than Ray Serve's gRPC ingress: a session is a
long-lived stream with state on two workers, and Serve's proxy would add a hop to every
streamed message. Replicas are simply more coordinator processes sharing the one control-plane
actor, behind a Kubernetes Service or any gRPC load balancer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from coordinator.api import ADMIN_SERVICE, GENERATION_SERVICE, AdminServicer, GenerationServicer
from coordinator.config import CoordinatorConfig
from coordinator.control_plane.client import PlaneClient, connect_ray, get_or_create_plane
from coordinator.http_api import HttpApi
from coordinator.service import Coordinator
from specd.rpc.host import ServiceHost, warn_if_open
from specd.rpc.metrics import serve_metrics
from specd.rpc.security import Security
from specd.v1 import admin_pb2_grpc, common_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class RunningCoordinator:
    host: ServiceHost
    coordinator: Coordinator
    plane: PlaneClient
    metrics_port: int
    http_port: int = -1  # the OpenAI-compatible HTTP API's, -1 when off

    @property
    def address(self) -> str:
        return self.host.address

    async def stop(self) -> None:
        await self.host.stop()


async def start_coordinator(config: CoordinatorConfig, plane: PlaneClient | None = None) -> RunningCoordinator:
    """Join (or start) Ray, get the control plane, register listed workers, start serving."""
    if plane is None:
        connect_ray(config.ray_address, config.ray_namespace)
        plane = await get_or_create_plane(config)
    for address in config.oracles:
        await plane.call("register", common_pb2.WORKER_ROLE_ORACLE, address)
    for address in config.drafts:
        await plane.call("register", common_pb2.WORKER_ROLE_DRAFT, address)
    coordinator = Coordinator(plane, config)
    coordinator.start()
    host = ServiceHost(
        config.host, config.port, grace_seconds=config.grace_seconds, max_message_bytes=config.max_message_bytes
    )
    host.add(generation_pb2_grpc.add_GenerationServiceServicer_to_server, GenerationServicer(coordinator, Security.from_env().credentials), GENERATION_SERVICE)
    host.add(admin_pb2_grpc.add_AdminServiceServicer_to_server, AdminServicer(plane, config.ray_address), ADMIN_SERVICE)
    await host.start()
    host.on_stop(coordinator.close)
    metrics_port = -1
    if config.metrics_port >= 0:
        metrics_port = serve_metrics(coordinator.metrics.registry, config.metrics_port, config.host)
    http_port = -1
    if config.http_port >= 0:
        security = Security.from_env()
        http = HttpApi(coordinator, plane, security.credentials)
        http_port = await http.start(config.host, config.http_port)
        warn_if_open(config.host, security, "HTTP")
        host.on_stop(http.stop)
    return RunningCoordinator(
        host=host, coordinator=coordinator, plane=plane, metrics_port=metrics_port, http_port=http_port
    )
