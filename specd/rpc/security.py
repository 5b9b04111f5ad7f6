"""Authentication and transport security for every specd server and client.

Three credentials, one per role, from the environment (mounted from Kubernetes Secrets by the
Helm chart):

    SPECD_AUTH_TOKEN_FILE     client: the Generation API (gRPC and HTTP). One token per line; a
                              line `name:token` names the tenant that uses it (logs, metrics, the
                              prefix cache's partition); a bare token is the tenant "default".
    SPECD_ADMIN_TOKEN_FILE    admin: the Admin API (`specctl` reads the same variable and sends it).
    SPECD_WORKER_TOKEN_FILE   worker: the coordinator's calls to the workers; workers take nothing else.

Servers require `authorization: Bearer <token>` of the role a service serves on every call except
health checks and reflection: no token or an unknown one gets UNAUTHENTICATED, a token of another
role PERMISSION_DENIED. A role whose variable is unset takes the client tokens (one shared token
for everything, as before roles); all three unset means no authentication (loopback development).
Clients send the token of the role they call as.

    SPECD_TLS_CERT_FILE     PEM certificate chain and key of this process; servers listen with TLS
    SPECD_TLS_KEY_FILE      and clients present them (mutual TLS).
    SPECD_TLS_CA_FILE       PEM CA that peers' certificates must chain to.
    SPECD_TLS_ROLES         with mutual TLS, roles from certificate identities instead of tokens:
                            `role=identity,...` (e.g. `worker=specd-worker,admin=ops,client=team-a`); an
                            identity is a certificate's common name or one of its subject alternative
                            names, and for the client role it is also the tenant.
    SPECD_TLS_TARGET_NAME   the name clients check servers' certificates against, in place of the
                            address they dial (for workers reached by an IP their certificate lacks).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# Health checks (kubelet probes, load balancers) and reflection stay open.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
CLIENT, ADMIN, WORKER = "client", "admin", "worker"
# The role each service serves.
SERVICE_ROLES = {
    "/specd.v1.GenerationService/": CLIENT,
    "/specd.v1.AdminService/": ADMIN,
    "/specd.v1.OracleService/": WORKER,
    "/specd.v1.DraftService/": WORKER,
}
DEFAULT_TENANT = "default"
# The environment variables this module reads (file paths and names, never secrets themselves).
SECURITY_FILES = (
    "SPECD_AUTH_TOKEN_FILE", "SPECD_ADMIN_TOKEN_FILE", "SPECD_WORKER_TOKEN_FILE",
    "SPECD_TLS_CERT_FILE", "SPECD_TLS_KEY_FILE", "SPECD_TLS_CA_FILE", "SPECD_TLS_ROLES", "SPECD_TLS_TARGET_NAME",
)


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable)
    return Path(path).read_bytes() if path else None


def parse_identity_roles(text: str) -> dict[str, set[str]]:
    """identity -> roles, from `role=identity,...`."""
    roles: dict[str, set[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, sep, identity = item.partition("=")
        if not sep or role.strip() not in (CLIENT, ADMIN, WORKER) or not identity.strip():
            raise ValueError(f"SPECD_TLS_ROLES takes role=identity entries with role client, admin or worker; got {item!r}")
        roles.setdefault(identity.strip(), set()).add(role.strip())
    return roles


def peer_identities(auth_context: dict[str, list[bytes]]) -> list[str]:
    """A TLS peer's certificate identities: its common name and subject alternative names."""
    names = [*auth_context.get("x509_common_name", []), *auth_context.get("x509_subject_alternative_name", [])]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def parse_client_tokens(text: str) -> dict[str, str]:
    """token -> tenant, from a client token file: one `name:token` or bare token per line."""
    tokens: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        tenant, token = (name.strip(), token.strip()) if sep else (DEFAULT_TENANT, line)
        if not token or not tenant:
            raise ValueError("a client token file holds one `name:token` (or bare token) per line")
        tokens[token] = tenant
    return tokens


@dataclass(frozen=True)
class Credentials:
    """The bearer tokens of the three roles; None for a role that takes the client tokens."""

    clients: dict[str, str] = field(default_factory=dict)  # token -> tenant
    admin: str | None = None
    worker: str | None = None
    identities: dict[str, set[str]] = field(default_factory=dict)  # certificate identity -> roles (mutual TLS)

    @classmethod
    def from_env(cls) -> Credentials:
        clients, admin, worker = (_read(v) for v in ("SPECD_AUTH_TOKEN_FILE", "SPECD_ADMIN_TOKEN_FILE", "SPECD_WORKER_TOKEN_FILE"))
        return cls(
            clients=parse_client_tokens(clients.decode()) if clients else {},
            admin=admin.decode().strip() or None if admin else None,
            worker=worker.decode().strip() or None if worker else None,
            identities=parse_identity_roles(os.environ.get("SPECD_TLS_ROLES", "")),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.clients or self.admin or self.worker or self.identities)

    def identify_peer(self, auth_context: dict[str, list[bytes]]) -> tuple[set[str], str] | None:
        """The roles a TLS peer's certificate holds (SPECD_TLS_ROLES) and its tenant (the identity)."""
        for identity in peer_identities(auth_context):
            roles = self.identities.get(identity)
            if roles:
                return set(roles), identity
        return None

    def token_for(self, role: str) -> str | None:
        """The token a client of this role sends."""
        own = {ADMIN: self.admin, WORKER: self.worker}.get(role)
        return own or next(iter(self.clients), None)

    def identify(self, token: str) -> tuple[set[str], str] | None:
        """The roles a token holds and its tenant; None for a token nobody issued."""
        roles: set[str] = set()
        tenant = ""
        for known, name in self.clients.items():
            if hmac.compare_digest(token.encode(), known.encode()):
                roles.add(CLIENT)
                tenant = name
                roles |= {r for r, own in ((ADMIN, self.admin), (WORKER, self.worker)) if own is None}
        for role, own in ((ADMIN, self.admin), (WORKER, self.worker)):
            if own is not None and hmac.compare_digest(token.encode(), own.encode()):
                roles.add(role)
        return (roles, tenant or DEFAULT_TENANT) if roles else None

    def tenant_of(self, metadata: Any, auth_context: dict[str, list[bytes]] | None = None) -> str:
        """The tenant of a call: its bearer token's, else its certificate identity's (DEFAULT_TENANT without
        authentication)."""
        token = bearer(metadata)
        found = self.identify(token) if token else None
        if found is None and auth_context:
            found = self.identify_peer(auth_context)
        return found[1] if found else DEFAULT_TENANT


def bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            given = value.decode() if isinstance(value, bytes) else value
            return given.removeprefix("Bearer ").strip() if given.startswith("Bearer ") else None
    return None


@dataclass(frozen=True)
class Security:
    credentials: Credentials = field(default_factory=Credentials)
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    role: str = CLIENT  # the role this process calls as (what call_metadata sends)

    @classmethod
    def from_env(cls, role: str = CLIENT) -> Security:
        return cls(
            credentials=Credentials.from_env(),
            cert=_read("SPECD_TLS_CERT_FILE"),
            key=_read("SPECD_TLS_KEY_FILE"),
            ca=_read("SPECD_TLS_CA_FILE"),
            role=role,
        )

    @property
    def token(self) -> str | None:
        """The token this process sends."""
        return self.credentials.token_for(self.role)

    @property
    def tls(self) -> bool:
        return self.cert is not None and self.key is not None

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata every client call carries."""
        token = self.token
        return (("authorization", f"Bearer {token}"),) if token else None

    # -- servers -------------------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        assert self.key is not None and self.cert is not None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [RoleCheck(self.credentials)] if self.credentials.enabled else []

    # -- clients -------------------------------------------------------------------------------
    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def _tls_options(self, options: list[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
        target = os.environ.get("SPECD_TLS_TARGET_NAME")
        return [*(options or []), *([("grpc.ssl_target_name_override", target)] if target else [])]

    def aio_channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        if self.tls or self.ca:
            return grpc.aio.secure_channel(address, self._channel_credentials(), options=self._tls_options(options))
        return grpc.aio.insecure_channel(address, options=options)

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        if self.tls or self.ca:
            return grpc.secure_channel(address, self._channel_credentials(), options=self._tls_options(options))
        return grpc.insecure_channel(address, options=options)


class RoleCheck(grpc.aio.ServerInterceptor):
    """Each call needs a credential of the role its service serves (SERVICE_ROLES): a bearer token, or with
    mutual TLS and SPECD_TLS_ROLES the identity of its certificate."""

    def __init__(self, credentials: Credentials):
        self.credentials = credentials

    def _refusal(self, found: tuple[set[str], str] | None, needed: str | None) -> tuple[grpc.StatusCode, str] | None:
        if found is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)"
        if needed is not None and needed not in found[0]:
            return grpc.StatusCode.PERMISSION_DENIED, f"this call needs the {needed} credential"
        return None

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        needed = next((role for prefix, role in SERVICE_ROLES.items() if details.method.startswith(prefix)), None)
        token = bearer(details.invocation_metadata)
        found = self.credentials.identify(token) if token else None
        refusal = self._refusal(found, needed)
        if refusal is None:
            return handler
        if self.credentials.identities and token is None:  # the certificate decides, once the call is up
            return self._by_certificate(handler, needed)
        code, message = refusal

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **codecs)
        return grpc.stream_stream_rpc_method_handler(deny, **codecs)

    def _by_certificate(self, handler: grpc.RpcMethodHandler, needed: str | None) -> grpc.RpcMethodHandler:
        """The handler, behind a check of the peer certificate's roles (unary requests only: specd has no other)."""
        check = self

        async def refused(context: grpc.aio.ServicerContext) -> bool:
            refusal = check._refusal(check.credentials.identify_peer(context.auth_context()), needed)
            if refusal is not None:
                await context.abort(*refusal)
            return refusal is not None

        codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not await refused(context):
                    return await handler.unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **codecs)
        if handler.unary_stream:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not await refused(context):
                    async for reply in handler.unary_stream(request, context):
                        yield reply

            return grpc.unary_stream_rpc_method_handler(stream, **codecs)
        raise NotImplementedError("certificate roles cover unary requests")
