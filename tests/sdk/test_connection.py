"""The client's connection: a dead route is noticed by keepalive pings, not waited on forever."""

from __future__ import annotations

import asyncio
import time

import pytest

from ergon_worker_sdk import Client, ServerUnavailableError
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
