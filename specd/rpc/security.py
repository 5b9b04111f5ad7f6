"""Authentication and transport security for every specd server and client.

Configured from the environment (mounted from Kubernetes Secrets by the Helm chart):

    SPECD_AUTH_TOKEN_FILE   a file holding a shared bearer token; servers then require
                            `authorization: Bearer <token>` on every call except health checks
                            and reflection, and clients send it.
    SPECD_TLS_CERT_FILE     PEM certificate chain and key of this process; servers listen with TLS
    SPECD_TLS_KEY_FILE      and clients present them (mutual TLS).
    SPECD_TLS_CA_FILE       PEM CA that peers' certificates must chain to.

Nothing set means plaintext without authentication (loopback development).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Health checks (kubelet probes, load balancers) and reflection stay open.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable)
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class Security:
    token: str | None = None
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @classmethod
    def from_env(cls) -> Security:
        token = _read("SPECD_AUTH_TOKEN_FILE")
        return cls(
            token=token.decode().strip() if token else None,
            cert=_read("SPECD_TLS_CERT_FILE"),
            key=_read("SPECD_TLS_KEY_FILE"),
            ca=_read("SPECD_TLS_CA_FILE"),
        )

    @property
    def tls(self) -> bool:
        return self.cert is not None and self.key is not None

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata every client call carries."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    # -- servers -------------------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        assert self.key is not None and self.cert is not None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []

    # -- clients -------------------------------------------------------------------------------
    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def aio_channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        if self.tls or self.ca:
            return grpc.aio.secure_channel(address, self._channel_credentials(), options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        if self.tls or self.ca:
            return grpc.secure_channel(address, self._channel_credentials(), options=options)
        return grpc.insecure_channel(address, options=options)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses calls without the shared bearer token (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES) or self._authorized(details.invocation_metadata):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **codecs)
        return grpc.stream_stream_rpc_method_handler(deny, **codecs)
