"""`ergon.v1.SchedulerService` and `ergon.v1.SignalService`: translation to the engine."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from ergon_server.engine import Engine
from ergon_server.errors import InvalidArgumentError
from ergon_server.model import ScheduleOutcome
from ergon_server.rpc import convert
from ergon_server.rpc.status import unary
from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
)

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
MAX_BATCH = 1000
MAX_CURSOR = 2**63 - 1


def _page_cursor(token: str) -> int | None:
    if not token:
        return None
    # Tokens are decimal cursors that fit a signed 64-bit integer (the stores' row ids).
    if not (token.isascii() and token.isdigit() and len(token) <= 19) or int(token) > MAX_CURSOR:
        raise InvalidArgumentError(
            f"page_token {token[:64]!r} is not one this server gave", "INVALID_PAGE_TOKEN"
        )
    return int(token)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Schedules flows and reads their state."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def _max_payload(self) -> int:
        return self._engine.config.max_payload_bytes

    @unary
    async def ScheduleFlow(
        self, request: scheduler_pb2.ScheduleFlowRequest, context: Context
    ) -> scheduler_pb2.ScheduleFlowResponse:
        """Schedule one flow."""
        flow = convert.new_flow_from_proto(request, self._max_payload)
        result = await self._engine.schedule_flow(flow)
        return scheduler_pb2.ScheduleFlowResponse(
            flow_id=result.flow_id, existing=result.outcome is ScheduleOutcome.EXISTING
        )

    @unary
    async def ScheduleFlows(
        self, request: scheduler_pb2.ScheduleFlowsRequest, context: Context
    ) -> scheduler_pb2.ScheduleFlowsResponse:
        """Schedule many flows in one durable write."""
        if len(request.requests) > MAX_BATCH:
            raise InvalidArgumentError(
                f"a batch holds at most {MAX_BATCH} flows, got {len(request.requests)}",
                "BATCH_TOO_LARGE",
            )
        flows = [convert.new_flow_from_proto(r, self._max_payload) for r in request.requests]
        results = await self._engine.schedule_flows(flows)
        response = scheduler_pb2.ScheduleFlowsResponse()
        for result in results:
            item = response.results.add(
                flow_id=result.flow_id, existing=result.outcome is ScheduleOutcome.EXISTING
            )
            if result.outcome is ScheduleOutcome.CONFLICT:
                item.code = grpc.StatusCode.ALREADY_EXISTS.value[0]
                item.reason = "FLOW_ALREADY_SCHEDULED"
                item.message = (
                    f"flow {result.flow_id!r} is already scheduled with a different type or input"
                )
        return response

    @unary
    async def GetFlow(
        self, request: scheduler_pb2.GetFlowRequest, context: Context
    ) -> scheduler_pb2.GetFlowResponse:
        """Read one flow."""
        flow = await self._engine.get_flow(request.flow_id)
        return scheduler_pb2.GetFlowResponse(flow=convert.flow_to_proto(flow))

    @unary
    async def WaitFlow(
        self, request: scheduler_pb2.WaitFlowRequest, context: Context
    ) -> scheduler_pb2.WaitFlowResponse:
        """Long-poll until the flow ends or the timeout passes."""
        done, flow = await self._engine.wait_flow(request.flow_id, request.timeout_ms)
        return scheduler_pb2.WaitFlowResponse(done=done, flow=convert.flow_to_proto(flow))

    @unary
    async def RunFlow(
        self, request: scheduler_pb2.RunFlowRequest, context: Context
    ) -> scheduler_pb2.RunFlowResponse:
        """Schedule one flow and long-poll until it ends or the timeout passes."""
        flow = convert.new_flow_from_proto(request.flow, self._max_payload)
        result, done, record = await self._engine.run_flow(flow, request.timeout_ms)
        return scheduler_pb2.RunFlowResponse(
            existing=result.outcome is ScheduleOutcome.EXISTING,
            done=done,
            flow=convert.flow_to_proto(record),
        )

    @unary
    async def ListFlows(
        self, request: scheduler_pb2.ListFlowsRequest, context: Context
    ) -> scheduler_pb2.ListFlowsResponse:
        """List flows, filtered and paged."""
        statuses = []
        for status in request.statuses:
            if status not in convert.FLOW_STATUS_FROM_PROTO:
                raise InvalidArgumentError(f"unknown flow status {status}", "INVALID_STATUS")
            statuses.append(convert.FLOW_STATUS_FROM_PROTO[status])
        page = await self._engine.list_flows(
            statuses,
            request.flow_type or None,
            request.page_size,
            _page_cursor(request.page_token),
        )
        return scheduler_pb2.ListFlowsResponse(
            flows=[convert.flow_to_proto(f) for f in page.flows],
            next_page_token="" if page.next_cursor is None else str(page.next_cursor),
        )

    @unary
    async def GetFlowHistory(
        self, request: scheduler_pb2.GetFlowHistoryRequest, context: Context
    ) -> scheduler_pb2.GetFlowHistoryResponse:
        """A page of the flow's journal."""
        after = _page_cursor(request.page_token) or 0
        entries = await self._engine.get_history(request.flow_id, after, request.page_size)
        size = min(request.page_size or 100, self._engine.config.max_page_size)
        last = entries[-1].sequence if entries and len(entries) >= size else None
        return scheduler_pb2.GetFlowHistoryResponse(
            entries=[convert.entry_to_proto(e) for e in entries],
            next_page_token="" if last is None else str(last),
        )

    @unary
    async def CancelFlow(
        self, request: scheduler_pb2.CancelFlowRequest, context: Context
    ) -> scheduler_pb2.CancelFlowResponse:
        """Cancel a flow that has not ended."""
        flow = await self._engine.cancel_flow(request.flow_id, request.reason)
        return scheduler_pb2.CancelFlowResponse(flow=convert.flow_to_proto(flow))

    @unary
    async def ListWorkers(
        self, request: scheduler_pb2.ListWorkersRequest, context: Context
    ) -> scheduler_pb2.ListWorkersResponse:
        """The worker sessions connected to this server."""
        return scheduler_pb2.ListWorkersResponse(
            workers=[
                scheduler_pb2.WorkerInfo(
                    session_id=session.session_id,
                    worker_id=session.worker_id,
                    flow_types=list(session.flow_types),
                    capacity=session.capacity,
                    running=len(session.held),
                    assigned_total=session.assigned_total,
                    connected_at=convert.timestamp(session.connected_at),
                    peer=session.peer,
                )
                for session in self._engine.dispatcher.sessions
            ]
        )


class SignalServicer(signal_pb2_grpc.SignalServiceServicer):
    """Delivers signals into flows' durable mailboxes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _payload(self, payload: common_pb2.Payload) -> bytes:
        return convert.payload_bytes(
            payload, self._engine.config.max_payload_bytes, "the signal payload"
        )

    @unary
    async def SendSignal(
        self, request: signal_pb2.SendSignalRequest, context: Context
    ) -> signal_pb2.SendSignalResponse:
        """Append a signal to a flow's mailbox."""
        sequence = await self._engine.send_signal(
            request.flow_id, request.name, self._payload(request.payload), request.request_id
        )
        return signal_pb2.SendSignalResponse(sequence=sequence)

    @unary
    async def SignalWithSchedule(
        self, request: signal_pb2.SignalWithScheduleRequest, context: Context
    ) -> signal_pb2.SignalWithScheduleResponse:
        """Schedule the flow if needed and deliver a signal, atomically."""
        flow = convert.new_flow_from_proto(request.schedule, self._engine.config.max_payload_bytes)
        scheduled, sequence = await self._engine.signal_with_schedule(
            flow, request.name, self._payload(request.payload)
        )
        return signal_pb2.SignalWithScheduleResponse(
            flow_id=scheduled.flow_id,
            existing=scheduled.outcome is ScheduleOutcome.EXISTING,
            sequence=sequence,
        )
