"""The client's connection: a dead route is noticed by keepalive pings, not waited on forever."""

from __future__ import annotations

import asyncio
import time

import pytest

from ergon_worker_sdk import Client, ServerUnavailableError
from ergon_worker_sdk._client import channel_target
from ergon_worker_sdk.testing import ErgonTestServer
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
