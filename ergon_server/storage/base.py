"""The `Store` protocol: the domain verbs every backend implements.

Each verb is one transaction (a backend may group concurrent verbs into one commit, but each
verb's effect is atomic and durable before its call returns). Nothing above `storage/` sees a
driver type or a driver exception: drivers' errors leave a store as `StoreUnavailableError`
(retry may help: locked, disk full, connection lost) or `StoreError`.

Waits: a wait (timer, signal, child flow) is registered under a journal key; when satisfied, its
outcome becomes that key's journal entry. A satisfied wait of a WAITING flow makes the flow
PENDING (ready now); of a RUNNING flow, the verb reports it (`Satisfied`) so the engine can tell
the worker that holds the lease. Verbs that can end a flow (finish, cancel, suspend) report the
parent waits that the end satisfied in the same way.

Fencing: every write that comes from a worker names a lease (flow_id, lease_token). It applies
only while the flow is RUNNING under exactly that token; otherwise its outcome is LEASE_LOST and
nothing changes. Writes are idempotent: recording a step key that is already COMPLETED or
FAILED under the same lease answers OK and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    Park,
    Satisfied,
    ScheduleResult,
    SignalResult,
    StepRecord,
    StoreEvent,
    SuspendRequest,
    SuspendResult,
    WaitRequest,
    WaitResult,
    WriteOutcome,
)


class Store(Protocol):
    """Durable state of flows, journals, leases and signals."""

    # Whether other server processes may use the same database at once (PostgreSQL replicas);
    # False when this process is its only user (SQLite, memory).
    shared: bool

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

    async def finish_flows(
        self, finishes: Sequence[FlowFinish], now_ms: int
    ) -> tuple[list[WriteOutcome], list[Satisfied]]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`.

        Finishing a flow that is already in the requested terminal state under the same lease
        token answers OK (a retried completion). A flow with `cancel_requested` ends CANCELLED
        whatever was asked (a retry included), with the cancellation as its error. A flow that
        ends (COMPLETED, FAILED, CANCELLED) with a parent satisfies the parent's CHILD wait
        (`parent_key`): a COMPLETED entry with the child's result, or a FAILED entry with the
        child's error; those are returned as `Satisfied`.
        """
        ...

    async def release_flows(self, leases: Sequence[Lease], now_ms: int) -> list[WriteOutcome]:
        """Give flows back unfinished: RUNNING -> PENDING, ready now, lease cleared, fenced."""
        ...

    async def renew_leases(
        self, session_id: str, lease_expires_at: int, flow_ids: Sequence[str] | None = None
    ) -> int:
        """Extend every RUNNING lease owned by the session; returns how many.

        With `flow_ids`, only the session's leases on those flows: a flow leased to the
        session that its worker does not know then lapses instead of living on.
        """
        ...

    async def reattach_leases(
        self, session_id: str, leases: Sequence[Lease], lease_expires_at: int, now_ms: int
    ) -> list[str]:
        """Move leases a reconnecting worker still holds to its new session.

        A lease moves when its flow is RUNNING under that token and not yet expired at now_ms.
        Returns the flow ids that moved.
        """
        ...

    async def expire_leases(self, now_ms: int, limit: int) -> list[Lease]:
        """Re-queue up to `limit` RUNNING flows whose lease expired before now_ms (PENDING).

        They are ready now. The leases that expired first go first (ties in scheduling
        order), so a caller that gets `limit` leases back calls again for the rest; a limit
        below 1 expires nothing. Returns the leases that expired (flow id and the token they
        had), in that order.
        """
        ...

    async def cancel_flow(
        self, flow_id: str, reason: str, now_ms: int
    ) -> tuple[CancelOutcome, list[Satisfied]]:
        """Cancel a flow that has not ended, recording a CANCEL entry under `CANCEL_KEY`.

        PENDING or WAITING: CANCELLED at once (lease cleared, open waits cancelled, the
        cancellation as its error; a parent's CHILD wait is satisfied and returned). RUNNING:
        `cancel_requested` is set and the answer is CANCEL_REQUESTED; the flow keeps its lease
        and ends CANCELLED when it finishes or suspends. A second cancel of a RUNNING flow answers
        CANCEL_REQUESTED again and records nothing more.
        """
        ...

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox.

        A non-empty request_id seen before for this flow answers DELIVERED with the first
        sequence and appends nothing. If the flow has an open SIGNAL wait for `name`, the oldest
        unconsumed signal of that name is consumed into the wait's journal entry (COMPLETED, the
        signal's payload as result) and reported in `satisfied`.
        """
        ...

    async def signal_with_schedule(
        self, flow: NewFlow, name: str, payload: bytes, now_ms: int
    ) -> tuple[ScheduleResult, SignalResult]:
        """Schedule the flow as `schedule_flows` would and deliver a signal to it, atomically."""
        ...

    async def register_waits(self, waits: Sequence[WaitRequest], now_ms: int) -> list[WaitResult]:
        """Register waits, fenced, idempotent by (flow_id, key); one result per wait in order.

        A key that already has a journal entry answers with that entry. Otherwise the wait is
        (re)opened (a TIMER keeps the fire_at of its first registration) and checked at once:
        a TIMER due at now_ms fires; a SIGNAL consumes the oldest unconsumed signal of its name;
        a CHILD is scheduled like `schedule_flows` with the parent's id and key (an existing
        flow with the child's flow_id is taken as the child) and, if the child has already
        ended, its outcome is recorded. An entry made this way is returned in `entry`; the flow
        stays RUNNING.
        """
        ...

    async def suspend_flows(
        self, requests: Sequence[SuspendRequest], now_ms: int
    ) -> tuple[list[SuspendResult], list[Satisfied]]:
        """Let flows whose every branch waits give their slot back, fenced.

        The flow's open waits in `abandoned_keys` (not in `open_keys`) are cancelled; its other
        open waits are left alone. If any key in `open_keys` has a
        journal entry, the answer is RESUME with those entries and nothing else changes.
        Otherwise a flow with `cancel_requested` ends CANCELLED (as `finish_flows` would end
        it); any other becomes WAITING with its lease cleared (SUSPENDED).
        """
        ...

    async def fire_timers(self, now_ms: int, limit: int) -> list[Satisfied]:
        """Fire up to `limit` open TIMER waits with fire_at <= now_ms, oldest first.

        Each fired timer becomes a COMPLETED TIMER entry (no result) under its key. A timer of a
        flow that has ended is cancelled instead. Never fires a timer early.
        """
        ...

    async def next_timer_at(self, after_ms: int | None = None) -> int | None:
        """The earliest fire_at among open TIMER waits (later than `after_ms` if given), or None."""
        ...

    async def park_flows(
        self, parks: Sequence[Park], now_ms: int, initial_delay_ms: int, max_delay_ms: int
    ) -> list[WriteOutcome]:
        """Park flows whose code no longer matches their journal, fenced.

        The flow becomes PENDING with `error` set and ready_at = now_ms + min(max_delay_ms,
        initial_delay_ms * 2 ** parks), where parks counts its earlier parks; its journal and
        attempt are untouched, its lease cleared. A later COMPLETED finish clears the error.
        """
        ...

    async def get_entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """One journal entry of a flow, or None."""
        ...

    async def count_flows(self) -> dict[tuple[FlowStatus, str], int]:
        """How many flows there are, by status and flow type (for metrics; may scan)."""
        ...

    def observe_commits(self, observer: Callable[[float, int], None]) -> None:
        """Report each commit's duration in seconds and how many writes it held.

        Stores without commits (memory) never call the observer.
        """
        ...

    async def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Deliver hints of changes other store instances made through this store's database.

        Used by server replicas sharing one database (PostgreSQL: LISTEN/NOTIFY): a flow became
        ready, a timer was registered, a RUNNING flow's wait was satisfied or its cancel
        requested, a lease expired, a flow ended. This instance's own changes are not echoed
        back: its caller made them and acts on them itself. Events may come late, twice, or (on
        a reconnect) not at all: they are hints, and the engine still polls; when some may have
        been lost, EVENTS_LOST says so. A store used by one process only (memory, SQLite) may
        never call the listener. Call once, after `open()`.
        """
        ...
