"""The engine: what the server does, independent of gRPC.

`Engine` answers clients (schedule, read, wait, cancel, signal) and workers (sessions, step
results, completions), and runs the background loops: dispatch, lease expiry and pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any

from ergon_server.clock import Clock
from ergon_server.engine.config import EngineConfig
from ergon_server.engine.dispatcher import Dispatcher
from ergon_server.engine.sessions import (
    AckOut,
    AssignmentOut,
    CancelRequestedOut,
    CapacityIn,
    DrainOut,
    FlowFinishIn,
    HeartbeatIn,
    ParkIn,
    PingOut,
    ReleaseIn,
    ServerEventOut,
    Session,
    StepResultIn,
    SuspendIn,
    WaitIn,
    WakeupOut,
    WorkerEventIn,
    lease_lost,
)
from ergon_server.errors import (
    AlreadyExistsError,
    ErgonError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    UnavailableError,
)
from ergon_server.metrics import Metrics
from ergon_server.model import (
    CancelOutcome,
    ClaimedFlow,
    EntryKind,
    Failure,
    FlowPage,
    FlowRecord,
    FlowStatus,
    JournalRecord,
    Lease,
    NewFlow,
    Park,
    Satisfied,
    ScheduleOutcome,
    ScheduleResult,
    SignalOutcome,
    SignalResult,
    StoreEvent,
    StoreEventKind,
    SuspendOutcome,
    WriteOutcome,
)
from ergon_server.storage.base import Store
from ergon_worker_sdk.tracing import Tracer

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_ID_LENGTH = 256
DEFAULT_PAGE_SIZE = 100
# Timer fires queued for the group commit at once; the loop waits for one before adding more.
MAX_TIMER_FIRES_IN_FLIGHT = 16
# Leases one expiry transaction re-queues; a scan takes more transactions when more expired
# (after a long outage, say) rather than one that locks and rewrites every running flow.
MAX_LEASES_EXPIRED_AT_ONCE = 500
# Held flows read at once when store events may have been lost.
RECHECKS_AT_ONCE = 32
# Journal entries that a satisfied wait records (a wakeup carries them to the worker).
_WAIT_KINDS = (EntryKind.TIMER, EntryKind.SIGNAL, EntryKind.CHILD)


def validate_id(value: str, what: str, *, allow_empty: bool = False) -> None:
    """Refuse ids that are empty, too long or hold control characters."""
    if not value:
        if allow_empty:
            return
        raise InvalidArgumentError(f"{what} must not be empty", "INVALID_ID")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgumentError(
            f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}", "INVALID_ID"
        )
    if not value.isprintable():
        raise InvalidArgumentError(f"{what} must not hold control characters", "INVALID_ID")


def _check_timeout(timeout_ms: int) -> None:
    if timeout_ms < 0:
        raise InvalidArgumentError("timeout_ms must not be negative", "INVALID_TIMEOUT")


class Engine:
    """Flows, dispatch, leases and signals over a `Store`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.dispatcher = Dispatcher(store, clock, self.config, self.metrics)
        store.observe_commits(self.metrics.observe_commit)
        self.metrics.watch_sessions(
            lambda: [(s.capacity, len(s.held)) for s in self.dispatcher.sessions]
        )
        self._known_types: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self._timer_wake = asyncio.Event()
        # When the timer loop next scans (ms), while it sleeps: a timer due later needs no wake.
        self._timer_scan_at: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._tracer = Tracer("ergon_server")
        # When the store first failed since the last expiry scan (ms): leases went unrenewed
        # from then through no fault of their workers (`scan_expired_leases`).
        self._store_failed_at: int | None = None
        # Until this time (ms), only leases that ran out before `_grace_cutoff` expire: the
        # workers' renewals after an outage.
        self._expiry_grace_until: int | None = None
        self._grace_cutoff = 0
        self.draining = False
        self.timers_fired = 0
        # Counts work handled; a test environment watches it to tell when all is idle.
        self.activity = 0

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Start the background loops and listen to changes other replicas make.

        Call before serving workers: on a store this server has to itself, it first renews
        the leases left from before a restart (`_restart_leases`).
        """
        if self._runner is None:
            await self.store.subscribe(self._on_store_event)
            if not self.store.shared:
                await self._restart_leases()
            self._runner = asyncio.create_task(self._run(), name="ergon-engine")

    async def _restart_leases(self) -> None:
        """Give every lease of a flow left RUNNING one lease TTL from now.

        This server is its store's only one, so no worker could reach a server while it was
        down: that time does not count against their leases. A worker that reconnects within
        the TTL re-attaches its flows instead of having them re-run elsewhere; the leases of
        workers that are gone expire one TTL later than they would have.
        """
        expires_at = self.clock.now_ms() + self.config.lease_ttl_ms
        owners: set[str] = set()
        cursor: int | None = None
        while True:
            page = await self.store.list_flows(
                [FlowStatus.RUNNING], None, self.config.max_page_size, cursor
            )
            owners.update(f.lease_owner for f in page.flows if f.lease_owner is not None)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        # Submitted together, the renewals share one group commit.
        renewed = sum(
            await asyncio.gather(
                *(self.store.renew_leases(owner, expires_at) for owner in sorted(owners))
            )
        )
        if renewed:
            log.info("%d leases left from before the restart renewed for one lease TTL", renewed)

    def _on_store_event(self, event: StoreEvent) -> None:
        """React to a change another replica made in the shared store (a hint)."""
        if event.kind is StoreEventKind.READY:
            self.dispatcher.wake()
        elif event.kind is StoreEventKind.TIMER:
            self._timer_wake.set()
        elif event.kind is StoreEventKind.ENDED:
            self._notify(event.flow_id)
        elif event.kind is StoreEventKind.LEASE_EXPIRED:
            # Expired by another replica: the worker holding it here must stop, as when this
            # server's own expiry scan takes it (only that lease, not a newer one).
            self.dispatcher.revoke(event.flow_id, "LEASE_EXPIRED", event.lease_token)
        elif event.kind is StoreEventKind.EVENTS_LOST:
            self.dispatcher.wake()
            self._timer_wake.set()
            self._in_background(self._recheck_held_flows())
        else:
            session = self.dispatcher.holder(event.flow_id, event.lease_token)
            if session is None:
                return
            if event.kind is StoreEventKind.CANCEL_REQUESTED:
                session.send(CancelRequestedOut(event.flow_id, event.lease_token, ""))
            elif event.kind is StoreEventKind.WAKEUP:
                self._in_background(self._forward_wakeup(session, event))

    def _in_background(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `job` as a task that shutdown cancels."""
        task = asyncio.create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _recheck_held_flows(self) -> None:
        """Tell the sessions here what lost store events would have told them.

        Another replica may meanwhile have expired a lease held here, requested a cancel of a
        flow held here or satisfied one of its waits: each held flow is read again, and its
        session gets a revoke, a cancel request, or the wait entries recorded during its lease
        (a wakeup its worker already had is ignored there).
        """
        held = self.dispatcher.held_flows()
        log.info("store events may have been lost: checking the %d flows held here", len(held))
        for start in range(0, len(held), RECHECKS_AT_ONCE):
            await asyncio.gather(
                *(self._recheck(*item) for item in held[start : start + RECHECKS_AT_ONCE])
            )

    async def _recheck(self, session: Session, flow_id: str, lease_token: int, given: int) -> None:
        try:
            record = await self.store.get_flow(flow_id)
            entries: list[JournalRecord] = []
            if (
                record is not None
                and record.status is FlowStatus.RUNNING
                and record.lease_token == lease_token
            ):
                after, size = given, self.config.max_page_size
                while page := await self.store.get_history(flow_id, after, size):
                    entries += page
                    if len(page) < size:
                        break
                    after = page[-1].sequence
        except ErgonError as error:
            log.warning("cannot check flow %s held here: %s", flow_id, error.message)
            return
        if self.dispatcher.holder(flow_id, lease_token) is not session:
            return  # ended, moved or given back meanwhile
        if (
            record is None
            or record.status is not FlowStatus.RUNNING
            or record.lease_token != lease_token
        ):
            log.info("the lease on flow %s was lost meanwhile", flow_id, extra={"flow_id": flow_id})
            self.dispatcher.revoke(flow_id, "LEASE_LOST", lease_token)
            return
        if record.cancel_requested:
            reasons = [e.error.message for e in entries if e.kind is EntryKind.CANCEL and e.error]
            session.send(CancelRequestedOut(flow_id, lease_token, reasons[0] if reasons else ""))
        for entry in entries:
            if entry.kind in _WAIT_KINDS:
                session.send(WakeupOut(flow_id, lease_token, entry))

    async def _forward_wakeup(self, session: Session, event: StoreEvent) -> None:
        try:
            entry = await self.store.get_entry(event.flow_id, event.key)
        except ErgonError as error:
            log.warning("cannot read wait %s of flow %s: %s", event.key, event.flow_id, error)
            return
        if entry is not None:
            session.send(WakeupOut(event.flow_id, event.lease_token, entry))

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.dispatcher.run(), name="ergon-dispatch")
            group.create_task(self._expiry_loop(), name="ergon-lease-expiry")
            group.create_task(self._ping_loop(), name="ergon-ping")
            group.create_task(self._timer_loop(), name="ergon-timers")

    async def drain(self) -> None:
        """Tell every worker to go away and refuse new sessions; leases stay for a reconnect."""
        self.draining = True
        for session in self.dispatcher.sessions:
            session.send(DrainOut())
            self.dispatcher.remove(session)
        # Long polls end now with UNAVAILABLE (clients retry elsewhere), not cancelled later.
        for flow_id in list(self._waiters):
            self._notify(flow_id)

    async def shutdown(self) -> None:
        """Stop the loops. Idempotent, safe before start."""
        await self.drain()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        for task in list(self._background):
            task.cancel()
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.cancel()
        self._waiters.clear()

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.expiry_scan_interval_ms / 1000)
            try:
                await self.scan_expired_leases()
            except ErgonError as error:
                log.warning("lease expiry scan failed: %s", error.message)

    async def scan_expired_leases(self) -> None:
        """Expire leases, unless the store is just back from an outage.

        While the store is down, heartbeats cannot renew leases: once it is back, leases older
        than a TTL belong to workers that are alive all the same. So the first scan after a
        failure renews the leases of this server's live sessions (a write: it fails while the
        store is still down), and then, for one lease TTL, only leases that had run out before
        the failure expire: time for every worker's heartbeats (through any replica) to renew
        theirs. A worker that really died meanwhile has its flows re-queued one TTL later, and
        one that died before still at once, however often the store fails.
        """
        if self._store_failed_at is not None:
            await self._renew_live_leases()
            self._grace_cutoff, self._store_failed_at = self._store_failed_at, None
            ttl = self.config.lease_ttl_ms
            self._expiry_grace_until = self.clock.now_ms() + ttl
            log.warning(
                "the store is back: leases expire again in %d ms, once workers renewed them", ttl
            )
        cutoff = None
        if self._expiry_grace_until is not None:
            if self.clock.now_ms() < self._expiry_grace_until:
                cutoff = self._grace_cutoff
            else:
                self._expiry_grace_until = None
        try:
            await self.expire_leases(before_ms=cutoff)
        except StoreUnavailableError:
            self._note_store_failure()
            raise

    def _note_store_failure(self) -> None:
        if self._store_failed_at is None:
            self._store_failed_at = self.clock.now_ms()

    async def _renew_live_leases(self) -> None:
        """Renew the leases of the sessions here heard from within a lease TTL."""
        now = self.clock.now_ms()
        expires_at = now + self.config.lease_ttl_ms
        live = [
            session
            for session in self.dispatcher.sessions
            if session.held
            and session.last_heard_ms is not None
            and session.last_heard_ms >= now - self.config.lease_ttl_ms
        ]
        if not live:
            # Still a write, so that it tells whether the store takes writes again.
            await self.store.renew_leases("", expires_at, [])
            return
        await asyncio.gather(
            *(
                self.store.renew_leases(session.session_id, expires_at, sorted(session.held))
                for session in live
            )
        )

    async def expire_leases(
        self, limit: int = MAX_LEASES_EXPIRED_AT_ONCE, *, before_ms: int | None = None
    ) -> int:
        """Re-queue the leases expired now, or before `before_ms`; returns how many.

        In batches of `limit`, one transaction each.
        """
        expired_total = 0
        while True:
            # With a cutoff, the re-queued flows are stamped with it (ready since then).
            now_ms = self.clock.now_ms()
            at_ms = now_ms if before_ms is None else min(now_ms, before_ms)
            expired = await self.store.expire_leases(at_ms, limit)
            for lease in expired:
                flow_id = lease.flow_id
                log.info("lease on flow %s expired; re-queued", flow_id, extra={"flow_id": flow_id})
                # Only that lease: a claim in the same group commit may already have handed
                # the flow to another worker under a new token.
                self.dispatcher.revoke(flow_id, "LEASE_EXPIRED", lease.lease_token)
            if expired:
                self.dispatcher.wake()
            expired_total += len(expired)
            if len(expired) < limit:
                return expired_total

    async def fire_due_timers(self, limit: int = 1000) -> int:
        """Fire every timer due now (in batches of `limit`); returns how many fired."""
        fired = 0
        while True:
            batch = await self.store.fire_timers(self.clock.now_ms(), limit)
            self._satisfied(batch)
            fired += len(batch)
            if len(batch) < limit:
                self.timers_fired += fired
                return fired

    async def _timer_loop(self) -> None:
        poll = self.config.timer_poll_interval_ms
        firing: set[asyncio.Task[None]] = set()
        while True:
            self._timer_wake.clear()
            self._timer_scan_at = None
            if len(firing) >= MAX_TIMER_FIRES_IN_FLIGHT:
                await asyncio.wait(firing, return_when=asyncio.FIRST_COMPLETED)
                continue
            # Fire what is due without waiting for that commit before planning the next scan:
            # under load a group commit takes tens of ms, and a timer due meanwhile would wait
            # for it too. Fires in flight never fire a timer twice: the store applies them in
            # order, and each fires only what is still open.
            now = self.clock.now_ms()
            fire = self._in_background(self._fire_due_timers_logged())
            firing.add(fire)
            fire.add_done_callback(firing.discard)
            try:
                next_at = await self.store.next_timer_at(after_ms=now)
            except ErgonError as error:
                log.warning("timer scan failed: %s", error.message)
                next_at = None
            delay = poll if next_at is None else min(poll, next_at - self.clock.now_ms())
            if delay > 0:
                self._timer_scan_at = self.clock.now_ms() + delay
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay / 1000):
                        await self._timer_wake.wait()

    async def _fire_due_timers_logged(self) -> None:
        try:
            await self.fire_due_timers()
        except ErgonError as error:
            # The timers stay open; the next scan (at most a poll interval away) fires them.
            log.warning("firing timers failed: %s", error.message)

    def _timer_registered(self, fire_at: int) -> None:
        """Wake the timer loop for a new timer due before its next scan."""
        if self._timer_scan_at is None or fire_at < self._timer_scan_at:
            self._timer_wake.set()

    def _satisfied(self, satisfied: Sequence[Satisfied]) -> None:
        """Act on waits that became satisfied: re-queue or tell the worker holding the flow."""
        for item in satisfied:
            if item.entry.kind is EntryKind.TIMER:
                self.metrics.timers_fired.inc()
                if item.fire_at is not None:
                    late_ms = max(0, item.entry.recorded_at - item.fire_at)
                    self.metrics.timer_lateness.observe(late_ms / 1000)
            if item.status is FlowStatus.PENDING:
                self.dispatcher.wake()
            elif item.status is FlowStatus.RUNNING:
                session = self.dispatcher.holder(item.flow_id, item.lease_token)
                if session is not None:
                    session.send(WakeupOut(item.flow_id, item.lease_token, item.entry))

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_ms / 1000)
            for session in self.dispatcher.sessions:
                session.send(PingOut())

    # ----------------------------------------------------------------- clients

    async def _check_flow_types(self, flow_types: set[str]) -> None:
        if self.config.allow_unregistered_flow_types:
            return
        unknown = flow_types - self._known_types
        if unknown:
            self._known_types |= await self.store.known_flow_types(sorted(unknown))
            unknown -= self._known_types
        if unknown:
            names = ", ".join(repr(t) for t in sorted(unknown))
            raise NotFoundError(
                f"no worker has registered flow type {names}; start a worker for it first "
                "(or run the server with --allow-unregistered-flow-types)",
                "UNKNOWN_FLOW_TYPE",
            )

    def _check_new_flow(self, flow: NewFlow) -> NewFlow:
        validate_id(flow.flow_id, "flow_id", allow_empty=True)
        validate_id(flow.flow_type, "flow_type")
        validate_id(flow.request_id, "request_id", allow_empty=True)
        if not flow.flow_id:
            return NewFlow(
                flow_id=uuid.uuid4().hex,
                flow_type=flow.flow_type,
                input=flow.input,
                request_id=flow.request_id,
                start_at=flow.start_at,
                retry_policy=flow.retry_policy,
                labels=flow.labels,
            )
        return flow

    async def schedule_flows(self, flows: Sequence[NewFlow]) -> list[ScheduleResult]:
        """Schedule flows; a taken flow_id comes back with outcome CONFLICT."""
        self.activity += 1
        checked = [self._check_new_flow(f) for f in flows]
        await self._check_flow_types({f.flow_type for f in checked})
        # Woken before the write is queued, the dispatcher's claim joins the same group commit
        # (claims come after everything queued before them), so a flow is scheduled and
        # leased in one transaction instead of two in a row.
        self.dispatcher.wake()
        with self._tracer.span("ergon.schedule", **{"ergon.flows": len(checked)}):
            return await self.store.schedule_flows(checked, self.clock.now_ms())

    async def schedule_flow(self, flow: NewFlow) -> ScheduleResult:
        """Schedule one flow; a flow_id taken by another flow raises AlreadyExistsError."""
        (result,) = await self.schedule_flows([flow])
        if result.outcome is ScheduleOutcome.CONFLICT:
            raise AlreadyExistsError(
                f"flow {result.flow_id!r} is already scheduled with a different type or input"
            )
        return result

    async def get_flow(self, flow_id: str) -> FlowRecord:
        """The flow, or NotFoundError."""
        validate_id(flow_id, "flow_id")
        record = await self.store.get_flow(flow_id)
        if record is None:
            raise NotFoundError(f"flow {flow_id!r} does not exist")
        return record

    async def run_flow(
        self, flow: NewFlow, timeout_ms: int
    ) -> tuple[ScheduleResult, bool, FlowRecord]:
        """Schedule one flow, then wait for it as `wait_flow` does; (result, done, flow)."""
        _check_timeout(timeout_ms)
        result = await self.schedule_flow(flow)
        done, record = await self.wait_flow(result.flow_id, timeout_ms)
        return result, done, record

    async def wait_flow(self, flow_id: str, timeout_ms: int) -> tuple[bool, FlowRecord]:
        """Wait until the flow is terminal or the timeout passes; (done, flow)."""
        _check_timeout(timeout_ms)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout_ms, self.config.max_wait_ms) / 1000
        while True:
            record = await self.get_flow(flow_id)
            remaining = deadline - loop.time()
            if record.status.terminal or remaining <= 0:
                return record.status.terminal, record
            if self.draining:
                raise UnavailableError("the server is shutting down; retry", "DRAINING")
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(flow_id, []).append(future)
            try:
                # Re-read now and then: another replica may have ended the flow.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await future
            finally:
                waiters = self._waiters.get(flow_id, [])
                if future in waiters:
                    waiters.remove(future)
                if not waiters:
                    self._waiters.pop(flow_id, None)

    def _notify(self, flow_id: str) -> None:
        for future in self._waiters.pop(flow_id, []):
            if not future.done():
                future.set_result(None)

    async def list_flows(
        self,
        statuses: Sequence[FlowStatus],
        flow_type: str | None,
        page_size: int,
        cursor: int | None,
    ) -> FlowPage:
        """One page of flows; page_size 0 means the default."""
        if flow_type is not None:
            validate_id(flow_type, "flow_type")
        if page_size < 0:
            raise InvalidArgumentError("page_size must not be negative", "INVALID_PAGE_SIZE")
        size = min(page_size or DEFAULT_PAGE_SIZE, self.config.max_page_size)
        return await self.store.list_flows(statuses, flow_type, size, cursor)

    async def get_history(
        self, flow_id: str, after_sequence: int, page_size: int
    ) -> list[JournalRecord]:
        """One page of a flow's journal."""
        await self.get_flow(flow_id)
        if page_size < 0:
            raise InvalidArgumentError("page_size must not be negative", "INVALID_PAGE_SIZE")
        size = min(page_size or DEFAULT_PAGE_SIZE, self.config.max_page_size)
        return await self.store.get_history(flow_id, after_sequence, size)

    async def cancel_flow(self, flow_id: str, reason: str) -> FlowRecord:
        """Cancel a flow that has not ended.

        A pending or waiting flow is CANCELLED at once; a running one is asked to stop at its
        next step boundary (its code may catch that and clean up) and ends CANCELLED. Asking
        again is harmless: a flow that ended CANCELLED is returned as it is (so a retried call
        whose first answer was lost succeeds); one that ended otherwise is FLOW_CLOSED.
        """
        validate_id(flow_id, "flow_id")
        if len(reason) > 1024:
            raise InvalidArgumentError("a cancel reason is limited to 1024 characters")
        outcome, satisfied = await self.store.cancel_flow(flow_id, reason, self.clock.now_ms())
        if outcome is CancelOutcome.NOT_FOUND:
            raise NotFoundError(f"flow {flow_id!r} does not exist")
        if outcome is CancelOutcome.CLOSED:
            record = await self.get_flow(flow_id)
            if record.status is FlowStatus.CANCELLED:
                return record
            raise FailedPreconditionError(
                f"flow {flow_id!r} has already ended {record.status.value}", "FLOW_CLOSED"
            )
        if outcome is CancelOutcome.CANCEL_REQUESTED:
            record = await self.get_flow(flow_id)
            session = self.dispatcher.holder(flow_id, record.lease_token)
            if session is not None:
                session.send(CancelRequestedOut(flow_id, record.lease_token, reason))
            log.info("cancel of running flow %s requested", flow_id, extra={"flow_id": flow_id})
        else:
            self.dispatcher.revoke(flow_id, "CANCELLED")
            self._notify(flow_id)
            self.metrics.flows_finished.labels("cancelled").inc()
            log.info("flow %s cancelled", flow_id, extra={"flow_id": flow_id})
        self._satisfied(satisfied)
        return await self.get_flow(flow_id)

    @staticmethod
    def _signal_error(flow_id: str, result: SignalResult) -> ErgonError | None:
        if result.outcome is SignalOutcome.NOT_FOUND:
            return NotFoundError(f"flow {flow_id!r} does not exist")
        if result.outcome is SignalOutcome.CLOSED:
            return FailedPreconditionError(
                f"flow {flow_id!r} has already ended; it takes no more signals", "FLOW_CLOSED"
            )
        return None

    async def send_signal(self, flow_id: str, name: str, payload: bytes, request_id: str) -> int:
        """Append a signal to the flow's mailbox; returns its sequence."""
        validate_id(flow_id, "flow_id")
        validate_id(name, "signal name")
        validate_id(request_id, "request_id", allow_empty=True)
        result = await self.store.send_signal(
            flow_id, name, payload, request_id, self.clock.now_ms()
        )
        error = self._signal_error(flow_id, result)
        if error is not None:
            raise error
        if result.satisfied is not None:
            self._satisfied([result.satisfied])
        return result.sequence

    async def signal_with_schedule(
        self, flow: NewFlow, name: str, payload: bytes
    ) -> tuple[ScheduleResult, int]:
        """Schedule the flow if it does not exist and deliver a signal to it, atomically."""
        checked = self._check_new_flow(flow)
        validate_id(name, "signal name")
        await self._check_flow_types({checked.flow_type})
        scheduled, signalled = await self.store.signal_with_schedule(
            checked, name, payload, self.clock.now_ms()
        )
        if scheduled.outcome is ScheduleOutcome.CONFLICT:
            raise AlreadyExistsError(
                f"flow {scheduled.flow_id!r} is already scheduled with a different type or input"
            )
        error = self._signal_error(checked.flow_id, signalled)
        if error is not None:
            raise error
        if signalled.satisfied is not None:
            self._satisfied([signalled.satisfied])
        self.dispatcher.wake()
        return scheduled, signalled.sequence

    # ----------------------------------------------------------------- workers

    async def open_session(
        self,
        worker_id: str,
        flow_types: Sequence[str],
        capacity: int,
        protocol_version: int,
        held: Sequence[Lease],
        peer: str = "",
        *,
        announce: bool = True,
    ) -> tuple[Session, list[str]]:
        """Register a worker stream; returns the session and the re-attached flow ids.

        `announce`: log the session at INFO (a stream), not DEBUG (one poll of a poll worker).
        """
        if self.draining:
            raise UnavailableError("the server is shutting down", "DRAINING")
        validate_id(worker_id, "worker_id")
        if not flow_types:
            raise InvalidArgumentError("a worker must register at least one flow type")
        for flow_type in flow_types:
            validate_id(flow_type, "flow_type")
        # 0 is a stopping worker that reconnected: it re-attaches the flows it still runs and
        # takes no new ones.
        if capacity < 0:
            raise InvalidArgumentError(f"capacity must not be negative, got {capacity}")
        if protocol_version != PROTOCOL_VERSION:
            raise FailedPreconditionError(
                f"this server speaks worker protocol {PROTOCOL_VERSION}, "
                f"the worker speaks {protocol_version}",
                "PROTOCOL_VERSION",
            )
        now = self.clock.now_ms()
        types = tuple(dict.fromkeys(flow_types))
        if not self._known_types.issuperset(types):
            # Known types are in the store already: a poll worker's every call needs no write.
            await self.store.register_flow_types(types, now)
            self._known_types.update(types)
        session = Session(uuid.uuid4().hex, worker_id, types, capacity, connected_at=now, peer=peer)
        session.last_heard_ms = now
        reattached: list[str] = []
        if held:
            reattached = await self.store.reattach_leases(
                session.session_id, held, now + self.config.lease_ttl_ms, now
            )
        tokens = {lease.flow_id: lease.lease_token for lease in held}
        for flow_id in reattached:
            # A lease held by another live session of ours moves with the worker.
            self.dispatcher.forget(flow_id)
        self.dispatcher.add(session, [(f, tokens[f]) for f in reattached])
        log.log(
            logging.INFO if announce else logging.DEBUG,
            "worker %s connected: session %s, types %s, capacity %d, %d leases re-attached",
            worker_id,
            session.session_id,
            ",".join(types),
            capacity,
            len(reattached),
            extra={"worker_id": worker_id, "session_id": session.session_id},
        )
        return session, reattached

    def close_session(
        self, session: Session, *, announce: bool = True, give_back: bool = True
    ) -> None:
        """The worker's stream ended; its leases wait for a reconnect or their expiry.

        Flows handed to the session but never written to it are given back at once (with
        `give_back`): the worker cannot know them, so they would wait out their leases.
        """
        if session.session_id in {s.session_id for s in self.dispatcher.sessions}:
            log.log(
                logging.INFO if announce else logging.DEBUG,
                "worker %s disconnected: session %s, %d flows in flight",
                session.worker_id,
                session.session_id,
                len(session.held),
                extra={"worker_id": session.worker_id, "session_id": session.session_id},
            )
        self.dispatcher.remove(session)
        undelivered = session.take_undelivered() if give_back else []
        if undelivered:
            leases = [Lease(f.flow_id, f.lease_token) for f in undelivered]
            self._in_background(self._give_back(leases))

    async def _give_back(self, leases: list[Lease]) -> None:
        try:
            await self.store.release_flows(leases, self.clock.now_ms())
        except ErgonError as error:
            log.warning("could not give back %d undelivered flows: %s", len(leases), error)
            return
        self.dispatcher.wake()

    # ------------------------------------------------------- worker-poll (unary)

    async def poll_flow(
        self,
        worker_id: str,
        flow_types: Sequence[str],
        protocol_version: int,
        timeout_ms: int,
        peer: str = "",
    ) -> ClaimedFlow | None:
        """Wait up to `timeout_ms` for one flow of these types, leased to a one-poll session.

        The session only lives for the call: the lease outlives it (in the store), fenced by
        its token, until the flow ends, is given back or the lease expires.
        """
        if timeout_ms < 0:
            raise InvalidArgumentError("timeout_ms must not be negative", "INVALID_TIMEOUT")
        session, _ = await self.open_session(
            worker_id, flow_types, 1, protocol_version, [], peer, announce=False
        )
        # Heard from for as long as its call is open (a dropped call cancels this coroutine),
        # though it sends no heartbeats.
        session.last_heard_ms = None
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout_ms, self.config.max_wait_ms) / 1000):
                    while not session.closed:
                        flow = _assignment(await session.next_batch())
                        if flow is not None:
                            self.close_session(session, announce=False)
                            return flow
        except BaseException:
            # The call went away: a flow handed over meanwhile goes back at once.
            self.close_session(session, announce=False)
            raise
        self.close_session(session, announce=False, give_back=False)
        # A flow handed over as the wait ended is still this caller's; after the close, a
        # claim in flight gives its flows back instead (the dispatcher sees the session closed).
        return _assignment(await session.next_batch())

    async def apply_worker_event(self, worker_id: str, event: WorkerEventIn) -> AckOut:
        """Apply one worker event outside a stream (worker-poll) and return its ack."""
        # Never given to the dispatcher: nothing is sent to it but the event's ack.
        session = Session(uuid.uuid4().hex, worker_id, (), 0, connected_at=self.clock.now_ms())
        await self.handle_worker_events(session, [event])
        acks = [e for e in await session.next_batch() if isinstance(e, AckOut)]
        if len(acks) != 1:
            raise StoreError(f"a worker event was answered {len(acks)} times")
        return acks[0]

    async def extend_lease(self, flow_id: str, lease_token: int) -> int:
        """Renew a held lease for another lease TTL; returns its new expiry (ms)."""
        record = await self.get_flow(flow_id)
        if (
            record.status is not FlowStatus.RUNNING
            or record.lease_token != lease_token
            or record.lease_owner is None
        ):
            raise lease_lost(flow_id)
        expires_at = self.clock.now_ms() + self.config.lease_ttl_ms
        # By owner: the lease is renewed only while the session that claimed it holds it.
        if not await self.store.renew_leases(record.lease_owner, expires_at):
            raise lease_lost(flow_id)
        return expires_at

    async def handle_worker_events(self, session: Session, events: Sequence[WorkerEventIn]) -> None:
        """Apply a message's worker events and queue their acks."""
        self.activity += 1
        session.last_heard_ms = self.clock.now_ms()
        steps = [e for e in events if isinstance(e, StepResultIn)]
        finishes = [e for e in events if isinstance(e, FlowFinishIn)]
        releases = [e for e in events if isinstance(e, ReleaseIn)]
        waits = [e for e in events if isinstance(e, WaitIn)]
        suspends = [e for e in events if isinstance(e, SuspendIn)]
        parks = [e for e in events if isinstance(e, ParkIn)]
        others = [e for e in events if isinstance(e, HeartbeatIn | CapacityIn)]
        jobs = []
        if steps:
            jobs.append(self._record_steps(session, steps))
        if waits:
            jobs.append(self._register_waits(session, waits))
        if finishes:
            jobs.append(self._finish_flows(session, finishes))
        if suspends:
            jobs.append(self._suspend_flows(session, suspends))
        if releases:
            jobs.append(self._release_flows(session, releases))
        if parks:
            jobs.append(self._park_flows(session, parks))
        for event in others:
            jobs.append(self._control(session, event))
        if len(jobs) == 1:
            await jobs[0]  # the common case: no task to create, no loop turn to wait
        else:
            await asyncio.gather(*jobs)

    def _refuse(self, session: Session, seqs: Sequence[int], error: ErgonError) -> None:
        log.warning(
            "worker %s: events refused: %s",
            session.worker_id,
            error.message,
            extra={"worker_id": session.worker_id, "reason": error.reason},
        )
        for seq in seqs:
            if seq:
                session.send(AckOut.refusing(seq, error))

    def _ack_fenced(
        self, session: Session, seq: int, flow_id: str, lease_token: int, outcome: WriteOutcome
    ) -> None:
        if outcome is WriteOutcome.LEASE_LOST:
            log.info(
                "worker %s lost its lease on flow %s",
                session.worker_id,
                flow_id,
                extra={"worker_id": session.worker_id, "flow_id": flow_id},
            )
            self.dispatcher.forget(flow_id, lease_token)
        if seq:
            session.send(AckOut.for_outcome(seq, outcome, flow_id))

    async def _record_steps(self, session: Session, events: list[StepResultIn]) -> None:
        try:
            with self._tracer.span(
                "ergon.record_steps",
                **{"ergon.steps": len(events), "ergon.worker_id": session.worker_id},
            ):
                outcomes = await self.store.record_steps(
                    [e.record for e in events], self.clock.now_ms()
                )
        except ErgonError as error:
            self._refuse(session, [e.seq for e in events], error)
            return
        for event, outcome in zip(events, outcomes, strict=True):
            record = event.record
            if outcome is WriteOutcome.OK:
                self.metrics.step_outcomes[record.status.value.lower()].inc()
                # Every attempt, 0 ms too (a step under a millisecond): one per step outcome.
                self.metrics.step_duration.observe(event.duration_ms / 1000)
            self._ack_fenced(session, event.seq, record.flow_id, record.lease_token, outcome)

    async def _finish_flows(self, session: Session, events: list[FlowFinishIn]) -> None:
        try:
            outcomes, satisfied = await self.store.finish_flows(
                [e.finish for e in events], self.clock.now_ms()
            )
        except ErgonError as error:
            self._refuse(session, [e.seq for e in events], error)
            return
        for event, outcome in zip(events, outcomes, strict=True):
            finish = event.finish
            if outcome is WriteOutcome.OK:
                # The freed slot alone calls for no pass (see `forget`); a retried flow is
                # work again, whoever held it (a poll worker's session is already gone).
                self.dispatcher.forget(finish.flow_id, finish.lease_token, ended=True)
                if finish.retry_delay_ms > 0:
                    self.dispatcher.wake()
                self._notify(finish.flow_id)
                ended = "retried" if finish.retry_delay_ms > 0 else finish.status.value.lower()
                self.metrics.flows_finished.labels(ended).inc()
            self._ack_fenced(session, event.seq, finish.flow_id, finish.lease_token, outcome)
        self._satisfied(satisfied)

    async def _register_waits(self, session: Session, events: list[WaitIn]) -> None:
        accepted: list[WaitIn] = []
        for event in events:
            child = event.wait.child
            try:
                if child is not None:
                    validate_id(child.flow_id, "child flow_id")
                    await self._check_flow_types({child.flow_type})
            except ErgonError as error:
                self._refuse(session, [event.seq], error)
                continue
            accepted.append(event)
        events = accepted
        if not events:
            return
        try:
            results = await self.store.register_waits([e.wait for e in events], self.clock.now_ms())
        except ErgonError as error:
            self._refuse(session, [e.seq for e in events], error)
            return
        now = self.clock.now_ms()
        for event, result in zip(events, results, strict=True):
            wait = event.wait
            if result.outcome is not WriteOutcome.OK:
                self._ack_fenced(session, event.seq, wait.flow_id, wait.lease_token, result.outcome)
                continue
            if result.fire_at is not None and result.entry is None:
                self._timer_registered(result.fire_at)
            if wait.child is not None:
                self.dispatcher.wake()
            session.send(
                AckOut(
                    event.seq,
                    entries=(result.entry,) if result.entry is not None else (),
                    fire_at_ms=result.fire_at or 0,
                    server_time_ms=now,
                )
            )

    async def _suspend_flows(self, session: Session, events: list[SuspendIn]) -> None:
        try:
            results, satisfied = await self.store.suspend_flows(
                [e.suspend for e in events], self.clock.now_ms()
            )
        except ErgonError as error:
            self._refuse(session, [e.seq for e in events], error)
            return
        for event, result in zip(events, results, strict=True):
            request = event.suspend
            if result.outcome in (SuspendOutcome.SUSPENDED, SuspendOutcome.CANCELLED):
                self.dispatcher.forget(request.flow_id, request.lease_token)
                if result.outcome is SuspendOutcome.CANCELLED:
                    self._notify(request.flow_id)
                session.send(AckOut(event.seq, suspended=True))
            elif result.outcome is SuspendOutcome.RESUME:
                resumed = Lease(request.flow_id, request.lease_token)
                session.send(AckOut(event.seq, entries=result.entries, resumed=resumed))
            else:
                outcome = (
                    WriteOutcome.NOT_FOUND
                    if result.outcome is SuspendOutcome.NOT_FOUND
                    else WriteOutcome.LEASE_LOST
                )
                self._ack_fenced(session, event.seq, request.flow_id, request.lease_token, outcome)
        self._satisfied(satisfied)

    async def _park_flows(self, session: Session, events: list[ParkIn]) -> None:
        try:
            outcomes = await self.store.park_flows(
                [e.park for e in events],
                self.clock.now_ms(),
                self.config.park_initial_delay_ms,
                self.config.park_max_delay_ms,
            )
        except ErgonError as error:
            self._refuse(session, [e.seq for e in events], error)
            return
        for event, outcome in zip(events, outcomes, strict=True):
            park = event.park
            if outcome is WriteOutcome.OK:
                log.warning(
                    "flow %s parked: %s: %s",
                    park.flow_id,
                    park.error.reason,
                    park.error.message,
                    extra={"flow_id": park.flow_id, "reason": park.error.reason},
                )
                self.dispatcher.forget(park.flow_id, park.lease_token)
            self._ack_fenced(session, event.seq, park.flow_id, park.lease_token, outcome)

    async def park_undeliverable(self, flow: ClaimedFlow, length: int, limit: int) -> None:
        """Park a claimed flow whose assignment is over the message limit, instead of sending it.

        Sent, it would end the worker's stream, and come back after every reconnect. Parked,
        it is held and retried with backoff (`ergon flows show` gives the reason), so a
        server and workers with a larger limit run it.
        """
        failure = Failure(
            type="MessageTooLarge",
            message=(
                f"the flow's assignment (its input and history) is {length} bytes, over the "
                f"{limit}-byte message limit: raise --max-message-bytes on the server and "
                "max_message_bytes on the workers' Client to run it"
            ),
            reason="ASSIGNMENT_TOO_LARGE",
        )
        park = Park(flow.flow_id, flow.lease_token, failure)
        try:
            (outcome,) = await self.store.park_flows(
                [park],
                self.clock.now_ms(),
                self.config.park_initial_delay_ms,
                self.config.park_max_delay_ms,
            )
        except ErgonError as error:
            # Not sent either: its lease lapses and it is claimed again, unless the session's
            # heartbeats keep renewing it with its other leases (renewal is by session).
            log.error("could not park flow %s: %s", flow.flow_id, error.message)
            outcome = WriteOutcome.LEASE_LOST
        if outcome is WriteOutcome.OK:
            log.error(
                "flow %s parked: %s",
                flow.flow_id,
                failure.message,
                extra={"flow_id": flow.flow_id, "reason": failure.reason},
            )
        self.dispatcher.forget(flow.flow_id, flow.lease_token)

    async def _release_flows(self, session: Session, events: list[ReleaseIn]) -> None:
        try:
            outcomes = await self.store.release_flows(
                [e.lease for e in events], self.clock.now_ms()
            )
        except ErgonError as error:
            self._refuse(session, [e.seq for e in events], error)
            return
        for event, outcome in zip(events, outcomes, strict=True):
            lease = event.lease
            if outcome is WriteOutcome.OK:
                self.dispatcher.forget(lease.flow_id, lease.lease_token)
                # Ready again, whoever held it (a poll worker's session is already gone).
                self.dispatcher.wake()
            self._ack_fenced(session, event.seq, lease.flow_id, lease.lease_token, outcome)

    async def _control(self, session: Session, event: HeartbeatIn | CapacityIn) -> None:
        if isinstance(event, CapacityIn):
            if event.capacity < 0:
                error = InvalidArgumentError("capacity must not be negative")
                self._refuse(session, [event.seq], error)
                return
            session.capacity = event.capacity
            self.dispatcher.wake()
        elif session.held:
            now = self.clock.now_ms()
            try:
                # Only what this worker runs: a flow leased to the session that it was never
                # told of (or dropped) must lapse and go to another, not live on.
                await self.store.renew_leases(
                    session.session_id, now + self.config.lease_ttl_ms, sorted(session.held)
                )
            except ErgonError as error:
                if isinstance(error, StoreUnavailableError):
                    self._note_store_failure()  # leases go unrenewed (`scan_expired_leases`)
                self._refuse(session, [event.seq], error)
                return
        if event.seq:
            session.send(AckOut(event.seq))


def _assignment(events: Sequence[ServerEventOut]) -> ClaimedFlow | None:
    flows = [e.flow for e in events if isinstance(e, AssignmentOut)]
    return flows[0] if flows else None
