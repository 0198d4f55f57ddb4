"""Helpers shared by the storage suites."""

from __future__ import annotations

from collections.abc import Sequence

from ergon_server.model import (
    CancelOutcome,
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
    Lease,
    NewFlow,
    RetryPolicy,
    ScheduleOutcome,
    StepRecord,
    WriteOutcome,
)
from ergon_server.storage.base import Store

T0 = 1_700_000_000_000
TTL = 15_000

CREATED = ScheduleOutcome.CREATED
EXISTING = ScheduleOutcome.EXISTING
CONFLICT = ScheduleOutcome.CONFLICT
OK = WriteOutcome.OK
LEASE_LOST = WriteOutcome.LEASE_LOST
NOT_FOUND = WriteOutcome.NOT_FOUND


def flow(
    flow_id: str,
    flow_type: str = "orders",
    data: bytes = b"input",
    *,
    request_id: str = "",
    start_at: int | None = None,
    retry_policy: RetryPolicy | None = None,
    labels: dict[str, str] | None = None,
) -> NewFlow:
    return NewFlow(
        flow_id=flow_id,
        flow_type=flow_type,
        input=data,
        request_id=request_id,
        start_at=start_at,
        retry_policy=retry_policy,
        labels=labels or {},
    )


def step(
    claimed: ClaimedFlow | tuple[str, int],
    key: str,
    status: EntryStatus = EntryStatus.COMPLETED,
    *,
    result: bytes | None = b"result",
    error: Failure | None = None,
    attempts: int = 1,
    kind: EntryKind = EntryKind.STEP,
) -> StepRecord:
    flow_id, token = (
        (claimed.flow_id, claimed.lease_token) if isinstance(claimed, ClaimedFlow) else claimed
    )
    return StepRecord(
        flow_id=flow_id,
        lease_token=token,
        key=key,
        kind=kind,
        args_hash="hash-" + key,
        attempts=attempts,
        status=status,
        result=result,
        error=error,
    )


def lease(claimed: ClaimedFlow) -> Lease:
    return Lease(claimed.flow_id, claimed.lease_token)


async def claim_one(
    store: Store, flow_id: str, *, flow_type: str = "orders", now: int = T0, session: str = "s1"
) -> ClaimedFlow:
    """Schedule `flow_id` and claim it (it must be the only ready flow of its type)."""
    await store.schedule_flows([flow(flow_id, flow_type)], now)
    (claimed,) = await store.claim_flows(session, [flow_type], 10, now + TTL, now)
    assert claimed.flow_id == flow_id
    return claimed


BOOM = Failure(type="ValueError", message="boom", stack_trace="trace", reason="R")


async def finished(store: Store, finishes: Sequence[FlowFinish], now: int) -> list[WriteOutcome]:
    """finish_flows, for flows that no wait names as a child."""
    outcomes, satisfied = await store.finish_flows(finishes, now)
    assert satisfied == []
    return outcomes


async def cancelled(store: Store, flow_id: str, reason: str, now: int) -> CancelOutcome:
    """cancel_flow, for flows that no wait names as a child."""
    outcome, satisfied = await store.cancel_flow(flow_id, reason, now)
    assert satisfied == []
    return outcome
