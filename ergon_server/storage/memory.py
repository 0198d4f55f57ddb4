"""The in-memory store: the `Store` semantics in plain Python, for unit tests.

It is also the executable reference of those semantics: the SQL stores must pass the same
conformance suite, and the argument checks every backend applies before touching storage live
here (`check_new_flow`, `check_finish`, `check_limit`, `cancellation_failure`).

No verb awaits anything, so each runs to completion without interleaving with another on the
event loop: every verb is atomic, as one transaction would be. Nothing is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ergon_server.errors import StoreUnavailableError
from ergon_server.model import (
    CancelOutcome,
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
    FlowPage,
    FlowRecord,
    FlowStatus,
    JournalRecord,
    Lease,
    NewFlow,
    RetryPolicy,
    ScheduleOutcome,
    ScheduleResult,
    SignalOutcome,
    SignalResult,
    StepRecord,
    WriteOutcome,
)
from ergon_server.storage._checks import (
    cancellation_failure,
    check_finish,
    check_limit,
    check_new_flow,
)


@dataclass(slots=True)
class _Entry:
    sequence: int
    key: str
    kind: EntryKind
    status: EntryStatus
    result: bytes | None
    error: Failure | None
    attempts: int
    args_hash: str
    recorded_at: int

    def record(self) -> JournalRecord:
        return JournalRecord(
            sequence=self.sequence,
            key=self.key,
            kind=self.kind,
            status=self.status,
            result=self.result,
            error=self.error,
            attempts=self.attempts,
            args_hash=self.args_hash,
            recorded_at=self.recorded_at,
        )


@dataclass(slots=True)
class _Flow:
    seq: int
    flow_id: str
    flow_type: str
    input: bytes
    labels: dict[str, str]
    retry_policy: RetryPolicy | None
    created_at: int
    updated_at: int
    ready_at: int
    status: FlowStatus = FlowStatus.PENDING
    result: bytes | None = None
    error: Failure | None = None
    attempt: int = 1
    completed_at: int | None = None
    lease_token: int = 0
    lease_owner: str | None = None
    lease_expires_at: int | None = None
    # The last journal sequence handed out; never reused, even after entries are dropped.
    journal_seq: int = 0
    journal: dict[str, _Entry] = field(default_factory=dict)
    # (name) -> sequence of the last signal; (request_id) -> sequence it was delivered at.
    signal_seq: dict[str, int] = field(default_factory=dict)
    signal_requests: dict[str, int] = field(default_factory=dict)
    signals: list[tuple[str, int, bytes, str, int]] = field(default_factory=list)

    def record(self) -> FlowRecord:
        return FlowRecord(
            flow_id=self.flow_id,
            flow_type=self.flow_type,
            status=self.status,
            input=self.input,
            result=self.result,
            error=self.error,
            attempt=self.attempt,
            labels=dict(self.labels),
            created_at=self.created_at,
            updated_at=self.updated_at,
            ready_at=self.ready_at,
            completed_at=self.completed_at,
            retry_policy=self.retry_policy,
            lease_token=self.lease_token,
            lease_owner=self.lease_owner,
            lease_expires_at=self.lease_expires_at,
        )

    def history(self) -> list[JournalRecord]:
        entries = sorted(self.journal.values(), key=lambda entry: entry.sequence)
        return [entry.record() for entry in entries]

    def holds(self, lease_token: int) -> bool:
        return self.status is FlowStatus.RUNNING and self.lease_token == lease_token

    def clear_lease(self) -> None:
        self.lease_owner = None
        self.lease_expires_at = None


class MemoryStore:
    """A `Store` held in dictionaries; same semantics as the SQL stores, no durability.

    Data survives `close()` and a later `open()` of the same instance, not the process.
    """

    def __init__(self) -> None:
        # Insertion order is scheduling order (flows are never removed).
        self._flows: dict[str, _Flow] = {}
        self._requests: dict[str, str] = {}
        self._flow_types: dict[str, int] = {}
        self._last_seq = 0
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise StoreUnavailableError("the memory store is not open")

    async def open(self) -> None:
        """Start accepting calls."""
        self._open = True

    async def close(self) -> None:
        """Stop accepting calls. Idempotent."""
        self._open = False

    async def register_flow_types(self, flow_types: Sequence[str], now_ms: int) -> None:
        """Remember that workers run these flow types."""
        self._check_open()
        for flow_type in flow_types:
            self._flow_types.setdefault(flow_type, now_ms)

    async def known_flow_types(self, flow_types: Sequence[str]) -> set[str]:
        """Which of these flow types were ever registered."""
        self._check_open()
        return {flow_type for flow_type in flow_types if flow_type in self._flow_types}

    def _schedule(self, flow: NewFlow, now_ms: int) -> ScheduleResult:
        if flow.request_id and flow.request_id in self._requests:
            return ScheduleResult(self._requests[flow.request_id], ScheduleOutcome.EXISTING)
        existing = self._flows.get(flow.flow_id)
        if existing is None:
            self._last_seq += 1
            self._flows[flow.flow_id] = _Flow(
                seq=self._last_seq,
                flow_id=flow.flow_id,
                flow_type=flow.flow_type,
                input=flow.input,
                labels=dict(flow.labels),
                retry_policy=flow.retry_policy,
                created_at=now_ms,
                updated_at=now_ms,
                ready_at=flow.start_at if flow.start_at is not None else now_ms,
            )
            outcome = ScheduleOutcome.CREATED
        elif existing.flow_type == flow.flow_type and existing.input == flow.input:
            outcome = ScheduleOutcome.EXISTING
        else:
            return ScheduleResult(flow.flow_id, ScheduleOutcome.CONFLICT)
        if flow.request_id:
            self._requests[flow.request_id] = flow.flow_id
        return ScheduleResult(flow.flow_id, outcome)

    async def schedule_flows(self, flows: Sequence[NewFlow], now_ms: int) -> list[ScheduleResult]:
        """Create flows as PENDING, one result per input in order."""
        self._check_open()
        for flow in flows:
            check_new_flow(flow)
        return [self._schedule(flow, now_ms) for flow in flows]

    async def get_flow(self, flow_id: str) -> FlowRecord | None:
        """The flow, or None."""
        self._check_open()
        flow = self._flows.get(flow_id)
        return flow.record() if flow is not None else None

    async def list_flows(
        self,
        statuses: Sequence[FlowStatus],
        flow_type: str | None,
        limit: int,
        cursor: int | None,
    ) -> FlowPage:
        """Flows in scheduling order, filtered (empty statuses / None type: any), paged."""
        self._check_open()
        check_limit(limit)
        after = cursor if cursor is not None else 0
        wanted = set(statuses)
        page: list[_Flow] = []
        more = False
        for flow in self._flows.values():
            if flow.seq <= after:
                continue
            if wanted and flow.status not in wanted:
                continue
            if flow_type is not None and flow.flow_type != flow_type:
                continue
            if len(page) == limit:
                more = True
                break
            page.append(flow)
        return FlowPage(
            flows=[flow.record() for flow in page],
            next_cursor=page[-1].seq if more else None,
        )

    async def get_history(
        self, flow_id: str, after_sequence: int, limit: int
    ) -> list[JournalRecord]:
        """Journal entries of the flow with sequence > after_sequence, in order, at most limit."""
        self._check_open()
        check_limit(limit)
        flow = self._flows.get(flow_id)
        if flow is None:
            return []
        return [entry for entry in flow.history() if entry.sequence > after_sequence][:limit]

    async def claim_flows(
        self,
        session_id: str,
        flow_types: Sequence[str],
        limit: int,
        lease_expires_at: int,
        now_ms: int,
    ) -> list[ClaimedFlow]:
        """Lease up to `limit` PENDING flows of these types whose ready_at <= now_ms."""
        self._check_open()
        if limit <= 0:
            return []
        types = set(flow_types)
        ready = sorted(
            (
                flow
                for flow in self._flows.values()
                if flow.status is FlowStatus.PENDING
                and flow.flow_type in types
                and flow.ready_at <= now_ms
            ),
            key=lambda flow: (flow.ready_at, flow.seq),
        )[:limit]
        claimed: list[ClaimedFlow] = []
        for flow in ready:
            flow.status = FlowStatus.RUNNING
            flow.lease_token += 1
            flow.lease_owner = session_id
            flow.lease_expires_at = lease_expires_at
            flow.updated_at = now_ms
            claimed.append(
                ClaimedFlow(
                    flow_id=flow.flow_id,
                    flow_type=flow.flow_type,
                    input=flow.input,
                    lease_token=flow.lease_token,
                    attempt=flow.attempt,
                    retry_policy=flow.retry_policy,
                    journal=flow.history(),
                )
            )
        return claimed

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        self._check_open()
        types = set(flow_types)
        ready_at = [
            flow.ready_at
            for flow in self._flows.values()
            if flow.status is FlowStatus.PENDING and flow.flow_type in types
        ]
        return min(ready_at) if ready_at else None

    def _fenced(self, flow_id: str, lease_token: int) -> tuple[_Flow | None, WriteOutcome]:
        flow = self._flows.get(flow_id)
        if flow is None:
            return None, WriteOutcome.NOT_FOUND
        if not flow.holds(lease_token):
            return flow, WriteOutcome.LEASE_LOST
        return flow, WriteOutcome.OK

    async def record_steps(self, records: Sequence[StepRecord], now_ms: int) -> list[WriteOutcome]:
        """Apply step outcomes, fenced, one outcome per record in order."""
        self._check_open()
        outcomes: list[WriteOutcome] = []
        for record in records:
            flow, outcome = self._fenced(record.flow_id, record.lease_token)
            outcomes.append(outcome)
            if flow is None or outcome is not WriteOutcome.OK:
                continue
            entry = flow.journal.get(record.key)
            if entry is None:
                flow.journal_seq += 1
                flow.journal[record.key] = _Entry(
                    sequence=flow.journal_seq,
                    key=record.key,
                    kind=record.kind,
                    status=record.status,
                    result=record.result,
                    error=record.error,
                    attempts=record.attempts,
                    args_hash=record.args_hash,
                    recorded_at=now_ms,
                )
            elif entry.status is EntryStatus.RETRYING:
                entry.status = record.status
                entry.result = record.result
                entry.error = record.error
                entry.attempts = record.attempts
                entry.args_hash = record.args_hash
                entry.recorded_at = now_ms
        return outcomes

    async def finish_flows(self, finishes: Sequence[FlowFinish], now_ms: int) -> list[WriteOutcome]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`."""
        self._check_open()
        for finish in finishes:
            check_finish(finish)
        outcomes: list[WriteOutcome] = []
        for finish in finishes:
            flow = self._flows.get(finish.flow_id)
            if flow is None:
                outcomes.append(WriteOutcome.NOT_FOUND)
            elif flow.lease_token != finish.lease_token:
                outcomes.append(WriteOutcome.LEASE_LOST)
            elif flow.status is FlowStatus.RUNNING:
                outcomes.append(WriteOutcome.OK)
                flow.updated_at = now_ms
                flow.clear_lease()
                if finish.status is FlowStatus.FAILED and finish.retry_delay_ms > 0:
                    flow.status = FlowStatus.PENDING
                    flow.result = None
                    flow.error = finish.error
                    flow.attempt += 1
                    flow.ready_at = now_ms + finish.retry_delay_ms
                    flow.journal = {
                        key: entry
                        for key, entry in flow.journal.items()
                        if entry.status is not EntryStatus.FAILED
                    }
                else:
                    completed = finish.status is FlowStatus.COMPLETED
                    flow.status = finish.status
                    flow.result = finish.result if completed else None
                    flow.error = None if completed else finish.error
                    flow.completed_at = now_ms
            elif flow.status is finish.status:
                outcomes.append(WriteOutcome.OK)
            else:
                outcomes.append(WriteOutcome.LEASE_LOST)
        return outcomes

    async def release_flows(self, leases: Sequence[Lease], now_ms: int) -> list[WriteOutcome]:
        """Give flows back unfinished: RUNNING -> PENDING, ready now, lease cleared, fenced."""
        self._check_open()
        outcomes: list[WriteOutcome] = []
        for lease in leases:
            flow, outcome = self._fenced(lease.flow_id, lease.lease_token)
            outcomes.append(outcome)
            if flow is not None and outcome is WriteOutcome.OK:
                flow.status = FlowStatus.PENDING
                flow.ready_at = now_ms
                flow.updated_at = now_ms
                flow.clear_lease()
        return outcomes

    async def renew_leases(self, session_id: str, lease_expires_at: int) -> int:
        """Extend every RUNNING lease owned by the session; returns how many."""
        self._check_open()
        renewed = 0
        for flow in self._flows.values():
            if flow.status is FlowStatus.RUNNING and flow.lease_owner == session_id:
                flow.lease_expires_at = lease_expires_at
                renewed += 1
        return renewed

    async def reattach_leases(
        self, session_id: str, leases: Sequence[Lease], lease_expires_at: int, now_ms: int
    ) -> list[str]:
        """Move leases a reconnecting worker still holds to its new session.

        A lease is live while `now_ms <= lease_expires_at` (`expire_leases` takes it only
        once `lease_expires_at < now_ms`).
        """
        self._check_open()
        moved: list[str] = []
        for lease in leases:
            flow = self._flows.get(lease.flow_id)
            if (
                flow is None
                or lease.flow_id in moved
                or not flow.holds(lease.lease_token)
                or flow.lease_expires_at is None
                or flow.lease_expires_at < now_ms
            ):
                continue
            moved.append(lease.flow_id)
        for flow_id in moved:
            flow = self._flows[flow_id]
            flow.lease_owner = session_id
            flow.lease_expires_at = lease_expires_at
            flow.updated_at = now_ms
        return moved

    async def expire_leases(self, now_ms: int) -> list[str]:
        """Re-queue RUNNING flows whose lease expired before now_ms, in scheduling order."""
        self._check_open()
        expired: list[str] = []
        for flow in self._flows.values():
            if (
                flow.status is FlowStatus.RUNNING
                and flow.lease_expires_at is not None
                and flow.lease_expires_at < now_ms
            ):
                flow.status = FlowStatus.PENDING
                flow.ready_at = now_ms
                flow.updated_at = now_ms
                flow.clear_lease()
                expired.append(flow.flow_id)
        return expired

    async def cancel_flow(self, flow_id: str, reason: str, now_ms: int) -> CancelOutcome:
        """Cancel a flow that is not terminal: CANCELLED, its lease cleared, reason recorded.

        The reason is kept as the flow's `error` (see `cancellation_failure`).
        """
        self._check_open()
        flow = self._flows.get(flow_id)
        if flow is None:
            return CancelOutcome.NOT_FOUND
        if flow.status.terminal:
            return CancelOutcome.CLOSED
        flow.status = FlowStatus.CANCELLED
        flow.error = cancellation_failure(reason)
        flow.completed_at = now_ms
        flow.updated_at = now_ms
        flow.clear_lease()
        return CancelOutcome.CANCELLED

    def _signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        flow = self._flows.get(flow_id)
        if flow is None:
            return SignalResult(SignalOutcome.NOT_FOUND)
        if request_id and request_id in flow.signal_requests:
            return SignalResult(SignalOutcome.DELIVERED, flow.signal_requests[request_id])
        if flow.status.terminal:
            return SignalResult(SignalOutcome.CLOSED)
        sequence = flow.signal_seq.get(name, 0) + 1
        flow.signal_seq[name] = sequence
        flow.signals.append((name, sequence, payload, request_id, now_ms))
        if request_id:
            flow.signal_requests[request_id] = sequence
        return SignalResult(SignalOutcome.DELIVERED, sequence)

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox."""
        self._check_open()
        return self._signal(flow_id, name, payload, request_id, now_ms)

    async def signal_with_schedule(
        self, flow: NewFlow, name: str, payload: bytes, now_ms: int
    ) -> tuple[ScheduleResult, SignalResult]:
        """Schedule the flow as `schedule_flows` would and deliver a signal to it, atomically.

        The flow's `request_id` also deduplicates the signal, so a retried call appends
        nothing. On CONFLICT no signal is delivered and the signal answer is NOT_FOUND.
        """
        self._check_open()
        check_new_flow(flow)
        scheduled = self._schedule(flow, now_ms)
        if scheduled.outcome is ScheduleOutcome.CONFLICT:
            return scheduled, SignalResult(SignalOutcome.NOT_FOUND)
        signal = self._signal(scheduled.flow_id, name, payload, flow.request_id, now_ms)
        return scheduled, signal
