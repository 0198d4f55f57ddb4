"""The in-memory store: the `Store` semantics in plain Python, for unit tests.

It is also the executable reference of those semantics: the SQL stores must pass the same
conformance suite (the argument checks every backend applies before touching storage live in
`_checks.py`).

Resolutions of what the `Store` docstrings leave open, which every backend follows:
- A finished flow's open waits are cancelled at once (so `next_timer_at` never reports a
  timer of an ended flow). A child's end never writes a parent that has ended.
- A child's end satisfies every wait that names it (`child_flow_id`), whichever parent: a
  flow taken as an existing child keeps the parent it was created with.
- Satisfying the wait of a PENDING flow (re-queued, retrying, parked) records the entry and
  reports it with status PENDING; its `ready_at` is left alone.
- A key registered again keeps its first registration; registering only (re)opens it. A
  wait whose entry a flow retry dropped (a failed child) is reopened like a cancelled one.
- A retried finish of a flow that its cancel request ended answers OK.
- Ties: timers fire by (fire_at, flow_id, key); open SIGNAL waits of one name consume by
  (created_at, key); the waits of an ended child are satisfied by (flow_id, key).

No verb awaits anything, so each runs to completion without interleaving with another on the
event loop: every verb is atomic, as one transaction would be. Nothing is durable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ergon_server.errors import StoreUnavailableError
from ergon_server.model import (
    CANCEL_KEY,
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
    Park,
    RetryPolicy,
    Satisfied,
    ScheduleOutcome,
    ScheduleResult,
    SignalOutcome,
    SignalResult,
    StepRecord,
    StoreEvent,
    SuspendOutcome,
    SuspendRequest,
    SuspendResult,
    WaitRequest,
    WaitResult,
    WriteOutcome,
)
from ergon_server.storage._checks import (
    cancellation_failure,
    check_finish,
    check_leases,
    check_limit,
    check_new_flow,
    check_park,
    check_park_delays,
    check_step_record,
    check_suspend,
    check_text,
    check_texts,
    check_wait,
    child_entry,
    park_delay_ms,
)

# A wait's states, as the SQL stores persist them.
OPEN = "OPEN"
SATISFIED = "SATISFIED"
CANCELLED = "CANCELLED"


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
class _Wait:
    key: str
    kind: EntryKind
    status: str
    fire_at: int | None
    signal_name: str
    child_flow_id: str | None
    created_at: int


@dataclass(slots=True)
class _Signal:
    name: str
    sequence: int
    payload: bytes
    request_id: str
    created_at: int
    consumed_at: int | None = None
    consumed_key: str | None = None


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
    parent_flow_id: str | None = None
    parent_key: str | None = None
    cancel_requested: bool = False
    # How many times the flow was parked since it last completed.
    parks: int = 0
    # The last journal sequence handed out; never reused, even after entries are dropped.
    journal_seq: int = 0
    journal: dict[str, _Entry] = field(default_factory=dict)
    waits: dict[str, _Wait] = field(default_factory=dict)
    # (name) -> sequence of the last signal; (request_id) -> sequence it was delivered at.
    signal_seq: dict[str, int] = field(default_factory=dict)
    signal_requests: dict[str, int] = field(default_factory=dict)
    signals: list[_Signal] = field(default_factory=list)

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
            parent_flow_id=self.parent_flow_id,
            cancel_requested=self.cancel_requested,
        )

    def history(self) -> list[JournalRecord]:
        entries = sorted(self.journal.values(), key=lambda entry: entry.sequence)
        return [entry.record() for entry in entries]

    def holds(self, lease_token: int) -> bool:
        return self.status is FlowStatus.RUNNING and self.lease_token == lease_token

    def clear_lease(self) -> None:
        self.lease_owner = None
        self.lease_expires_at = None

    def add_entry(
        self,
        key: str,
        kind: EntryKind,
        status: EntryStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> _Entry:
        """A wait's or a cancellation's entry: one attempt, no args hash, the next sequence."""
        self.journal_seq += 1
        entry = _Entry(self.journal_seq, key, kind, status, result, error, 1, "", now_ms)
        self.journal[key] = entry
        return entry


def _with_due_time(flow: _Flow, entry: JournalRecord) -> JournalRecord:
    """A history entry; a TIMER entry with its wait's due time."""
    wait = flow.waits.get(entry.key)
    if entry.kind is not EntryKind.TIMER or wait is None or wait.kind is not EntryKind.TIMER:
        return entry
    return dataclasses.replace(entry, due_at=wait.fire_at)


class MemoryStore:
    """A `Store` held in dictionaries; same semantics as the SQL stores, no durability.

    Data survives `close()` and a later `open()` of the same instance, not the process.
    """

    shared = False  # one process's memory

    def __init__(self) -> None:
        # Insertion order is scheduling order (flows are never removed).
        self._flows: dict[str, _Flow] = {}
        self._requests: dict[str, str] = {}
        self._flow_types: dict[str, int] = {}
        # child flow_id -> (flow_id, key) of the CHILD waits that name it.
        self._waiting_for: dict[str, list[tuple[str, str]]] = {}
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
        check_texts(flow_types, "a flow_type")
        for flow_type in flow_types:
            self._flow_types.setdefault(flow_type, now_ms)

    async def known_flow_types(self, flow_types: Sequence[str]) -> set[str]:
        """Which of these flow types were ever registered."""
        self._check_open()
        check_texts(flow_types, "a flow_type")
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
                parent_flow_id=flow.parent_flow_id or None,
                parent_key=flow.parent_key or None,
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
        check_text(flow_id, "a flow_id")
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
        check_text(flow_type or "", "a flow_type")
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
        check_text(flow_id, "a flow_id")
        flow = self._flows.get(flow_id)
        if flow is None:
            return []
        entries = [entry for entry in flow.history() if entry.sequence > after_sequence][:limit]
        return [_with_due_time(flow, entry) for entry in entries]

    async def get_entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """One journal entry of a flow, or None."""
        self._check_open()
        check_text(flow_id, "a flow_id")
        check_text(key, "a key")
        flow = self._flows.get(flow_id)
        entry = None if flow is None else flow.journal.get(key)
        return None if entry is None else entry.record()

    async def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Never calls the listener: only one process uses a memory store."""
        self._check_open()

    def observe_commits(self, observer: Callable[[float, int], None]) -> None:
        """Never reports: a memory store has no commits."""

    async def count_flows(self) -> dict[tuple[FlowStatus, str], int]:
        """How many flows there are, by status and flow type."""
        self._check_open()
        counts: dict[tuple[FlowStatus, str], int] = {}
        for flow in self._flows.values():
            key = (flow.status, flow.flow_type)
            counts[key] = counts.get(key, 0) + 1
        return counts

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
        check_text(session_id, "a session_id")
        check_texts(flow_types, "a flow_type")
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
                    ready_at=flow.ready_at,
                )
            )
        return claimed

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        self._check_open()
        check_texts(flow_types, "a flow_type")
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
        for checked in records:
            check_step_record(checked)
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

    # --- waits: the shared moves ---

    def _satisfy(
        self,
        flow: _Flow,
        wait: _Wait,
        status: EntryStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> Satisfied | None:
        """Satisfy a wait (once): its entry, then wake the flow if it waited for it.

        Returns what to report: None when the wait was not OPEN (a CANCELLED wait gets its
        entry and leaves the flow alone) or when its key already had an entry.
        """
        was_open = wait.status == OPEN
        wait.status = SATISFIED
        if wait.key in flow.journal:
            return None
        entry = flow.add_entry(wait.key, wait.kind, status, result, error, now_ms)
        if not was_open:
            return None
        if flow.status is FlowStatus.WAITING:
            flow.status = FlowStatus.PENDING
            flow.ready_at = now_ms
            flow.updated_at = now_ms
            flow.clear_lease()
        return Satisfied(
            flow.flow_id,
            entry.record(),
            flow.status,
            flow.lease_token,
            flow.lease_owner,
            fire_at=wait.fire_at,
        )

    def _end(
        self,
        flow: _Flow,
        status: FlowStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> list[Satisfied]:
        """End a flow: its open waits are cancelled and the waits for it as a child satisfied."""
        flow.status = status
        flow.result = result
        flow.error = error
        flow.completed_at = now_ms
        flow.updated_at = now_ms
        flow.clear_lease()
        if status is FlowStatus.COMPLETED:
            flow.parks = 0
        for wait in flow.waits.values():
            if wait.status == OPEN:
                wait.status = CANCELLED
        satisfied: list[Satisfied] = []
        entry = child_entry(status, result, error)
        for parent_id, key in sorted(self._waiting_for.get(flow.flow_id, ())):
            parent = self._flows[parent_id]
            wait = parent.waits[key]
            if wait.status == SATISFIED or parent.status.terminal:
                continue
            done = self._satisfy(parent, wait, *entry, now_ms)
            if done is not None:
                satisfied.append(done)
        return satisfied

    @staticmethod
    def _cancellation(flow: _Flow, reason: str) -> Failure:
        entry = flow.journal.get(CANCEL_KEY)
        if entry is not None and entry.error is not None:
            return entry.error
        return cancellation_failure(reason)

    async def finish_flows(
        self, finishes: Sequence[FlowFinish], now_ms: int
    ) -> tuple[list[WriteOutcome], list[Satisfied]]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`.

        A retried finish of a flow that a cancel request ended (CANCELLED, same token)
        answers OK, whatever it asks.
        """
        self._check_open()
        for finish in finishes:
            check_finish(finish)
        outcomes: list[WriteOutcome] = []
        satisfied: list[Satisfied] = []
        for finish in finishes:
            flow = self._flows.get(finish.flow_id)
            if flow is None:
                outcomes.append(WriteOutcome.NOT_FOUND)
            elif flow.lease_token != finish.lease_token:
                outcomes.append(WriteOutcome.LEASE_LOST)
            elif flow.status is FlowStatus.RUNNING and not all(
                (entry := flow.journal.get(key)) is not None and entry.status.final
                for key in finish.requires_keys
            ):
                outcomes.append(WriteOutcome.NOT_RECORDED)
            elif flow.status is FlowStatus.RUNNING:
                outcomes.append(WriteOutcome.OK)
                if flow.cancel_requested:
                    cancelled = self._cancellation(flow, "")
                    satisfied += self._end(flow, FlowStatus.CANCELLED, None, cancelled, now_ms)
                elif finish.status is FlowStatus.FAILED and finish.retry_delay_ms > 0:
                    flow.status = FlowStatus.PENDING
                    flow.result = None
                    flow.error = finish.error
                    flow.attempt += 1
                    flow.ready_at = now_ms + finish.retry_delay_ms
                    flow.updated_at = now_ms
                    flow.clear_lease()
                    flow.journal = {
                        key: entry
                        for key, entry in flow.journal.items()
                        if entry.status is not EntryStatus.FAILED
                    }
                else:
                    completed = finish.status is FlowStatus.COMPLETED
                    result = finish.result if completed else None
                    error = None if completed else finish.error
                    satisfied += self._end(flow, finish.status, result, error, now_ms)
            elif flow.status is finish.status or (
                flow.status is FlowStatus.CANCELLED and flow.cancel_requested
            ):
                outcomes.append(WriteOutcome.OK)
            else:
                outcomes.append(WriteOutcome.LEASE_LOST)
        return outcomes, satisfied

    async def release_flows(self, leases: Sequence[Lease], now_ms: int) -> list[WriteOutcome]:
        """Give flows back unfinished: RUNNING -> PENDING, ready now, lease cleared, fenced."""
        self._check_open()
        check_leases(leases)
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

    async def renew_leases(
        self, session_id: str, lease_expires_at: int, flow_ids: Sequence[str] | None = None
    ) -> int:
        """Extend the session's RUNNING leases (only on `flow_ids` if given); how many."""
        self._check_open()
        check_text(session_id, "a session_id")
        check_texts(flow_ids or (), "a flow_id")
        only = None if flow_ids is None else set(flow_ids)
        renewed = 0
        for flow in self._flows.values():
            if only is not None and flow.flow_id not in only:
                continue
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
        check_text(session_id, "a session_id")
        check_leases(leases)
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

    async def expire_leases(self, now_ms: int, limit: int) -> list[Lease]:
        """Re-queue up to `limit` RUNNING flows whose lease expired before now_ms.

        The soonest expired first (ties in scheduling order); the leases, in that order.
        """
        self._check_open()
        due = sorted(
            (
                (flow.lease_expires_at, flow.seq, flow)
                for flow in self._flows.values()
                if flow.status is FlowStatus.RUNNING
                and flow.lease_expires_at is not None
                and flow.lease_expires_at < now_ms
            ),
            key=lambda item: (item[0], item[1]),
        )
        expired: list[Lease] = []
        for _, _, flow in due[: max(0, limit)]:
            flow.status = FlowStatus.PENDING
            flow.ready_at = now_ms
            flow.updated_at = now_ms
            flow.clear_lease()
            expired.append(Lease(flow.flow_id, flow.lease_token))
        return expired

    async def cancel_flow(
        self, flow_id: str, reason: str, now_ms: int
    ) -> tuple[CancelOutcome, list[Satisfied]]:
        """Cancel a flow that has not ended, recording a CANCEL entry under `CANCEL_KEY`.

        The cancellation (`cancellation_failure(reason)`) is the entry's error and, once the
        flow is CANCELLED, the flow's error; a flow cancelled twice keeps the first.
        """
        self._check_open()
        check_text(flow_id, "a flow_id")
        flow = self._flows.get(flow_id)
        if flow is None:
            return CancelOutcome.NOT_FOUND, []
        if flow.status.terminal:
            return CancelOutcome.CLOSED, []
        if CANCEL_KEY not in flow.journal:
            failure = cancellation_failure(reason)
            flow.add_entry(
                CANCEL_KEY, EntryKind.CANCEL, EntryStatus.COMPLETED, None, failure, now_ms
            )
        if flow.status is FlowStatus.RUNNING:
            if not flow.cancel_requested:
                flow.cancel_requested = True
                flow.updated_at = now_ms
            return CancelOutcome.CANCEL_REQUESTED, []
        error = self._cancellation(flow, reason)
        return CancelOutcome.CANCELLED, self._end(flow, FlowStatus.CANCELLED, None, error, now_ms)

    def _consume_signal(self, flow: _Flow, name: str, key: str, now_ms: int) -> _Signal | None:
        for signal in flow.signals:
            if signal.name == name and signal.consumed_at is None:
                signal.consumed_at = now_ms
                signal.consumed_key = key
                return signal
        return None

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
        flow.signals.append(_Signal(name, sequence, payload, request_id, now_ms))
        if request_id:
            flow.signal_requests[request_id] = sequence
        waits = sorted(
            (
                wait
                for wait in flow.waits.values()
                if wait.status == OPEN
                and wait.kind is EntryKind.SIGNAL
                and wait.signal_name == name
            ),
            key=lambda wait: (wait.created_at, wait.key),
        )
        for wait in waits:
            if wait.key in flow.journal:
                wait.status = SATISFIED
                continue
            signal = self._consume_signal(flow, name, wait.key, now_ms)
            if signal is None:
                break
            done = self._satisfy(flow, wait, EntryStatus.COMPLETED, signal.payload, None, now_ms)
            return SignalResult(SignalOutcome.DELIVERED, sequence, done)
        return SignalResult(SignalOutcome.DELIVERED, sequence)

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox; an open wait consumes it."""
        self._check_open()
        check_text(flow_id, "a flow_id")
        check_text(name, "a signal name")
        check_text(request_id, "a request_id")
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
        check_text(name, "a signal name")
        scheduled = self._schedule(flow, now_ms)
        if scheduled.outcome is ScheduleOutcome.CONFLICT:
            return scheduled, SignalResult(SignalOutcome.NOT_FOUND)
        signal = self._signal(scheduled.flow_id, name, payload, flow.request_id, now_ms)
        return scheduled, signal

    def _check_now(self, flow: _Flow, wait: _Wait, now_ms: int) -> None:
        """Satisfy a just (re)opened wait of a RUNNING flow if it can be satisfied now."""
        if wait.kind is EntryKind.TIMER:
            if wait.fire_at is not None and wait.fire_at <= now_ms:
                self._satisfy(flow, wait, EntryStatus.COMPLETED, None, None, now_ms)
        elif wait.kind is EntryKind.SIGNAL:
            signal = self._consume_signal(flow, wait.signal_name, wait.key, now_ms)
            if signal is not None:
                self._satisfy(flow, wait, EntryStatus.COMPLETED, signal.payload, None, now_ms)
        elif wait.child_flow_id is not None:
            child = self._flows[wait.child_flow_id]
            if child.status.terminal:
                entry = child_entry(child.status, child.result, child.error)
                self._satisfy(flow, wait, *entry, now_ms)

    async def register_waits(self, waits: Sequence[WaitRequest], now_ms: int) -> list[WaitResult]:
        """Register waits, fenced, idempotent by (flow_id, key); one result per wait in order.

        A key registered before keeps its first registration (kind, fire_at, signal name,
        child); registering it again only reopens it. A CHILD whose flow_id exists (with any
        type or input) is that flow; with a known request_id, the flow the request created.
        """
        self._check_open()
        for checked in waits:
            check_wait(checked)
        results: list[WaitResult] = []
        for request in waits:
            flow, outcome = self._fenced(request.flow_id, request.lease_token)
            if flow is None or outcome is not WriteOutcome.OK:
                results.append(WaitResult(outcome))
                continue
            wait = flow.waits.get(request.key)
            entry = flow.journal.get(request.key)
            if entry is None:
                if wait is None:
                    wait = self._new_wait(flow, request, now_ms)
                else:
                    wait.status = OPEN
                self._check_now(flow, wait, now_ms)
                entry = flow.journal.get(request.key)
            fire_at = wait.fire_at if wait is not None else None
            results.append(
                WaitResult(WriteOutcome.OK, entry.record() if entry is not None else None, fire_at)
            )
        return results

    def _new_wait(self, flow: _Flow, request: WaitRequest, now_ms: int) -> _Wait:
        child_flow_id: str | None = None
        if request.kind is EntryKind.CHILD and request.child is not None:
            child = dataclasses.replace(
                request.child, parent_flow_id=flow.flow_id, parent_key=request.key
            )
            scheduled = self._schedule(child, now_ms)
            child_flow_id = scheduled.flow_id
            self._waiting_for.setdefault(child_flow_id, []).append((flow.flow_id, request.key))
        wait = _Wait(
            key=request.key,
            kind=request.kind,
            status=OPEN,
            fire_at=request.fire_at if request.kind is EntryKind.TIMER else None,
            signal_name=request.signal_name if request.kind is EntryKind.SIGNAL else "",
            child_flow_id=child_flow_id,
            created_at=now_ms,
        )
        flow.waits[request.key] = wait
        return wait

    async def suspend_flows(
        self, requests: Sequence[SuspendRequest], now_ms: int
    ) -> tuple[list[SuspendResult], list[Satisfied]]:
        """Let flows whose every branch waits give their slot back, fenced.

        The open waits in `abandoned_keys` (and not in `open_keys`) are cancelled whatever the
        answer; other open waits are left alone. RESUME carries the entries of `open_keys` in
        journal order.
        """
        self._check_open()
        for checked in requests:
            check_suspend(checked)
        results: list[SuspendResult] = []
        satisfied: list[Satisfied] = []
        for request in requests:
            flow, outcome = self._fenced(request.flow_id, request.lease_token)
            if flow is None:
                results.append(SuspendResult(SuspendOutcome.NOT_FOUND))
                continue
            if outcome is not WriteOutcome.OK:
                results.append(SuspendResult(SuspendOutcome.LEASE_LOST))
                continue
            keys = set(request.open_keys)
            abandoned = set(request.abandoned_keys) - keys
            for wait in flow.waits.values():
                if wait.status == OPEN and wait.key in abandoned:
                    wait.status = CANCELLED
            entries = sorted(
                (flow.journal[key] for key in keys if key in flow.journal),
                key=lambda entry: entry.sequence,
            )
            if entries:
                records = tuple(entry.record() for entry in entries)
                results.append(SuspendResult(SuspendOutcome.RESUME, records))
            elif flow.cancel_requested:
                error = self._cancellation(flow, "")
                satisfied += self._end(flow, FlowStatus.CANCELLED, None, error, now_ms)
                results.append(SuspendResult(SuspendOutcome.CANCELLED))
            else:
                flow.status = FlowStatus.WAITING
                flow.updated_at = now_ms
                flow.clear_lease()
                results.append(SuspendResult(SuspendOutcome.SUSPENDED))
        return results, satisfied

    async def fire_timers(self, now_ms: int, limit: int) -> list[Satisfied]:
        """Fire up to `limit` open TIMER waits with fire_at <= now_ms, oldest first.

        Ties are broken by (flow_id, key). Timers of ended flows are cancelled on the way and
        do not count toward `limit`; a limit below 1 fires nothing.
        """
        self._check_open()
        if limit <= 0:
            return []
        due = sorted(
            (wait.fire_at, flow.flow_id, wait.key)
            for flow in self._flows.values()
            for wait in flow.waits.values()
            if wait.status == OPEN
            and wait.kind is EntryKind.TIMER
            and wait.fire_at is not None
            and wait.fire_at <= now_ms
        )
        fired: list[Satisfied] = []
        for _, flow_id, key in due:
            if len(fired) == limit:
                break
            flow = self._flows[flow_id]
            wait = flow.waits[key]
            if flow.status.terminal:
                wait.status = CANCELLED
                continue
            done = self._satisfy(flow, wait, EntryStatus.COMPLETED, None, None, now_ms)
            if done is not None:
                fired.append(done)
        return fired

    async def next_timer_at(self, after_ms: int | None = None) -> int | None:
        """The earliest fire_at among open TIMER waits (later than `after_ms` if given), or None."""
        self._check_open()
        times = [
            wait.fire_at
            for flow in self._flows.values()
            for wait in flow.waits.values()
            if wait.status == OPEN
            and wait.kind is EntryKind.TIMER
            and wait.fire_at is not None
            and (after_ms is None or wait.fire_at > after_ms)
        ]
        return min(times) if times else None

    async def park_flows(
        self, parks: Sequence[Park], now_ms: int, initial_delay_ms: int, max_delay_ms: int
    ) -> list[WriteOutcome]:
        """Park flows whose code no longer matches their journal, fenced."""
        self._check_open()
        check_park_delays(initial_delay_ms, max_delay_ms)
        for checked in parks:
            check_park(checked)
        outcomes: list[WriteOutcome] = []
        for park in parks:
            flow, outcome = self._fenced(park.flow_id, park.lease_token)
            outcomes.append(outcome)
            if flow is None or outcome is not WriteOutcome.OK:
                continue
            flow.status = FlowStatus.PENDING
            flow.error = park.error
            flow.ready_at = now_ms + park_delay_ms(initial_delay_ms, max_delay_ms, flow.parks)
            flow.updated_at = now_ms
            flow.parks += 1
            flow.clear_lease()
        return outcomes
