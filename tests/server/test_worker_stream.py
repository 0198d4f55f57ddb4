"""The worker stream at the protocol level, with raw stubs: registration, fencing, acks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from ergon_server.rpc.worker import MAX_HANDLING_PER_STREAM
from ergon_worker_sdk.errors import translate
from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from ergon_worker_sdk.testing import ErgonTestServer

Call = grpc.aio.StreamStreamCall[worker_pb2.ConnectRequest, worker_pb2.ConnectResponse]


@pytest.fixture
async def channel(test_server: ErgonTestServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(test_server.address) as channel:
        yield channel


def event(**kw: object) -> worker_pb2.ConnectRequest:
    return worker_pb2.ConnectRequest(events=[worker_pb2.WorkerEvent(**kw)])  # type: ignore[arg-type]


def register(
    capacity: int = 2, version: int = 1, held: list[worker_pb2.HeldLease] | None = None
) -> worker_pb2.ConnectRequest:
    return event(
        register=worker_pb2.Register(
            worker_id="raw",
            flow_types=["Raw"],
            capacity=capacity,
            protocol_version=version,
            held_leases=held or [],
        )
    )


async def read_events(call: Call, kind: str, count: int = 1) -> list[worker_pb2.ServerEvent]:
    found: list[worker_pb2.ServerEvent] = []
    while len(found) < count:
        response = await call.read()
        assert isinstance(response, worker_pb2.ConnectResponse)
        found += [e for e in response.events if e.WhichOneof("event") == kind]
    return found


async def schedule(channel: grpc.aio.Channel, flow_id: str) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    await stub.ScheduleFlow(
        scheduler_pb2.ScheduleFlowRequest(
            flow_id=flow_id,
            flow_type="Raw",
            input=common_pb2.Payload(encoding="json/plain", data=b"{}"),
        )
    )


async def test_stale_lease_tokens_are_refused_and_fresh_ones_accepted(
    channel: grpc.aio.Channel,
) -> None:
    call: Call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(register())
    (registered,) = await read_events(call, "registered")
    assert registered.registered.session_id
    await schedule(channel, "raw-1")
    (assignment,) = await read_events(call, "assignment")
    token = assignment.assignment.lease_token
    payload = common_pb2.Payload(encoding="json/plain", data=b"1")
    stale = worker_pb2.StepResult(
        flow_id="raw-1", lease_token=token + 7, key="a#1", attempts=1, result=payload
    )
    await call.write(event(seq=1, step_result=stale))
    (ack,) = await read_events(call, "ack")
    assert (ack.ack.seq, ack.ack.code, ack.ack.reason) == (
        1,
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "LEASE_LOST",
    )
    fresh = worker_pb2.StepResult(
        flow_id="raw-1", lease_token=token, key="a#1", attempts=1, result=payload
    )
    await call.write(event(seq=2, step_result=fresh))
    await call.write(event(seq=3, step_result=fresh))  # a resend after a lost ack is fine
    acks = await read_events(call, "ack", 2)
    assert sorted((a.ack.seq, a.ack.code) for a in acks) == [(2, 0), (3, 0)]
    done = worker_pb2.FlowCompleted(flow_id="raw-1", lease_token=token, result=payload)
    await call.write(event(seq=4, flow_completed=done))
    await call.write(event(seq=5, flow_completed=done))
    acks = await read_events(call, "ack", 2)
    assert sorted((a.ack.seq, a.ack.code) for a in acks) == [(4, 0), (5, 0)]
    late = worker_pb2.StepResult(
        flow_id="raw-1", lease_token=token, key="b#1", attempts=1, result=payload
    )
    await call.write(event(seq=6, step_result=late))
    (ack,) = await read_events(call, "ack")
    assert ack.ack.reason == "LEASE_LOST"
    missing = worker_pb2.FlowCompleted(flow_id="nope", lease_token=1, result=payload)
    await call.write(event(seq=7, flow_completed=missing))
    (ack,) = await read_events(call, "ack")
    assert (ack.ack.code, ack.ack.reason) == (grpc.StatusCode.NOT_FOUND.value[0], "FLOW_NOT_FOUND")
    await call.write(register())  # register again mid-stream: refused, stream stays up
    await call.write(event(seq=8, heartbeat=worker_pb2.Heartbeat()))
    (ack,) = await read_events(call, "ack")
    assert (ack.ack.seq, ack.ack.code) == (8, 0)
    call.cancel()


async def test_a_flow_end_naming_unrecorded_steps_waits_for_them(
    channel: grpc.aio.Channel,
) -> None:
    call: Call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(register())
    await read_events(call, "registered")
    await schedule(channel, "raw-end")
    (assignment,) = await read_events(call, "assignment")
    token = assignment.assignment.lease_token
    payload = common_pb2.Payload(encoding="json/plain", data=b"1")
    done = worker_pb2.FlowCompleted(
        flow_id="raw-end", lease_token=token, result=payload, requires_keys=["last#1"]
    )
    await call.write(event(seq=1, flow_completed=done))
    (ack,) = await read_events(call, "ack")
    assert (ack.ack.seq, ack.ack.code, ack.ack.reason) == (
        1,
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "STEP_NOT_RECORDED",
    )
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    flow = await stub.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="raw-end"))
    assert flow.flow.status == common_pb2.FLOW_STATUS_RUNNING
    # The last result and the end in one message: both apply, the result first.
    last = worker_pb2.StepResult(
        flow_id="raw-end", lease_token=token, key="last#1", attempts=1, result=payload
    )
    await call.write(
        worker_pb2.ConnectRequest(
            events=[
                worker_pb2.WorkerEvent(seq=2, step_result=last),
                worker_pb2.WorkerEvent(seq=3, flow_completed=done),
            ]
        )
    )
    acks = await read_events(call, "ack", 2)
    assert sorted((a.ack.seq, a.ack.code) for a in acks) == [(2, 0), (3, 0)]
    flow = await stub.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="raw-end"))
    assert flow.flow.status == common_pb2.FLOW_STATUS_COMPLETED
    history = await stub.GetFlowHistory(scheduler_pb2.GetFlowHistoryRequest(flow_id="raw-end"))
    assert [e.key for e in history.entries] == ["last#1"]
    call.cancel()


async def test_capacity_is_never_exceeded_and_capacity_updates_apply(
    channel: grpc.aio.Channel,
) -> None:
    call: Call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(register(capacity=2))
    await read_events(call, "registered")
    for i in range(5):
        await schedule(channel, f"cap-{i}")
    assignments = await read_events(call, "assignment", 2)
    await call.write(event(seq=1, heartbeat=worker_pb2.Heartbeat()))
    await read_events(call, "ack")  # had a third assignment come, it would precede this ack
    first = assignments[0].assignment
    await call.write(
        event(
            seq=2,
            flow_completed=worker_pb2.FlowCompleted(
                flow_id=first.flow_id, lease_token=first.lease_token
            ),
        )
    )
    (more,) = await read_events(call, "assignment")
    assert more.assignment.flow_id not in {a.assignment.flow_id for a in assignments}
    call.cancel()


@pytest.mark.parametrize(
    ("first", "code", "reason"),
    [
        (
            event(heartbeat=worker_pb2.Heartbeat()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REGISTER_FIRST",
        ),
        (register(version=99), grpc.StatusCode.FAILED_PRECONDITION, "PROTOCOL_VERSION"),
        (register(capacity=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
    ids=["no-register", "wrong-version", "negative-capacity"],
)
async def test_bad_registrations_are_refused(
    channel: grpc.aio.Channel, first: worker_pb2.ConnectRequest, code: grpc.StatusCode, reason: str
) -> None:
    call: Call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(first)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    error = translate(caught.value)
    assert (error.code, error.reason) == (code, reason)


async def test_a_client_may_not_hold_more_streams_than_the_limit() -> None:
    async with (
        ErgonTestServer(max_streams_per_client=3) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        calls: list[Call] = []
        for _ in range(3):
            call: Call = stub.Connect()
            await call.write(register())
            await read_events(call, "registered")
            calls.append(call)
        refused: Call = stub.Connect()
        await refused.write(register())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await refused.read()
        error = translate(caught.value)
        assert (error.code, error.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS",
        )
        calls.pop().cancel()
        async with asyncio.timeout(5):
            while True:  # the server notices the cancelled stream and frees its place
                again: Call = stub.Connect()
                await again.write(register())
                try:
                    await read_events(again, "registered")
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
        for call in [*calls, again]:
            call.cancel()


async def test_a_worker_sending_faster_than_the_store_writes_is_held_back(
    test_server: ErgonTestServer, channel: grpc.aio.Channel
) -> None:
    store = test_server._server.store
    record_steps = store.record_steps
    store_open = asyncio.Event()
    in_flight = 0
    most = 0

    async def slow_record_steps(*args: object) -> object:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await store_open.wait()  # a store that has stopped answering for now
            return await record_steps(*args)
        finally:
            in_flight -= 1

    store.record_steps = slow_record_steps
    call: Call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(register())
    await read_events(call, "registered")
    step = worker_pb2.StepResult(
        flow_id="none",
        lease_token=1,
        key="a#1",
        attempts=1,
        kind=common_pb2.ENTRY_KIND_STEP,
        args_hash="h",
        result=common_pb2.Payload(encoding="json/plain", data=b"1"),
    )
    for seq in range(1, 201):
        await asyncio.wait_for(call.write(event(seq=seq, step_result=step)), timeout=10)
    await asyncio.sleep(0.5)
    # 200 messages sent (HTTP/2 buffers them), but only so many are being handled.
    assert most == MAX_HANDLING_PER_STREAM
    store_open.set()
    acks = await asyncio.wait_for(read_events(call, "ack", 200), timeout=30)
    assert sorted(a.ack.seq for a in acks) == list(range(1, 201))
    call.cancel()
