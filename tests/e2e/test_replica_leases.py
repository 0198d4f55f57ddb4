"""Leases of replicas on PostgreSQL: a worker hears what another replica did to its flow, and
keeps its flow through a store outage.

In-process servers share one PostgreSQL database (real gRPC, real stores, real LISTEN/
NOTIFY), some through a TCP proxy the test can cut; the worker is a raw stream, so the test
decides when it heartbeats and sees every event the server sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.postgres import temporary_database_sync
from tests.support.processes import eventually
from tests.support.proxy import Mode, TcpProxy

TYPE = "Held"


@pytest.fixture
def database() -> Iterator[str]:
    with temporary_database_sync("ergon_replica_leases") as dsn:
        yield dsn


def payload(data: bytes = b"{}") -> common_pb2.Payload:
    return common_pb2.Payload(encoding="json/plain", data=data)


class RawWorker:
    """A worker stream that sends only what the test says and records every server event."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
        self.events: list[worker_pb2.ServerEvent] = []
        self._changed = asyncio.Event()
        self._seq = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in self.call:
                self.events.extend(response.events)
                self._changed.set()

    async def send(self, **event: Any) -> int:
        self._seq += 1
        request = worker_pb2.ConnectRequest(events=[worker_pb2.WorkerEvent(seq=self._seq, **event)])
        await self.call.write(request)
        return self._seq

    async def until(
        self, found: Callable[[worker_pb2.ServerEvent], bool], within: float = 30.0
    ) -> worker_pb2.ServerEvent:
        async with asyncio.timeout(within):
            while True:
                for event in self.events:
                    if found(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    async def ack(self, seq: int) -> worker_pb2.Ack:
        event = await self.until(lambda e: e.WhichOneof("event") == "ack" and e.ack.seq == seq)
        return event.ack

    def of_kind(self, kind: str) -> list[worker_pb2.ServerEvent]:
        return [e for e in self.events if e.WhichOneof("event") == kind]

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def running_flow(
    holder: ErgonTestServer, flow_id: str
) -> AsyncIterator[tuple[RawWorker, worker_pb2.Assignment]]:
    """A raw worker on `holder` that has been assigned `flow_id` (and sends no heartbeats)."""
    async with grpc.aio.insecure_channel(holder.address) as channel:
        worker = RawWorker(channel)
        try:
            register = worker_pb2.Register(
                worker_id="raw", flow_types=[TYPE], capacity=1, protocol_version=1
            )
            await worker.send(register=register)
            await worker.until(lambda e: e.WhichOneof("event") == "registered")
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            await scheduler.ScheduleFlow(
                scheduler_pb2.ScheduleFlowRequest(flow_id=flow_id, flow_type=TYPE, input=payload())
            )
            event = await worker.until(lambda e: e.WhichOneof("event") == "assignment")
            yield worker, event.assignment
        finally:
            await worker.close()


def holder_and_expirer(holder_db: str, expirer_db: str) -> tuple[ErgonTestServer, ErgonTestServer]:
    """Two replicas with 1 s leases: the holder (of the worker) never scans for expired
    leases, so only the expirer can expire them."""
    leases = {"lease_ttl_ms": 1_000, "heartbeat_interval_ms": 500}
    return (
        ErgonTestServer(
            holder_db,
            allow_unregistered_flow_types=True,
            expiry_scan_interval_ms=3_600_000,
            **leases,
        ),
        ErgonTestServer(
            expirer_db, allow_unregistered_flow_types=True, expiry_scan_interval_ms=50, **leases
        ),
    )


async def test_a_lease_another_replica_expires_is_revoked_where_its_worker_is(
    database: str,
) -> None:
    holder_server, expirer_server = holder_and_expirer(database, database)
    async with (
        holder_server as holder,
        expirer_server as expirer,
        running_flow(holder, "f1") as (worker, assignment),
    ):
        # No heartbeats: the lease lapses, the other replica re-queues the flow, and the
        # worker still running it is told to stop before it does anything more.
        event = await worker.until(lambda e: e.WhichOneof("event") == "revoke")
        assert (event.revoke.flow_id, event.revoke.lease_token, event.revoke.reason) == (
            "f1",
            assignment.lease_token,
            "LEASE_EXPIRED",
        )
        async with grpc.aio.insecure_channel(expirer.address) as channel:
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            got = await scheduler.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="f1"))
        assert got.flow.status == common_pb2.FLOW_STATUS_PENDING


def through(proxy: TcpProxy, dsn: str) -> str:
    """`dsn` with its host and port replaced by the proxy's."""
    parts = urlsplit(dsn)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (credentials + "@" if credentials else "") + proxy.address
    return urlunsplit(parts._replace(netloc=netloc))


async def test_what_a_replica_missed_while_its_listener_was_away_reaches_the_worker(
    database: str,
) -> None:
    upstream = urlsplit(database)
    with TcpProxy(f"{upstream.hostname}:{upstream.port or 5432}") as proxy:
        async with (
            ErgonTestServer(through(proxy, database), allow_unregistered_flow_types=True) as holder,
            ErgonTestServer(database, allow_unregistered_flow_types=True) as other,
            running_flow(holder, "f1") as (worker, assignment),
            grpc.aio.insecure_channel(other.address) as channel,
        ):
            token = assignment.lease_token
            wait = worker_pb2.WaitRequest(
                flow_id="f1",
                lease_token=token,
                key="sig#1",
                signal=worker_pb2.SignalWait(name="go"),
            )
            ack = await worker.ack(await worker.send(wait=wait))
            assert (ack.code, list(ack.entries)) == (0, [])
            # The holder loses its database, LISTEN included, while the other replica
            # delivers the awaited signal and asks for a cancel: both notifications are lost.
            proxy.set_mode(Mode.DROP)
            try:
                signals = signal_pb2_grpc.SignalServiceStub(channel)
                await signals.SendSignal(
                    signal_pb2.SendSignalRequest(flow_id="f1", name="go", payload=payload(b"1"))
                )
                scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                await scheduler.CancelFlow(
                    scheduler_pb2.CancelFlowRequest(flow_id="f1", reason="not needed")
                )
            finally:
                proxy.set_mode(Mode.PASS)
            # Once its listener is back, the holder looks again at the flows it holds.
            wakeup = await worker.until(lambda e: e.WhichOneof("event") == "wakeup")
            assert (wakeup.wakeup.flow_id, wakeup.wakeup.lease_token) == ("f1", token)
            assert (wakeup.wakeup.entry.key, wakeup.wakeup.entry.result.data) == ("sig#1", b"1")
            cancel = await worker.until(lambda e: e.WhichOneof("event") == "cancel_requested")
            assert (cancel.cancel_requested.flow_id, cancel.cancel_requested.lease_token) == (
                "f1",
                token,
            )
            assert cancel.cancel_requested.reason == "not needed"
            # The lease is still the worker's: nothing revoked it.
            assert worker.of_kind("revoke") == []


async def test_a_lease_expired_while_the_holder_s_listener_was_away_is_revoked_after(
    database: str,
) -> None:
    upstream = urlsplit(database)
    with TcpProxy(f"{upstream.hostname}:{upstream.port or 5432}") as proxy:
        holder_server, other_server = holder_and_expirer(through(proxy, database), database)
        async with (
            holder_server as holder,
            other_server as other,
            running_flow(holder, "f1") as (worker, assignment),
            grpc.aio.insecure_channel(other.address) as channel,
        ):
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            proxy.set_mode(Mode.DROP)
            try:
                # The other replica expires the lease; its notification is lost.
                async def requeued() -> bool:
                    got = await scheduler.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="f1"))
                    return got.flow.status == common_pb2.FLOW_STATUS_PENDING

                await eventually(requeued, within=30, what="the other replica re-queued f1")
            finally:
                proxy.set_mode(Mode.PASS)
            event = await worker.until(lambda e: e.WhichOneof("event") == "revoke")
            assert (event.revoke.flow_id, event.revoke.lease_token, event.revoke.reason) == (
                "f1",
                assignment.lease_token,
                "LEASE_LOST",
            )


async def test_a_store_outage_longer_than_the_lease_ttl_expires_no_live_worker_s_lease(
    database: str,
) -> None:
    ttl_ms = 1_000
    upstream = urlsplit(database)
    with TcpProxy(f"{upstream.hostname}:{upstream.port or 5432}") as proxy:
        async with (
            ErgonTestServer(
                through(proxy, database),
                allow_unregistered_flow_types=True,
                lease_ttl_ms=ttl_ms,
                heartbeat_interval_ms=ttl_ms // 2,
                expiry_scan_interval_ms=20,
            ) as server,
            running_flow(server, "f1") as (worker, assignment),
        ):
            ack = await worker.ack(await worker.send(heartbeat=worker_pb2.Heartbeat()))
            assert ack.code == 0, ack
            proxy.set_mode(Mode.DROP)
            try:
                # Down for three TTLs; the worker heartbeats all along, in vain.
                for _ in range(6):
                    await asyncio.sleep(ttl_ms / 2 / 1000)
                    ack = await worker.ack(await worker.send(heartbeat=worker_pb2.Heartbeat()))
                    assert ack.reason == "STORE_UNAVAILABLE", ack
            finally:
                proxy.set_mode(Mode.PASS)

            # Back. The worker's next heartbeat comes after several expiry scans (as it may:
            # heartbeats are seconds apart) and still finds its lease.
            async def reachable() -> bool:
                async with grpc.aio.insecure_channel(server.address) as channel:
                    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                    try:
                        await scheduler.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="f1"))
                    except grpc.aio.AioRpcError:
                        return False
                    return True

            await eventually(reachable, within=30, what="the store is back")
            await asyncio.sleep(10 * 20 / 1000)

            async def renewed() -> bool:
                ack = await worker.ack(await worker.send(heartbeat=worker_pb2.Heartbeat()))
                return ack.code == 0

            await eventually(renewed, within=30, interval=0.2, what="a heartbeat renews")
            done = worker_pb2.FlowCompleted(
                flow_id="f1", lease_token=assignment.lease_token, result=payload(b"1")
            )
            ack = await worker.ack(await worker.send(flow_completed=done))
            assert (ack.code, ack.reason) == (0, ""), ack
            assert worker.of_kind("revoke") == []
