"""Large inputs and histories against the gRPC message limit: split, or parked, never a loop.

A stream message over the limit ends the stream, and whatever it carried would come back after
the worker reconnects, to end the stream again: the server must never send one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from ergon_worker_sdk import Client, FlowStatus, Worker, flow, flow_type, schedule_timer, step
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.processes import eventually
from tests.support.sdk import start

MB = 1024 * 1024


@dataclass
@flow_type(type_id="BigInput")
class BigInput:
    blob: str

    @step
    async def measure(self) -> int:
        return len(self.blob)

    @flow
    async def run(self) -> int:
        return await self.measure()


@dataclass
@flow_type(type_id="BigHistory")
class BigHistory:
    steps: int
    pause: float = 0.05

    @step
    async def produce(self, n: int) -> str:
        return str(n) * (900 * 1024)

    @flow
    async def run(self) -> int:
        total = 0
        for n in range(self.steps):
            total += len(await self.produce(n))
        # A durable timer: the flow is assigned again later, with its whole history.
        await schedule_timer(self.pause)
        return total


@pytest.mark.parametrize(
    ("limit", "flows", "size"),
    # 20 MiB over the default 16 MiB limit; 3.6 MiB over a 3 MiB one (under 4 MiB batches).
    [(None, 20, MB), (3 * MB, 4, 900 * 1024)],
    ids=["default-limit", "small-limit"],
)
async def test_assignments_that_fill_several_messages_are_split_and_all_run(
    limit: int | None, flows: int, size: int
) -> None:
    options = {} if limit is None else {"max_message_bytes": limit, "max_payload_bytes": MB}
    async with (
        ErgonTestServer(allow_unregistered_flow_types=True, **options) as server,
        server.client(**({} if limit is None else {"max_message_bytes": limit})) as client,
    ):
        # Queued before the worker comes: its first claim takes them all (a pass asks for a
        # quarter of the capacity), more assignments than the message limit together.
        ids = await client.schedule_many([BigInput("x" * size) for _ in range(flows)])
        worker = Worker(client, "big-inputs", max_concurrency=100)
        await worker.register(BigInput)
        handle = await worker.start()
        try:
            for flow_id in ids:
                outcome = await client.wait(flow_id, timeout=60)
                assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, size)
        finally:
            await handle.shutdown()


@pytest.fixture
async def small_limits() -> AsyncIterator[Client]:
    """A client of a server taking messages of 3 MiB at most (payloads of 1 MiB)."""
    async with (
        ErgonTestServer(max_message_bytes=3 * MB, max_payload_bytes=MB) as server,
        server.client() as client,
    ):
        yield client


async def test_a_flow_too_large_to_assign_is_parked_and_the_stream_carries_on(
    small_limits: Client,
) -> None:
    client = small_limits
    _, handle = await start(client, BigHistory, BigInput, name="big-history")
    try:
        # Four results of 0.9 MiB: assigned again after its timer, with 3.6 MiB of history.
        flow_id = await client.schedule(BigHistory(4))

        await eventually(lambda: _parked_too_large(client, flow_id), within=30, what="parked")
        record = await client.get(flow_id)
        assert record.status is FlowStatus.PENDING
        assert "raise --max-message-bytes" in record.error.message
        # The same worker's stream still works: a small flow runs through it.
        small = await client.run(BigInput("ok"), timeout=30)
        assert (small.status, small.result) == (FlowStatus.COMPLETED, 2)
        # A flow under the limit with the same shape runs to its end.
        fits = await client.run(BigHistory(2), timeout=30)
        assert (fits.status, fits.result) == (FlowStatus.COMPLETED, 2 * 900 * 1024)
    finally:
        await handle.shutdown()


async def test_poll_workers_get_no_oversized_assignment_either(small_limits: Client) -> None:
    client = small_limits
    _, handle = await start(client, BigHistory, name="big-history")
    flow_id = await client.schedule(BigHistory(4, pause=2.0))
    # Let the stream worker run it up to its timer, then leave the rest to a poller.
    await eventually(lambda: _status(client, flow_id, FlowStatus.WAITING), what="the flow waits")
    await handle.shutdown()
    await _poll_until_parked(client, flow_id)


async def _parked_too_large(client: Client, flow_id: str) -> bool:
    record = await client.get(flow_id)
    return record.error is not None and record.error.reason == "ASSIGNMENT_TOO_LARGE"


async def _status(client: Client, flow_id: str, status: FlowStatus) -> bool:
    return (await client.get(flow_id)).status is status


async def _poll_until_parked(client: Client, flow_id: str) -> None:
    from ergon_worker_sdk.proto.ergon.v1 import worker_pb2, worker_pb2_grpc

    stub = worker_pb2_grpc.WorkerServiceStub(client.channel)

    async def parked() -> bool:
        response = await stub.PollTask(
            worker_pb2.PollTaskRequest(
                worker_id="poller", flow_types=["BigHistory"], protocol_version=1, timeout_ms=500
            )
        )
        # Never the assignment itself: it would not fit in the response.
        assert not response.HasField("assignment")
        return await _parked_too_large(client, flow_id)

    await eventually(parked, within=30, what="the poller's oversized flow parked")


@dataclass
@flow_type(type_id="LargeResult")
class LargeResult:
    size: int

    @step
    async def produce(self) -> str:
        return "r" * self.size

    @flow
    async def run(self) -> int:
        return len(await self.produce())


async def test_a_workers_messages_stay_under_its_clients_message_limit() -> None:
    async with (
        ErgonTestServer(
            max_message_bytes=3 * MB, max_payload_bytes=MB, allow_unregistered_flow_types=True
        ) as server,
        server.client(max_message_bytes=3 * MB) as client,
    ):
        # Queued before the worker comes, they run together, and their results (5.4 MiB in
        # all, over the 3 MiB limit) are ready to send at once: in several messages.
        ids = await client.schedule_many([LargeResult(900 * 1024) for _ in range(6)])
        _, handle = await start(client, LargeResult, name="large-results", capacity=24)
        try:
            for flow_id in ids:
                outcome = await client.wait(flow_id, timeout=30)
                assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, 900 * 1024)
        finally:
            await handle.shutdown()


async def test_assignments_never_written_to_a_broken_stream_go_back_at_once() -> None:
    """A batch split over several messages, the stream broken while writing the first: the
    flows of the messages after it are given back, not left to their leases."""
    from ergon_worker_sdk.proto.ergon.v1 import worker_pb2, worker_pb2_grpc

    flows = 6
    async with (
        # A long lease: a flow back before it lapses was given back.
        ErgonTestServer(
            max_message_bytes=3 * MB,
            max_payload_bytes=MB,
            allow_unregistered_flow_types=True,
            lease_ttl_ms=120_000,
        ) as server,
        server.client(max_message_bytes=3 * MB) as client,
        # No BDP probing: the stream's window stays at 64 KiB, so a worker that does not read
        # holds the server's first 0.9 MiB message half written.
        grpc.aio.insecure_channel(
            server.address,
            options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 4 * MB)],
        ) as channel,
    ):
        # Queued before the worker comes: its first claim takes them all (a quarter of its
        # capacity), one message each (two would be over half the limit).
        ids = await client.schedule_many([BigInput("x" * (900 * 1024)) for _ in range(flows)])
        call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
        register = worker_pb2.Register(
            worker_id="never-reads", flow_types=["BigInput"], capacity=4 * flows, protocol_version=1
        )
        await call.write(
            worker_pb2.ConnectRequest(events=[worker_pb2.WorkerEvent(register=register)])
        )
        first = await call.read()
        assert isinstance(first, worker_pb2.ConnectResponse)
        assert first.events[0].WhichOneof("event") == "registered"

        async def all_running() -> bool:
            return all([await _status(client, i, FlowStatus.RUNNING) for i in ids])

        await eventually(all_running, within=30, what="all flows leased to the stream")
        call.cancel()

        async def given_back() -> bool:
            statuses = [(await client.get(i)).status for i in ids]
            return statuses.count(FlowStatus.PENDING) == flows - 1

        # The first message may have reached the worker: its flow waits for its lease.
        await eventually(given_back, within=20, what="the unwritten flows given back")
        statuses = [(await client.get(i)).status for i in ids]
        assert statuses.count(FlowStatus.RUNNING) == 1


async def test_a_resume_too_large_for_one_message_comes_as_wakeups_then_its_ack() -> None:
    """A suspend meeting four satisfied waits of 0.9 MiB each: 3.6 MiB of entries, over the
    3 MiB limit in one ack, reach the worker as four wakeups before an ack without them."""
    from ergon_worker_sdk.proto.ergon.v1 import (
        common_pb2,
        scheduler_pb2,
        scheduler_pb2_grpc,
        worker_pb2,
        worker_pb2_grpc,
    )

    def events(*items: worker_pb2.WorkerEvent) -> worker_pb2.ConnectRequest:
        return worker_pb2.ConnectRequest(events=list(items))

    def payload(data: bytes) -> common_pb2.Payload:
        return common_pb2.Payload(encoding="json/plain", data=data)

    async with (
        ErgonTestServer(
            max_message_bytes=3 * MB, max_payload_bytes=MB, allow_unregistered_flow_types=True
        ) as server,
        grpc.aio.insecure_channel(
            server.address, options=[("grpc.max_receive_message_length", 4 * MB)]
        ) as channel,
    ):
        call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
        register = worker_pb2.Register(
            worker_id="raw", flow_types=["Parent", "Kid"], capacity=10, protocol_version=1
        )
        await call.write(events(worker_pb2.WorkerEvent(register=register)))
        received: list[worker_pb2.ServerEvent] = []

        async def read_until(done: object) -> list[worker_pb2.ServerEvent]:
            """Read events until `done(events read so far)`; return those."""
            start = len(received)
            while not done(received[start:]):  # type: ignore[operator]
                response = await call.read()
                assert isinstance(response, worker_pb2.ConnectResponse)
                received.extend(response.events)
            return received[start:]

        def kinds(found: list[worker_pb2.ServerEvent], kind: str) -> list[worker_pb2.ServerEvent]:
            return [e for e in found if e.WhichOneof("event") == kind]

        await read_until(lambda found: kinds(found, "registered"))
        await scheduler_pb2_grpc.SchedulerServiceStub(channel).ScheduleFlow(
            scheduler_pb2.ScheduleFlowRequest(flow_id="p", flow_type="Parent", input=payload(b"0"))
        )
        (assignment,) = kinds(await read_until(lambda f: kinds(f, "assignment")), "assignment")
        token = assignment.assignment.lease_token
        keys = [f"c{n}" for n in range(4)]
        await call.write(
            events(
                *[
                    worker_pb2.WorkerEvent(
                        seq=seq,
                        wait=worker_pb2.WaitRequest(
                            flow_id="p",
                            lease_token=token,
                            key=key,
                            child=worker_pb2.ChildWait(
                                child_flow_id=f"p/{key}", flow_type="Kid", input=payload(b"0")
                            ),
                        ),
                    )
                    for seq, key in enumerate(keys, start=1)
                ]
            )
        )
        found = await read_until(
            lambda f: len(kinds(f, "ack")) == 4 and len(kinds(f, "assignment")) == 4
        )
        assert all(a.ack.code == 0 and not a.ack.entries for a in kinds(found, "ack"))
        result = payload(b'"' + b"r" * (900 * 1024) + b'"')
        for seq, kid in enumerate(kinds(found, "assignment"), start=5):
            done = worker_pb2.FlowCompleted(
                flow_id=kid.assignment.flow_id,
                lease_token=kid.assignment.lease_token,
                result=result,
            )
            await call.write(events(worker_pb2.WorkerEvent(seq=seq, flow_completed=done)))
        # Each child's end wakes the parent's wait (one event each).
        await read_until(lambda f: len(kinds(f, "ack")) == 4 and len(kinds(f, "wakeup")) == 4)

        # The worker missed those wakeups, say: it suspends on all four.
        suspend = worker_pb2.Suspend(flow_id="p", lease_token=token, open_keys=keys)
        await call.write(events(worker_pb2.WorkerEvent(seq=9, suspend=suspend)))
        found = await read_until(lambda f: any(a.ack.seq == 9 for a in kinds(f, "ack")))
        (ack,) = [a.ack for a in kinds(found, "ack") if a.ack.seq == 9]
        assert (ack.code, ack.suspended, len(ack.entries)) == (0, False, 0)
        wakeups = [w.wakeup for w in kinds(found, "wakeup")]
        assert sorted(w.entry.key for w in wakeups) == keys
        assert all(w.flow_id == "p" and w.lease_token == token for w in wakeups)
        assert all(w.entry.result == result for w in wakeups)
        call.cancel()
