"""SchedulerService over real gRPC: idempotency, precise statuses, nothing stored on bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from ergon_worker_sdk import Client, FlowStatus
from ergon_worker_sdk.errors import translate
from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
)
from ergon_worker_sdk.testing import ErgonTestServer

TYPE = "OrderProcessor"


@pytest.fixture
async def server() -> AsyncIterator[ErgonTestServer]:
    async with ErgonTestServer(max_payload_bytes=64 * 1024) as server:
        # Make the type known, as a worker registering it would.
        await server._server.store.register_flow_types([TYPE], 0)
        yield server


@pytest.fixture
async def stub(
    server: ErgonTestServer,
) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield scheduler_pb2_grpc.SchedulerServiceStub(channel)


def schedule_request(
    flow_id: str = "", data: bytes = b'{"order_id":"A","amount":1}', **kw: object
) -> scheduler_pb2.ScheduleFlowRequest:
    return scheduler_pb2.ScheduleFlowRequest(
        flow_id=flow_id,
        flow_type=kw.pop("flow_type", TYPE),  # type: ignore[arg-type]
        input=common_pb2.Payload(encoding="json/plain", data=data),
        **kw,  # type: ignore[arg-type]
    )


async def stored_flows(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> list[common_pb2.FlowInfo]:
    response = await stub.ListFlows(scheduler_pb2.ListFlowsRequest(page_size=1000))
    return list(response.flows)


async def test_scheduling_the_same_flow_id_twice_returns_the_same_flow(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    first = await stub.ScheduleFlow(schedule_request("order-1"))
    second = await stub.ScheduleFlow(schedule_request("order-1"))
    assert (first.flow_id, first.existing) == ("order-1", False)
    assert (second.flow_id, second.existing) == ("order-1", True)
    assert len(await stored_flows(stub)) == 1


async def test_same_flow_id_with_other_input_is_already_exists(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    await stub.ScheduleFlow(schedule_request("order-1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ScheduleFlow(schedule_request("order-1", data=b'{"order_id":"B","amount":2}'))
    error = translate(caught.value)
    assert error.code is grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "FLOW_ALREADY_SCHEDULED"
    flows = await stored_flows(stub)
    assert len(flows) == 1 and flows[0].input.data == b'{"order_id":"A","amount":1}'


async def test_repeated_request_id_returns_the_first_answer(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    first = await stub.ScheduleFlow(schedule_request(request_id="req-1"))
    again = await stub.ScheduleFlow(schedule_request(request_id="req-1"))
    assert first.flow_id and again.flow_id == first.flow_id
    assert again.existing
    assert len(await stored_flows(stub)) == 1


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (schedule_request(flow_type="NoSuchType"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_FLOW_TYPE"),
        (
            schedule_request(data=b"{not json"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_PAYLOAD",
        ),
        (schedule_request(data=b"\xff\xfe"), grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_PAYLOAD"),
        (
            scheduler_pb2.ScheduleFlowRequest(
                flow_type=TYPE, input=common_pb2.Payload(encoding="x/y", data=b"1")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_ENCODING",
        ),
        (
            schedule_request(data=b'"' + b"x" * 70_000 + b'"'),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PAYLOAD_TOO_LARGE",
        ),
        (schedule_request(flow_id="x" * 300), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID"),
        (schedule_request(flow_id="bad\x00id"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID"),
        (schedule_request(flow_type=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID"),
    ],
    ids=[
        "unknown-type",
        "malformed-json",
        "invalid-utf8",
        "unknown-encoding",
        "oversized",
        "long-id",
        "control-char-id",
        "empty-type",
    ],
)
@pytest.mark.parametrize("method", ["ScheduleFlow", "RunFlow"])
async def test_bad_schedule_requests_get_precise_statuses_and_store_nothing(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    request_: scheduler_pb2.ScheduleFlowRequest,
    code: grpc.StatusCode,
    reason: str,
    method: str,
) -> None:
    await stub.ScheduleFlow(schedule_request("existing"))
    before = await stored_flows(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "RunFlow":
            await stub.RunFlow(scheduler_pb2.RunFlowRequest(flow=request_, timeout_ms=1000))
        else:
            await stub.ScheduleFlow(request_)
    error = translate(caught.value)
    assert (error.code, error.reason) == (code, reason), error.message
    assert error.message
    assert await stored_flows(stub) == before


async def test_run_flow_schedules_once_and_answers_with_the_flow_when_the_wait_ends(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    # No worker runs the type here, so the wait always times out with the flow still PENDING.
    request = scheduler_pb2.RunFlowRequest(flow=schedule_request(request_id="run-1"), timeout_ms=50)
    first = await stub.RunFlow(request)
    again = await stub.RunFlow(request)
    assert (first.existing, first.done) == (False, False)
    assert first.flow.status == common_pb2.FLOW_STATUS_PENDING and first.flow.flow_id
    assert (again.existing, again.done, again.flow.flow_id) == (True, False, first.flow.flow_id)
    await stub.CancelFlow(scheduler_pb2.CancelFlowRequest(flow_id=first.flow.flow_id))
    ended = await stub.RunFlow(request)
    assert (ended.existing, ended.done) == (True, True)
    assert ended.flow.status == common_pb2.FLOW_STATUS_CANCELLED
    assert len(await stored_flows(stub)) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunFlow(
            scheduler_pb2.RunFlowRequest(flow=schedule_request(flow_id="order-1"), timeout_ms=-1)
        )
    error = translate(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIMEOUT")
    assert len(await stored_flows(stub)) == 1


async def test_inline_json_input_is_accepted(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    value = struct_pb2.Value()
    value.struct_value.update({"order_id": "J", "amount": 3})
    request = scheduler_pb2.ScheduleFlowRequest(
        flow_type=TYPE, input=common_pb2.Payload(json=value)
    )
    response = await stub.ScheduleFlow(request)
    flow = (await stub.GetFlow(scheduler_pb2.GetFlowRequest(flow_id=response.flow_id))).flow
    assert flow.input.json.struct_value["order_id"] == "J"
    assert flow.status == common_pb2.FLOW_STATUS_PENDING


async def test_get_wait_list_history_cancel(
    server: ErgonTestServer, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
) -> None:
    for i in range(5):
        await stub.ScheduleFlow(schedule_request(f"f{i}"))
    page = await stub.ListFlows(scheduler_pb2.ListFlowsRequest(page_size=2))
    assert [f.flow_id for f in page.flows] == ["f0", "f1"]
    rest = await stub.ListFlows(
        scheduler_pb2.ListFlowsRequest(page_size=10, page_token=page.next_page_token)
    )
    assert [f.flow_id for f in rest.flows] == ["f2", "f3", "f4"] and not rest.next_page_token
    waited = await stub.WaitFlow(scheduler_pb2.WaitFlowRequest(flow_id="f0", timeout_ms=50))
    assert not waited.done and waited.flow.status == common_pb2.FLOW_STATUS_PENDING
    cancelled = await stub.CancelFlow(scheduler_pb2.CancelFlowRequest(flow_id="f0", reason="test"))
    assert cancelled.flow.status == common_pb2.FLOW_STATUS_CANCELLED
    waited = await stub.WaitFlow(scheduler_pb2.WaitFlowRequest(flow_id="f0", timeout_ms=5000))
    assert waited.done
    # Asked again (a retry whose first answer was lost, say): the same cancelled flow.
    again = await stub.CancelFlow(scheduler_pb2.CancelFlowRequest(flow_id="f0", reason="again"))
    assert again.flow.status == common_pb2.FLOW_STATUS_CANCELLED
    assert again.flow.error.message == cancelled.flow.error.message
    only_cancelled = await stub.ListFlows(
        scheduler_pb2.ListFlowsRequest(statuses=[common_pb2.FLOW_STATUS_CANCELLED])
    )
    assert [f.flow_id for f in only_cancelled.flows] == ["f0"]
    history = await stub.GetFlowHistory(scheduler_pb2.GetFlowHistoryRequest(flow_id="f1"))
    assert list(history.entries) == []
    for call in (
        stub.GetFlow(scheduler_pb2.GetFlowRequest(flow_id="nope")),
        stub.GetFlowHistory(scheduler_pb2.GetFlowHistoryRequest(flow_id="nope")),
        stub.CancelFlow(scheduler_pb2.CancelFlowRequest(flow_id="nope")),
        stub.WaitFlow(scheduler_pb2.WaitFlowRequest(flow_id="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert (caught.value.code(), translate(caught.value).reason) == (
            grpc.StatusCode.NOT_FOUND,
            "FLOW_NOT_FOUND",
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListFlows(scheduler_pb2.ListFlowsRequest(page_token="garbage"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_signals_are_stored_in_order_and_refused_for_unknown_or_closed_flows(
    server: ErgonTestServer, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
) -> None:
    await stub.ScheduleFlow(schedule_request("sig"))
    async with grpc.aio.insecure_channel(server.address) as channel:
        signals = signal_pb2_grpc.SignalServiceStub(channel)
        payload = common_pb2.Payload(encoding="json/plain", data=b'{"by":"ann"}')
        first = await signals.SendSignal(
            signal_pb2.SendSignalRequest(flow_id="sig", name="approved", payload=payload)
        )
        second = await signals.SendSignal(
            signal_pb2.SendSignalRequest(
                flow_id="sig", name="approved", payload=payload, request_id="r"
            )
        )
        again = await signals.SendSignal(
            signal_pb2.SendSignalRequest(
                flow_id="sig", name="approved", payload=payload, request_id="r"
            )
        )
        assert (first.sequence, second.sequence, again.sequence) == (1, 2, 2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await signals.SendSignal(signal_pb2.SendSignalRequest(flow_id="nope", name="approved"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        await stub.CancelFlow(scheduler_pb2.CancelFlowRequest(flow_id="sig"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await signals.SendSignal(signal_pb2.SendSignalRequest(flow_id="sig", name="approved"))
        assert (caught.value.code(), translate(caught.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "FLOW_CLOSED",
        )


async def test_sdk_refuses_oversized_payload_before_sending(server: ErgonTestServer) -> None:
    async with Client(server.address, max_payload_bytes=1000) as client:
        from ergon_worker_sdk import PayloadTooLargeError

        with pytest.raises(PayloadTooLargeError):
            await client.signal("x", "y", "z" * 2000)


async def test_batch_schedule_reports_each_item(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    await stub.ScheduleFlow(schedule_request("taken"))
    response = await stub.ScheduleFlows(
        scheduler_pb2.ScheduleFlowsRequest(
            requests=[
                schedule_request("a"),
                schedule_request("taken", data=b'{"other":1}'),
                schedule_request("taken"),
                schedule_request("a"),
            ]
        )
    )
    assert [(r.flow_id, r.existing, r.code, r.reason) for r in response.results] == [
        ("a", False, 0, ""),
        ("taken", False, grpc.StatusCode.ALREADY_EXISTS.value[0], "FLOW_ALREADY_SCHEDULED"),
        ("taken", True, 0, ""),
        ("a", True, 0, ""),
    ]
    assert FlowStatus.PENDING.value == common_pb2.FLOW_STATUS_PENDING


async def test_long_polls_end_with_unavailable_when_the_server_shuts_down() -> None:
    import asyncio

    async with (
        ErgonTestServer(allow_unregistered_flow_types=True) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await stub.ScheduleFlow(schedule_request("long-poll"))
        waiting = asyncio.ensure_future(
            stub.WaitFlow(scheduler_pb2.WaitFlowRequest(flow_id="long-poll", timeout_ms=30_000))
        )
        await asyncio.sleep(0.2)
        shutdown = asyncio.ensure_future(server.shutdown())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await waiting
        await shutdown
    error = translate(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DRAINING")
