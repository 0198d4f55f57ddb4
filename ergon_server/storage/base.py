"""The `Store` protocol: the domain verbs every backend implements.

Each verb is one transaction (a backend may group concurrent verbs into one commit, but each
verb's effect is atomic and durable before its call returns). Nothing above `storage/` sees a
driver type or a driver exception: drivers' errors leave a store as `StoreUnavailableError`
(retry may help: locked, disk full, connection lost) or `StoreError`.

Fencing: every write that comes from a worker names a lease (flow_id, lease_token). It applies
only while the flow is RUNNING under exactly that token; otherwise its outcome is LEASE_LOST and
nothing changes. Writes are idempotent: recording a step key that is already COMPLETED or
FAILED under the same lease answers OK and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ergon_server.model import (
    CancelOutcome,
    ClaimedFlow,
    FlowFinish,
    FlowPage,
    FlowRecord,
    FlowStatus,
    JournalRecord,
    Lease,
    NewFlow,
    ScheduleResult,
    SignalResult,
    StepRecord,
    WriteOutcome,
)


class Store(Protocol):
    """Durable state of flows, journals, leases and signals."""

    async def open(self) -> None:
        """Connect and apply pending migrations; raise SchemaVersionError if the schema is newer."""
        ...

    async def close(self) -> None:
        """Flush pending writes and release connections. Idempotent."""
        ...

    async def register_flow_types(self, flow_types: Sequence[str], now_ms: int) -> None:
        """Remember that workers run these flow types (kept across restarts)."""
        ...

    async def known_flow_types(self, flow_types: Sequence[str]) -> set[str]:
        """Which of these flow types were ever registered."""
        ...

    async def schedule_flows(self, flows: Sequence[NewFlow], now_ms: int) -> list[ScheduleResult]:
        """Create flows as PENDING, one result per input in order, all in one transaction.

        A flow's `ready_at` is its `start_at`, or `now_ms`. Idempotency, in this order: a
        non-empty `request_id` seen before answers EXISTING with the flow_id it created; an
        existing flow_id with the same flow_type and input answers EXISTING; with another type
        or input, CONFLICT (nothing written for that item). A request_id is remembered only
        with a CREATED or EXISTING answer. Duplicates within one batch behave as if sequential.
        """
        ...

    async def get_flow(self, flow_id: str) -> FlowRecord | None:
        """The flow, or None."""
        ...

    async def list_flows(
        self,
        statuses: Sequence[FlowStatus],
        flow_type: str | None,
        limit: int,
        cursor: int | None,
    ) -> FlowPage:
        """Flows in scheduling order, filtered (empty statuses / None type: any), paged.

        `cursor` is an opaque position from a previous page's `next_cursor`.
        """
        ...

    async def get_history(
        self, flow_id: str, after_sequence: int, limit: int
    ) -> list[JournalRecord]:
        """Journal entries of the flow with sequence > after_sequence, in order, at most limit."""
        ...

    async def claim_flows(
        self,
        session_id: str,
        flow_types: Sequence[str],
        limit: int,
        lease_expires_at: int,
        now_ms: int,
    ) -> list[ClaimedFlow]:
        """Lease up to `limit` PENDING flows of these types whose ready_at <= now_ms.

        Oldest ready_at first (ties: scheduling order). Each claimed flow becomes RUNNING with
        lease_token + 1, lease_owner = session_id, lease_expires_at; it comes back with its
        journal. Concurrent claimers never get the same flow.
        """
        ...

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        ...

    async def record_steps(self, records: Sequence[StepRecord], now_ms: int) -> list[WriteOutcome]:
        """Apply step outcomes, fenced, one outcome per record in order.

        A new key gets the flow's next sequence. RETRYING upserts attempts and error on an entry
        that is not final. COMPLETED / FAILED make the entry final; a final entry never changes.
        """
        ...

    async def finish_flows(self, finishes: Sequence[FlowFinish], now_ms: int) -> list[WriteOutcome]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`.

        Finishing a flow that is already in the requested terminal state under the same lease
        token answers OK (a retried completion).
        """
        ...

    async def release_flows(self, leases: Sequence[Lease], now_ms: int) -> list[WriteOutcome]:
        """Give flows back unfinished: RUNNING -> PENDING, ready now, lease cleared, fenced."""
        ...

    async def renew_leases(self, session_id: str, lease_expires_at: int) -> int:
        """Extend every RUNNING lease owned by the session; returns how many."""
        ...

    async def reattach_leases(
        self, session_id: str, leases: Sequence[Lease], lease_expires_at: int, now_ms: int
    ) -> list[str]:
        """Move leases a reconnecting worker still holds to its new session.

        A lease moves when its flow is RUNNING under that token and not yet expired at now_ms.
        Returns the flow ids that moved.
        """
        ...

    async def expire_leases(self, now_ms: int) -> list[str]:
        """Re-queue RUNNING flows whose lease expired before now_ms (PENDING, ready now)."""
        ...

    async def cancel_flow(self, flow_id: str, reason: str, now_ms: int) -> CancelOutcome:
        """Cancel a flow that is not terminal: CANCELLED, its lease cleared, reason recorded."""
        ...

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox.

        A non-empty request_id seen before for this flow answers DELIVERED with the first
        sequence and appends nothing.
        """
        ...

    async def signal_with_schedule(
        self, flow: NewFlow, name: str, payload: bytes, now_ms: int
    ) -> tuple[ScheduleResult, SignalResult]:
        """Schedule the flow as `schedule_flows` would and deliver a signal to it, atomically."""
        ...
