"""Bearer-token authentication and mutual TLS, configured through the environment."""

from __future__ import annotations

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specd.cluster.roles import start_local_worker
from specd.rpc.security import Security
from specd.v1 import common_pb2, oracle_pb2_grpc
from tests.conftest import oracle_config


@pytest.fixture
def token_env(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    monkeypatch.setenv("SPECD_AUTH_TOKEN_FILE", str(token_file))
    return "s3cret"


async def test_token_is_required_except_for_health(tiny_dir, token_env):
    worker = await start_local_worker(oracle_config(tiny_dir))
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = oracle_pb2_grpc.OracleServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetInfo(common_pb2.GetInfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetInfo(common_pb2.GetInfoRequest(), metadata=(("authorization", "Bearer wrong"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.GetInfo(common_pb2.GetInfoRequest(), metadata=(("authorization", f"Bearer {token_env}"),))
            assert reply.vocab_size > 0
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # specd's own clients read the same environment and send the token.
        from coordinator.session.clients import OracleClient

        client = OracleClient(worker.address)
        assert (await client.info()).vocab_size > 0
        await client.close()
    finally:
        await worker.stop()


async def test_mutual_tls(tiny_dir, tmp_path, monkeypatch):
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cert": tmp_path / "tls.crt", "key": tmp_path / "tls.key", "ca": tmp_path / "ca.crt"}
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    paths["key"].write_bytes(server_cert.private_key_pem.bytes())
    paths["ca"].write_bytes(ca.cert_pem.bytes())
    for name, path in paths.items():
        monkeypatch.setenv(f"SPECD_TLS_{name.upper()}_FILE", str(path))
    worker = await start_local_worker(oracle_config(tiny_dir))
    try:
        async with Security.from_env().aio_channel(worker.address) as channel:
            reply = await oracle_pb2_grpc.OracleServiceStub(channel).GetInfo(common_pb2.GetInfoRequest())
            assert reply.vocab_size > 0
        # A client without a certificate is turned away.
        no_cert = Security(ca=ca.cert_pem.bytes())
        async with no_cert.aio_channel(worker.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await oracle_pb2_grpc.OracleServiceStub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await worker.stop()


def issued(ca: trustme.CA, identity: str) -> Security:
    """A client presenting a certificate for `identity` (a subject alternative name) from `ca`."""
    cert = ca.issue_cert(identity)
    return Security(
        cert=b"".join(blob.bytes() for blob in cert.cert_chain_pems), key=cert.private_key_pem.bytes(),
        ca=ca.cert_pem.bytes(),
    )


async def test_roles_from_certificate_identities(tiny_dir, tmp_path, monkeypatch):
    """With mutual TLS and SPECD_TLS_ROLES, a certificate's identity is its credential: the worker identity opens
    a worker, a client identity gets PERMISSION_DENIED there. The worker is reached by 127.0.0.1, an IP SAN of its
    certificate; SPECD_TLS_TARGET_NAME names the certificate's host where the address is not in it."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "oracle.specd.internal")
    paths = {"cert": tmp_path / "tls.crt", "key": tmp_path / "tls.key", "ca": tmp_path / "ca.crt"}
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    paths["key"].write_bytes(server_cert.private_key_pem.bytes())
    paths["ca"].write_bytes(ca.cert_pem.bytes())
    for name, path in paths.items():
        monkeypatch.setenv(f"SPECD_TLS_{name.upper()}_FILE", str(path))
    monkeypatch.setenv("SPECD_TLS_ROLES", "worker=specd-worker,client=team-a")
    worker = await start_local_worker(oracle_config(tiny_dir))
    try:
        async with issued(ca, "specd-worker").aio_channel(worker.address) as channel:
            assert (await oracle_pb2_grpc.OracleServiceStub(channel).GetInfo(common_pb2.GetInfoRequest())).vocab_size > 0
        for identity, code in (("team-a", grpc.StatusCode.PERMISSION_DENIED), ("stranger", grpc.StatusCode.UNAUTHENTICATED)):
            async with issued(ca, identity).aio_channel(worker.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await oracle_pb2_grpc.OracleServiceStub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=5)
                assert info.value.code() == code, identity
        monkeypatch.setenv("SPECD_TLS_TARGET_NAME", "oracle.specd.internal")
        port = worker.address.rsplit(":", 1)[1]
        async with issued(ca, "specd-worker").aio_channel(f"localhost:{port}") as channel:  # not a name it holds
            assert (await oracle_pb2_grpc.OracleServiceStub(channel).GetInfo(common_pb2.GetInfoRequest())).vocab_size > 0
    finally:
        await worker.stop()
