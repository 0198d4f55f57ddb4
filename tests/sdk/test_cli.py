"""The `ergon` command line, driven end to end against a real server and worker."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from ergon_worker_sdk import (
    Client,
    FlowStatus,
    NonRetryableError,
    Worker,
    await_external_signal,
    flow,
    flow_type,
    step,
)
from ergon_worker_sdk.proto.ergon.v1 import scheduler_pb2, scheduler_pb2_grpc
from ergon_worker_sdk.testing import ErgonTestServer


@dataclass
@flow_type(type_id="CliOrder")
class CliOrder:
    order_id: str

    @step
    async def reserve(self) -> str:
        return f"reserved {self.order_id}"

    @flow
    async def run(self) -> str:
        reserved = await self.reserve()
        approval = await await_external_signal("approved")
        return f"{reserved}, approved by {approval['by']}"


@dataclass
@flow_type(type_id="CliRefusal")
class CliRefusal:
    reason: str

    @flow
    async def run(self) -> str:
        raise NonRetryableError(self.reason)


async def ergon(address: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ergon_worker_sdk.cli",
        "--address",
        address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def running() -> AsyncIterator[tuple[ErgonTestServer, Client]]:
    async with ErgonTestServer() as server, server.client() as client:
        worker = Worker(client, "cli-worker", max_concurrency=5)
        await worker.register(CliOrder, CliRefusal)
        handle = await worker.start()
        yield server, client
        await handle.shutdown()


async def test_schedule_list_show_signal_and_workers(
    running: tuple[ErgonTestServer, Client],
) -> None:
    server, client = running
    code, out, _ = await ergon(
        server.address, "schedule", "CliOrder", "--json", '{"order_id": "A-1"}', "--flow-id", "o1"
    )
    assert (code, out.strip()) == (0, "o1")
    await asyncio.sleep(0.3)  # it runs its step, then waits for the signal
    code, out, _ = await ergon(server.address, "--json", "flows", "list", "--status", "WAITING")
    listed = json.loads(out)
    assert code == 0 and [f["flow_id"] for f in listed] == ["o1"]
    code, out, _ = await ergon(
        server.address, "signal", "o1", "approved", "--json", '{"by": "ann"}'
    )
    assert code == 0 and "delivered" in out
    outcome = await client.wait("o1", timeout=10)
    assert outcome.result == "reserved A-1, approved by ann"
    code, out, _ = await ergon(server.address, "flows", "show", "o1")
    assert code == 0
    for expected in ("COMPLETED", "reserve#1", "signal:approved#1", '"reserved A-1"', "+"):
        assert expected in out, out
    code, out, _ = await ergon(server.address, "--json", "flows", "show", "o1")
    shown = json.loads(out)
    assert [e["key"] for e in shown["journal"]] == ["reserve#1", "signal:approved#1"]
    code, out, _ = await ergon(server.address, "--json", "workers")
    (worker,) = json.loads(out)
    assert worker["worker_id"] == "cli-worker" and worker["capacity"] == 5
    code, out, _ = await ergon(server.address, "workers")
    assert "cli-worker" in out and "0/5" in out
    # `--json` after the command works too, where it is not the command's own input.
    code, out, _ = await ergon(server.address, "flows", "list", "--json")
    assert code == 0 and [f["flow_id"] for f in json.loads(out)] == ["o1"]
    code, out, _ = await ergon(server.address, "flows", "show", "o1", "--json")
    assert code == 0 and json.loads(out)["flow_id"] == "o1"
    code, out, _ = await ergon(server.address, "workers", "--json")
    assert code == 0 and json.loads(out)[0]["worker_id"] == "cli-worker"


async def test_several_addresses_must_be_ip_literals() -> None:
    code, _, err = await ergon("server-a.internal:50051,server-b.internal:50051", "workers")
    assert code == 2
    assert "argument --address: several server addresses must be IP literals" in err


async def test_a_limit_below_one_is_refused() -> None:
    for bad in ("0", "-5", "many"):
        code, out, err = await ergon("127.0.0.1:1", "flows", "list", "--limit", bad)
        assert (code, out) == (2, ""), (bad, out)
        assert "argument --limit:" in err, err
    code, _, err = await ergon("127.0.0.1:1", "flows", "list", "--limit", "0")
    assert "must be at least 1, not 0" in err, err


async def test_a_listing_cut_short_says_how_to_see_the_rest() -> None:
    # Pages of 3 at most: a listing of 4 takes two calls.
    async with (
        ErgonTestServer(max_page_size=3, allow_unregistered_flow_types=True) as server,
        server.client() as client,
    ):
        for n in range(9):
            await client.schedule_type("Unrun", {}, flow_id=f"p{n}")
        code, out, err = await ergon(server.address, "--json", "flows", "list", "--limit", "4")
        assert code == 0 and [f["flow_id"] for f in json.loads(out)] == ["p0", "p1", "p2", "p3"]
        match = re.fullmatch(
            r"\.\.\. more flows match: raise --limit \(now 4\), "
            r"or add --page-token (\S+) for the next ones\n",
            err,
        )
        assert match, err
        code, out, err = await ergon(
            server.address, "flows", "list", "--limit", "4", "--page-token", match[1]
        )
        assert code == 0 and "--page-token" in err
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["p4", "p5", "p6", "p7"]
        # Exactly as many as match: nothing more to say.
        code, out, err = await ergon(server.address, "--json", "flows", "list", "--limit", "9")
        assert (code, len(json.loads(out)), err) == (0, 9, "")
        code, out, err = await ergon(server.address, "--json", "flows", "list")
        assert (code, len(json.loads(out)), err) == (0, 9, "")


async def test_cancel_and_errors(running: tuple[ErgonTestServer, Client]) -> None:
    server, _ = running
    await ergon(
        server.address, "schedule", "CliOrder", "--json", '{"order_id": "B"}', "--flow-id", "o2"
    )
    await asyncio.sleep(0.3)
    code, out, _ = await ergon(server.address, "cancel", "o2", "--reason", "test")
    assert code == 0 and "CANCELLED" in out
    code, out, _ = await ergon(server.address, "cancel", "o2")
    assert code == 0 and "CANCELLED" in out  # asking again changes nothing
    await ergon(
        server.address, "schedule", "CliOrder", "--json", '{"order_id": "C"}', "--flow-id", "o3"
    )
    await asyncio.sleep(0.3)
    await ergon(server.address, "signal", "o3", "approved", "--json", '{"by": "ann"}')
    await running[1].wait("o3", timeout=10)
    code, _, err = await ergon(server.address, "cancel", "o3")
    assert code == 1 and "FAILED_PRECONDITION FLOW_CLOSED" in err
    code, _, err = await ergon(server.address, "flows", "show", "nope")
    assert code == 1 and "NOT_FOUND FLOW_NOT_FOUND" in err
    code, _, err = await ergon(server.address, "schedule", "NoSuchType")
    assert code == 1 and "UNKNOWN_FLOW_TYPE" in err


async def test_schedule_with_wait_prints_the_outcome_or_says_it_has_not_ended(
    running: tuple[ErgonTestServer, Client],
) -> None:
    server, client = running
    args = ("schedule", "CliOrder", "--json", '{"order_id": "W-1"}', "--flow-id", "w1")
    code, out, err = await ergon(server.address, *args, "--wait", "0.3")
    # It waits for a signal: scheduled, not ended, and the error names the flow.
    assert (code, out) == (1, "") and "flow w1 has not ended after 0.3 s" in err, err
    await client.signal("w1", "approved", {"by": "ann"})
    # No deadline at all is a wait as long as the server allows, call after call.
    assert (await client.wait("w1", timeout=math.inf)).status is FlowStatus.COMPLETED
    code, out, err = await ergon(server.address, *args, "--wait", "10")
    assert code == 0, err
    for expected in ("w1", "COMPLETED", "reserved W-1, approved by ann"):
        assert expected in out, out
    code, out, _ = await ergon(server.address, "--json", *args, "--wait", "10")
    shown = json.loads(out)
    assert (shown["flow_id"], shown["status"]) == ("w1", "COMPLETED")
    assert shown["result"] == "reserved W-1, approved by ann"
    for bad in ("-1", "inf", "soon"):
        code, _, err = await ergon(server.address, *args, "--wait", bad)
        assert code == 2 and "--wait" in err, err


async def test_schedule_with_wait_exits_1_when_the_flow_fails_or_is_cancelled(
    running: tuple[ErgonTestServer, Client],
) -> None:
    server, client = running
    args = ("schedule", "CliRefusal", "--json", '{"reason": "no way"}', "--flow-id", "r1")
    code, out, _ = await ergon(server.address, *args, "--wait", "10")
    assert code == 1 and "FAILED" in out and "no way" in out, out
    code, out, _ = await ergon(server.address, "--json", *args, "--wait", "10")
    assert (code, json.loads(out)["status"]) == (1, "FAILED")
    args = ("schedule", "CliOrder", "--json", '{"order_id": "X"}', "--flow-id", "x1")
    assert (await ergon(server.address, *args))[0] == 0  # without --wait: scheduled is enough
    await client.cancel("x1")
    assert (await client.wait("x1", timeout=10)).status is FlowStatus.CANCELLED
    code, out, _ = await ergon(server.address, *args, "--wait", "10")
    assert code == 1 and "CANCELLED" in out, out


async def test_schedule_input_is_an_empty_object_by_default_and_must_be_json() -> None:
    async with (
        ErgonTestServer(allow_unregistered_flow_types=True) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        code, out, _ = await ergon(server.address, "schedule", "Unrun", "--flow-id", "u1")
        assert (code, out.strip()) == (0, "u1")
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        info = (await stub.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="u1"))).flow
        assert (info.input.encoding, json.loads(info.input.data)) == ("json/plain", {})
        for command in (("schedule", "Unrun"), ("signal", "u1", "go")):
            code, out, err = await ergon(server.address, *command, "--json", "{oops")
            assert (code, out) == (2, ""), err
            assert "argument --json: not valid JSON" in err, err


async def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`ergon flows list | head -1`: the pipe closes under the listing; that is not an error."""
    async with (
        ErgonTestServer(allow_unregistered_flow_types=True) as server,
        server.client() as client,
    ):
        # More rows than a pipe holds (64 KiB), so the listing is still writing when it closes.
        await client.schedule_many([CliOrder(f"order-{n}") for n in range(3_000)])
        read, write = os.pipe()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ergon_worker_sdk.cli",
            "--address",
            server.address,
            "flows",
            "list",
            "--limit",
            "3000",
            stdout=write,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(write)
        with os.fdopen(read, "rb", buffering=0) as reader:
            # The first line or so, then the reader goes away (in a thread: the server this
            # listing asks runs on this loop).
            await asyncio.to_thread(reader.read, 100)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
