"""Worker-poll: unary PollTask, RecordStep, CompleteTask and ExtendLease on every store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.postgres import temporary_database_sync

LEASE_TTL_MS = 1_500


@pytest.fixture(params=["sqlite", "postgres"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ErgonTestServer]:
    with contextlib.ExitStack() as stack:
        db = None
        if request.param == "postgres":
            db = stack.enter_context(temporary_database_sync("ergon_poll"))
        async with ErgonTestServer(
            db,
            allow_unregistered_flow_types=True,
            lease_ttl_ms=LEASE_TTL_MS,
            heartbeat_interval_ms=500,
        ) as server:
            yield server


@pytest.fixture
async def stubs(
    server: ErgonTestServer,
) -> AsyncIterator[
    tuple[worker_pb2_grpc.WorkerServiceStub, scheduler_pb2_grpc.SchedulerServiceStub]
]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield (
            worker_pb2_grpc.WorkerServiceStub(channel),
            scheduler_pb2_grpc.SchedulerServiceStub(channel),
        )


Stubs = tuple[worker_pb2_grpc.WorkerServiceStub, scheduler_pb2_grpc.SchedulerServiceStub]


def payload(data: bytes) -> common_pb2.Payload:
    return common_pb2.Payload(encoding="json/plain", data=data)


async def schedule(scheduler: scheduler_pb2_grpc.SchedulerServiceStub, flow_id: str) -> None:
    await scheduler.ScheduleFlow(
        scheduler_pb2.ScheduleFlowRequest(flow_id=flow_id, flow_type="Poll", input=payload(b"{}"))
    )


async def poll(
    worker: worker_pb2_grpc.WorkerServiceStub, timeout_ms: int = 5_000
) -> worker_pb2.PollTaskResponse:
    return await worker.PollTask(
        worker_pb2.PollTaskRequest(
            worker_id="poller", flow_types=["Poll"], timeout_ms=timeout_ms, protocol_version=1
        )
    )


def step(
    assignment: worker_pb2.Assignment, key: str, data: bytes, token_offset: int = 0
) -> worker_pb2.RecordStepRequest:
    return worker_pb2.RecordStepRequest(
        step=worker_pb2.StepResult(
            flow_id=assignment.flow_id,
            lease_token=assignment.lease_token + token_offset,
            key=key,
            attempts=1,
            result=payload(data),
        )
    )


def completed(
    assignment: worker_pb2.Assignment, data: bytes, token_offset: int = 0
) -> worker_pb2.CompleteTaskRequest:
    return worker_pb2.CompleteTaskRequest(
        completed=worker_pb2.FlowCompleted(
            flow_id=assignment.flow_id,
            lease_token=assignment.lease_token + token_offset,
            result=payload(data),
        )
    )


async def status_of(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub, flow_id: str
) -> common_pb2.FlowInfo:
    response = await scheduler.GetFlow(scheduler_pb2.GetFlowRequest(flow_id=flow_id))
    return response.flow


def reason(error: grpc.aio.AioRpcError) -> str:
    # The reason rides in the rich status; the message names it too.
    return error.details() or ""


async def test_a_flow_runs_to_its_end_over_unary_calls(stubs: Stubs) -> None:
    worker, scheduler = stubs
    await schedule(scheduler, "p-1")
    polled = await poll(worker)
    assert polled.HasField("assignment") and polled.lease_ttl_ms == LEASE_TTL_MS
    assignment = polled.assignment
    assert (assignment.flow_id, assignment.flow_type, assignment.attempt) == ("p-1", "Poll", 1)
    assert (await status_of(scheduler, "p-1")).status == common_pb2.FLOW_STATUS_RUNNING
    await worker.RecordStep(step(assignment, "a#1", b"1"))
    await worker.RecordStep(step(assignment, "b#1", b"2"))
    await worker.CompleteTask(completed(assignment, b'"done"'))
    flow = await status_of(scheduler, "p-1")
    assert flow.status == common_pb2.FLOW_STATUS_COMPLETED and flow.result.data == b'"done"'
    history = await scheduler.GetFlowHistory(scheduler_pb2.GetFlowHistoryRequest(flow_id="p-1"))
    assert [(e.key, e.result.data) for e in history.entries] == [("a#1", b"1"), ("b#1", b"2")]


async def test_an_empty_poll_answers_without_an_assignment(stubs: Stubs) -> None:
    worker, _ = stubs
    polled = await poll(worker, timeout_ms=200)
    assert not polled.HasField("assignment")


async def test_a_waiting_poll_gets_a_flow_scheduled_meanwhile(stubs: Stubs) -> None:
    worker, scheduler = stubs
    waiting = asyncio.ensure_future(poll(worker, timeout_ms=10_000))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await schedule(scheduler, "p-late")
    polled = await asyncio.wait_for(waiting, 5)
    assert polled.assignment.flow_id == "p-late"


async def test_one_flow_goes_to_one_of_two_pollers(stubs: Stubs) -> None:
    worker, scheduler = stubs
    first = asyncio.ensure_future(poll(worker, timeout_ms=1_000))
    second = asyncio.ensure_future(poll(worker, timeout_ms=1_000))
    await asyncio.sleep(0.2)
    await schedule(scheduler, "p-one")
    answers = await asyncio.gather(first, second)
    assert sorted(a.HasField("assignment") for a in answers) == [False, True]


async def test_stale_leases_are_refused_and_nothing_is_recorded(stubs: Stubs) -> None:
    worker, scheduler = stubs
    await schedule(scheduler, "p-stale")
    assignment = (await poll(worker)).assignment
    for call in (
        worker.RecordStep(step(assignment, "a#1", b"1", token_offset=1)),
        worker.CompleteTask(completed(assignment, b"1", token_offset=1)),
        worker.ExtendLease(
            worker_pb2.ExtendLeaseRequest(
                flow_id=assignment.flow_id, lease_token=assignment.lease_token + 1
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "lease" in reason(refused.value)
    history = await scheduler.GetFlowHistory(scheduler_pb2.GetFlowHistoryRequest(flow_id="p-stale"))
    assert list(history.entries) == []
    assert (await status_of(scheduler, "p-stale")).status == common_pb2.FLOW_STATUS_RUNNING


async def test_an_extended_lease_outlives_its_ttl_and_a_lapsed_one_goes_to_another_poller(
    stubs: Stubs,
) -> None:
    worker, scheduler = stubs
    await schedule(scheduler, "p-lease")
    assignment = (await poll(worker)).assignment
    request = worker_pb2.ExtendLeaseRequest(
        flow_id=assignment.flow_id, lease_token=assignment.lease_token
    )
    for _ in range(4):  # twice the TTL, renewed
        await asyncio.sleep(LEASE_TTL_MS / 1000 / 2)
        extended = await worker.ExtendLease(request)
        assert extended.lease_expires_at_ms > 0
    await worker.RecordStep(step(assignment, "a#1", b"1"))
    # No more renewals: the lease lapses and the flow goes to the next poller, with its journal.
    again = (await poll(worker, timeout_ms=10_000)).assignment
    assert again.flow_id == "p-lease" and again.lease_token > assignment.lease_token
    assert [e.key for e in again.journal] == ["a#1"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await worker.CompleteTask(completed(assignment, b"1"))
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    await worker.CompleteTask(completed(again, b"2"))
    assert (await status_of(scheduler, "p-lease")).result.data == b"2"


async def test_a_released_flow_is_polled_again_and_a_failed_one_retried(stubs: Stubs) -> None:
    worker, scheduler = stubs
    await schedule(scheduler, "p-back")
    first = (await poll(worker)).assignment
    await worker.CompleteTask(
        worker_pb2.CompleteTaskRequest(
            release=worker_pb2.Release(flow_id="p-back", lease_token=first.lease_token)
        )
    )
    second = (await poll(worker)).assignment
    assert second.flow_id == "p-back" and second.attempt == 1
    failure = common_pb2.Failure(type="Boom", message="try again")
    await worker.CompleteTask(
        worker_pb2.CompleteTaskRequest(
            failed=worker_pb2.FlowFailed(
                flow_id="p-back",
                lease_token=second.lease_token,
                failure=failure,
                retry_delay_ms=1,
            )
        )
    )
    third = (await poll(worker)).assignment
    assert third.flow_id == "p-back" and third.attempt == 2


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (
            lambda w: w.PollTask(
                worker_pb2.PollTaskRequest(worker_id="w", timeout_ms=10, protocol_version=1)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda w: w.PollTask(
                worker_pb2.PollTaskRequest(
                    worker_id="w", flow_types=["Poll"], timeout_ms=-1, protocol_version=1
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda w: w.PollTask(
                worker_pb2.PollTaskRequest(
                    worker_id="w", flow_types=["Poll"], timeout_ms=10, protocol_version=99
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            lambda w: w.CompleteTask(worker_pb2.CompleteTaskRequest()),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda w: w.RecordStep(
                worker_pb2.RecordStepRequest(
                    step=worker_pb2.StepResult(flow_id="nope", lease_token=1, key="$bad")
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda w: w.ExtendLease(worker_pb2.ExtendLeaseRequest(flow_id="nope", lease_token=1)),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
    ids=["no-types", "negative-timeout", "protocol", "no-outcome", "bad-key", "unknown-flow"],
)
async def test_bad_poll_requests_get_precise_statuses(
    stubs: Stubs, call: object, code: grpc.StatusCode
) -> None:
    worker, _ = stubs
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(worker)  # type: ignore[operator]
    assert refused.value.code() is code


async def test_a_flow_a_poller_gives_back_goes_at_once_to_a_waiting_stream_worker() -> None:
    # The dispatcher's safety poll is a minute here: only a wake can hand the flow on in time.
    async with (
        ErgonTestServer(
            allow_unregistered_flow_types=True, dispatch_poll_interval_ms=60_000
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        await schedule(scheduler_pb2_grpc.SchedulerServiceStub(channel), "p-handoff")
        taken = (await poll(worker)).assignment
        stream = worker.Connect()
        register = worker_pb2.Register(
            worker_id="streamer", flow_types=["Poll"], capacity=1, protocol_version=1
        )
        await stream.write(
            worker_pb2.ConnectRequest(events=[worker_pb2.WorkerEvent(register=register)])
        )
        first = await stream.read()
        assert isinstance(first, worker_pb2.ConnectResponse)
        assert first.events[0].WhichOneof("event") == "registered"
        await worker.CompleteTask(
            worker_pb2.CompleteTaskRequest(
                release=worker_pb2.Release(flow_id="p-handoff", lease_token=taken.lease_token)
            )
        )
        async with asyncio.timeout(10):
            while True:
                response = await stream.read()
                assert isinstance(response, worker_pb2.ConnectResponse)
                assigned = [e for e in response.events if e.WhichOneof("event") == "assignment"]
                if assigned:
                    break
        assert assigned[0].assignment.flow_id == "p-handoff"
        stream.cancel()
