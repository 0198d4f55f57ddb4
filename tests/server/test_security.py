"""TLS, mutual TLS and bearer tokens with roles, against a real server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ergon_worker_sdk import Client, FlowStatus, TlsConfig, Worker, flow, flow_type, step
from ergon_worker_sdk.errors import (
    PermissionDeniedError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from ergon_worker_sdk.testing import ErgonTestServer
from tests.server.test_grpcurl import grpcurl

WORKER = "worker-token-0123456789"
CLIENT = "client-token-0123456789"
ADMIN = "admin-token-01234567890"
TOKENS = f"worker:{WORKER},client:{CLIENT},admin:{ADMIN}"


@dataclass
@flow_type(type_id="Secured")
class Secured:
    n: int

    @step
    async def double(self) -> int:
        return self.n * 2

    @flow
    async def run(self) -> int:
        return await self.double()


@pytest.fixture
async def server() -> AsyncIterator[ErgonTestServer]:
    async with ErgonTestServer(tokens=TOKENS, allow_unregistered_flow_types=True) as server:
        yield server


async def test_calls_without_a_valid_token_are_unauthenticated_and_touch_nothing(
    server: ErgonTestServer,
) -> None:
    for token in (None, "not-a-valid-token-at-all"):
        async with server.client(token=token, retry_timeout_s=0) as client:
            with pytest.raises(UnauthenticatedError) as caught:
                await client.schedule(Secured(1), flow_id="sneaky")
            assert caught.value.reason == "UNAUTHENTICATED"
            with pytest.raises(UnauthenticatedError):
                await client.signal("sneaky", "x", 1)
            with pytest.raises(UnauthenticatedError):
                await _start(client)
    async with server.client(token=ADMIN) as admin:
        assert [f async for f in admin.list_flows()] == []


async def _start(client: Client) -> None:
    worker = Worker(client, "intruder")
    await worker.register(Secured)
    await worker.start()


async def test_roles_allow_what_they_should_and_nothing_more(server: ErgonTestServer) -> None:
    async with (
        server.client(token=CLIENT) as as_client,
        server.client(token=WORKER) as as_worker,
        server.client(token=ADMIN) as as_admin,
    ):
        with pytest.raises(PermissionDeniedError):
            await as_worker.schedule(Secured(1))
        with pytest.raises(PermissionDeniedError):
            await _start(as_client)
        worker = Worker(as_worker, "legit")
        await worker.register(Secured)
        handle = await worker.start()
        flow_id = await as_client.schedule(Secured(21))
        assert (await as_client.wait(flow_id, timeout=10)).result == 42
        parked = await as_client.schedule(Secured(1), start_at=_later())
        with pytest.raises(PermissionDeniedError) as caught:
            await as_client.cancel(parked)
        assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert (await as_admin.cancel(parked)).status is FlowStatus.CANCELLED
        await handle.shutdown()


def _later():  # type: ignore[no-untyped-def]
    import datetime

    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)


async def test_health_and_reflection_are_open_and_grpcurl_sends_tokens(
    server: ErgonTestServer,
) -> None:
    assert "ergon.v1.SchedulerService" in await grpcurl("-plaintext", server.address, "list")
    listed = await grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {CLIENT}",
        "-d",
        "{}",
        server.address,
        "ergon.v1.SchedulerService/ListFlows",
    )
    assert json.loads(listed) == {}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    where = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ergon-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=where,
    )
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=where,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=where,
        )
    return where


async def _round_trip(client: Client) -> int:
    worker = Worker(client, "tls-worker")
    await worker.register(Secured)
    handle = await worker.start()
    outcome = await client.wait(await client.schedule(Secured(4)), timeout=10)
    await handle.shutdown()
    result: int = outcome.result
    return result


async def test_tls_serves_encrypted_and_refuses_plaintext(certificates: Path) -> None:
    async with ErgonTestServer(
        tls_cert=certificates / "server.pem",
        tls_key=certificates / "server.key",
        allow_unregistered_flow_types=True,
    ) as server:
        tls = TlsConfig.from_files(ca_cert=str(certificates / "ca.pem"))
        async with server.client(tls=tls) as client:
            assert await _round_trip(client) == 8
        async with server.client(retry_timeout_s=0.5) as plaintext:
            with pytest.raises(ServerUnavailableError):
                await plaintext.schedule(Secured(1))


async def test_mutual_tls_requires_a_client_certificate(certificates: Path) -> None:
    async with ErgonTestServer(
        tls_cert=certificates / "server.pem",
        tls_key=certificates / "server.key",
        tls_client_ca=certificates / "ca.pem",
        tokens=TOKENS,
        allow_unregistered_flow_types=True,
    ) as server:
        with_cert = TlsConfig.from_files(
            ca_cert=str(certificates / "ca.pem"),
            client_cert=str(certificates / "client.pem"),
            client_key=str(certificates / "client.key"),
        )
        async with (
            server.client(tls=with_cert, token=ADMIN) as admin,
            server.client(tls=with_cert, token=WORKER) as worker_client,
        ):
            worker = Worker(worker_client, "mtls-worker")
            await worker.register(Secured)
            handle = await worker.start()
            outcome = await admin.wait(await admin.schedule(Secured(5)), timeout=10)
            await handle.shutdown()
            assert outcome.result == 10
        without_cert = TlsConfig.from_files(ca_cert=str(certificates / "ca.pem"))
        async with server.client(tls=without_cert, token=ADMIN, retry_timeout_s=0.5) as anonymous:
            with pytest.raises(ServerUnavailableError):
                await anonymous.schedule(Secured(1))
