"""The client's connection: a dead route is noticed by keepalive pings, not waited on forever."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from ergon_worker_sdk import Client, ServerUnavailableError
from ergon_worker_sdk._client import channel_target
from ergon_worker_sdk._session import WorkerStream
from ergon_worker_sdk.proto.ergon.v1 import worker_pb2
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.processes import eventually
from tests.support.proxy import Mode, TcpProxy


async def test_a_long_call_over_a_black_holed_route_fails_instead_of_hanging() -> None:
    async with ErgonTestServer(allow_unregistered_flow_types=True) as server:
        with TcpProxy(server.address) as proxy:
            async with Client(proxy.address, keepalive_s=5, retry_timeout_s=0) as client:
                flow_id = await client.schedule_type("NobodyRunsThis", {})
                proxy.set_mode(Mode.STALL)  # no reset, no reply: the route is dead
                started = time.monotonic()
                with pytest.raises(ServerUnavailableError):
                    async with asyncio.timeout(40):
                        await client.wait(flow_id, timeout=120)
                # An unanswered ping gives the connection up within seconds: the call fails.
                assert time.monotonic() - started < 20


def test_keepalive_faster_than_the_server_allows_is_refused() -> None:
    with pytest.raises(ValueError, match="keepalive_s"):
        Client("127.0.0.1:1", keepalive_s=1)


def test_several_addresses_are_ip_literals_of_one_family() -> None:
    assert channel_target("server.internal:50051") == ("server.internal:50051", [])
    assert channel_target(["127.0.0.1:1"]) == ("127.0.0.1:1", [])
    round_robin = [("grpc.lb_policy_name", "round_robin")]
    assert channel_target(["10.0.0.5:1", "10.0.0.6:2"]) == (
        "ipv4:10.0.0.5:1,10.0.0.6:2",
        round_robin,
    )
    assert channel_target(["[::1]:1", "[fd00::5]:2"]) == ("ipv6:[::1]:1,[fd00::5]:2", round_robin)
    # gRPC would take these and then fail every call to resolve them: refuse them up front.
    for bad in (
        ["a.internal:1", "b.internal:2"],
        ["127.0.0.1:1", "[::1]:2"],
        ["127.0.0.1", "127.0.0.2:2"],
        ["::1:1", "::2:2"],
    ):
        with pytest.raises(ValueError, match="IP literals of one family"):
            channel_target(bad)
        with pytest.raises(ValueError, match="IP literals of one family"):
            Client(bad)
    with pytest.raises(ValueError, match="no server address"):
        Client([])


async def test_commas_in_an_address_string_separate_addresses_as_a_list_would() -> None:
    round_robin = [("grpc.lb_policy_name", "round_robin")]
    for several in ("10.0.0.5:1,10.0.0.6:2", " 10.0.0.5:1, 10.0.0.6:2,", ["10.0.0.5:1,10.0.0.6:2"]):
        assert channel_target(several) == ("ipv4:10.0.0.5:1,10.0.0.6:2", round_robin)
    assert channel_target("127.0.0.1:1,") == ("127.0.0.1:1", [])
    # gRPC's own list targets are left whole.
    assert channel_target("ipv4:10.0.0.5:1,10.0.0.6:2") == ("ipv4:10.0.0.5:1,10.0.0.6:2", [])
    with pytest.raises(ValueError, match="IP literals of one family"):
        Client("a.internal:1,b.internal:2")
    with pytest.raises(ValueError, match="no server address"):
        Client(" , ")
    # The string gRPC took for one host name, failing to resolve it call after call, works.
    async with (
        ErgonTestServer(allow_unregistered_flow_types=True) as server,
        Client(f"{server.address},{server.address}", retry_timeout_s=1) as client,
    ):
        flow_id = await client.schedule_type("NobodyRunsThis", {})
        assert (await client.get(flow_id)).flow_id == flow_id


class _StopsWhenRegistered:
    """A stream handler that stops assignments as its session registers (a drain that began
    while the worker was reconnecting), and records what it is given."""

    def __init__(self) -> None:
        self.stream: WorkerStream | None = None
        self.assigned: list[str] = []

    def held_leases(self) -> list[worker_pb2.HeldLease]:
        return []

    def on_registered(self, reattached: set[str]) -> None:
        assert self.stream is not None
        assert self.stream.stop_assignments() is None  # no session is open yet

    def on_assignment(self, assignment: worker_pb2.Assignment) -> None:
        self.assigned.append(assignment.flow_id)

    def on_revoke(self, revoke: worker_pb2.Revoke) -> None:
        pass

    def on_wakeup(self, wakeup: worker_pb2.Wakeup) -> None:
        pass

    def on_lease_ended(self, flow_id: str, lease_token: int) -> None:
        pass

    def on_cancel_requested(self, cancel: worker_pb2.CancelRequested) -> None:
        pass


async def test_a_capacity_change_made_while_registering_reaches_the_server() -> None:
    async with (
        ErgonTestServer(allow_unregistered_flow_types=True) as server,
        server.client() as client,
    ):
        handler = _StopsWhenRegistered()
        stream = WorkerStream(lambda: client.channel, "draining", ["Late"], 4, handler)
        handler.stream = stream
        running = asyncio.create_task(stream.run())
        try:
            await asyncio.wait_for(stream.connected.wait(), 10)

            async def capacity_zero() -> bool:
                return [w.capacity for w in await client.workers()] == [0]

            await eventually(capacity_zero, within=10, what="the server to see capacity 0")
            await client.schedule_type("Late", {})
            await asyncio.sleep(0.3)
            assert handler.assigned == []
        finally:
            await stream.close(timeout_s=1)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
