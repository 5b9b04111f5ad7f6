"""The one way every specd gRPC server starts and stops.

grpc.aio server, grpc.health.v1 health service, server reflection, an optional Prometheus
endpoint, and graceful shutdown on SIGTERM/SIGINT: health goes NOT_SERVING first (so load
balancers and the coordinator stop sending new work), then in-flight calls get a grace period.
Also the decorator that turns domain errors (specd.core.errors) into gRPC statuses.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specd.core.errors import SpecdError
from specd.rpc.security import Security

log = logging.getLogger(__name__)
# Where gRPC's rich error model puts a serialized google.rpc.Status.
GRPC_STATUS_DETAILS = "grpc-status-details-bin"


def status_code(error: SpecdError) -> grpc.StatusCode:
    """The gRPC status a domain error names."""
    return grpc.StatusCode[error.code]


def error_metadata(error: SpecdError) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying a google.rpc.Status with a RetryInfo detail, for errors that say when to retry."""
    if error.retry_after_seconds is None:
        return ()
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromTimedelta(datetime.timedelta(seconds=error.retry_after_seconds))
    status = status_pb2.Status(code=status_code(error).value[0], message=str(error))
    status.details.add().Pack(info)
    return ((GRPC_STATUS_DETAILS, status.SerializeToString()),)


async def abort_with_error(context: grpc.aio.ServicerContext, error: SpecdError) -> None:
    await context.abort(status_code(error), str(error), trailing_metadata=error_metadata(error))


def grpc_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map SpecdError (raised by plain domain code) to its gRPC status and readable message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except SpecdError as error:
            await abort_with_error(context, error)

    return wrapper


# Keepalive: a client pings a connection every KEEPALIVE_SECONDS and drops it when no answer comes within
# KEEPALIVE_TIMEOUT_SECONDS, so a worker that stops answering without closing its connection (paused, or
# behind a network partition) fails its calls within seconds instead of never.
KEEPALIVE_SECONDS = 10
KEEPALIVE_TIMEOUT_SECONDS = 5


def channel_options(max_message_bytes: int, *, server: bool = False) -> list[tuple[str, int]]:
    sizes = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if server:  # accept the clients' pings, also between calls
        return sizes + [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_SECONDS * 1000 // 2),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    return sizes + [
        ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def warn_if_open(host: str, security: Security, what: str) -> None:
    """A server that listens beyond loopback without credentials says so at start."""
    if host not in LOOPBACK_HOSTS and not security.credentials.enabled:
        log.warning(
            "the %s server listens on %s without authentication: anyone who reaches it may use it; set "
            "SPECD_AUTH_TOKEN_FILE, SPECD_ADMIN_TOKEN_FILE and SPECD_WORKER_TOKEN_FILE (specd/rpc/security.py)",
            what, host,
        )


class ServiceHost:
    """Hosts servicers on a grpc.aio server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        grace_seconds: float = 5.0,
        max_message_bytes: int = 16 << 20,
        security: Security | None = None,
    ):
        self.host = host
        self.requested_port = port
        self.grace_seconds = grace_seconds
        self.security = security or Security.from_env()
        self.server = grpc.aio.server(
            options=channel_options(max_message_bytes, server=True), interceptors=self.security.server_interceptors()
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._service_names: list[str] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._on_stop: list[Callable[[], Awaitable[None]]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, adder: Callable[[Any, grpc.aio.Server], None], servicer: Any, service_name: str) -> None:
        adder(servicer, self.server)
        self._service_names.append(service_name)

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_stop.append(callback)

    async def start(self) -> int:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        credentials = self.security.server_credentials()
        address = f"{self.host}:{self.requested_port}"
        if credentials is not None:
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {self.host}:{self.requested_port}")
        await self.server.start()
        await self.set_serving(True)
        log.info("serving %s on %s", ", ".join(self._service_names), self.address)
        warn_if_open(self.host, self.security, "gRPC")
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Health NOT_SERVING, then stop accepting calls and give in-flight ones the grace period."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.set_serving(False)
        await self.server.stop(self.grace_seconds)
        for callback in self._on_stop:
            await callback()
        log.info("stopped %s", self.address)
        self._stopped.set()

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

    async def wait(self) -> None:
        """Until the server has stopped and, after a stop(), its whole shutdown has run."""
        await self.server.wait_for_termination()
        if self._stopping.is_set():
            await self._stopped.wait()


async def periodic(interval_seconds: float, fn: Callable[[], Awaitable[None]]) -> None:
    """Run fn every interval until cancelled; errors are logged, never fatal."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await fn()
        except Exception:  # a housekeeping failure must not take the server down
            log.exception("periodic task failed")
