"""The PostgreSQL store: an asyncpg pool, a group-commit lane per process, row locks between them.

Two kinds of concurrency meet here, and each is handled where it can be.

Calls of one store instance (one server process). The `Store` contract, as the conformance
suite checks it on every backend, is that concurrent calls apply as if made one by one in call
order. Calls on separate pool connections would commit in whatever order the database happens
to run them, so every write verb instead becomes a command on one in-process queue (the
*lane*), as in the SQLite store: one task takes everything queued, opens one transaction on
its connection, applies the commands in call order (merged into *stages* where that cannot
change an answer, see `_plan_stages`), sends one `pg_notify` batch, commits once and only then
resolves the callers' futures. On two cores the per-statement and per-commit costs are what
limits throughput, and a lane amortizes both: a batch of a few hundred commands costs one
commit, and a stage of many step records costs two statements. Reads bypass the lane and run
on the pool's other connections.

Processes sharing the database (replicas). Nothing coordinates them but the database, so:
- Every write to a flow's rows (its flows row, journal, waits, signals) holds that flow's row
  lock (`SELECT ... FOR UPDATE`). A batch of more than one command first locks every flow it
  names in one statement, sorted by flow_id, so two replicas' batches lock in the same order
  and do not deadlock; locks found later (the parents of an ending child, the flows of due
  timers) can still deadlock in rare cases, which PostgreSQL detects.
- Claims and lease expiry take their rows with `FOR UPDATE SKIP LOCKED` (ordered, limited):
  two replicas never claim the same flow and never wait for each other to claim. Timers lock
  their flows with SKIP LOCKED too; a timer of a flow another replica is writing at that
  moment fires on a later scan.
- A schedule reads which flows and request ids exist, decides as memory.py does, and inserts
  with `ON CONFLICT DO NOTHING`; if another replica inserted one of them meanwhile, the insert
  reports fewer rows and the whole transaction runs again (it then sees the other's rows and
  answers EXISTING or CONFLICT exactly as memory would).
- A serialization failure, a detected deadlock or such a schedule race rolls the batch back and
  runs it again, a few times with jittered backoff, before the callers get
  `StoreUnavailableError`.

Notifications. Each batch collects hints of what it changed (a flow became ready, a timer was
registered, a RUNNING flow's wait was satisfied or its cancel requested, a flow ended) and sends
them with `pg_notify` on one channel inside the transaction, so they are delivered only if it
commits. A payload is a compact JSON list of events (`_encode_events`), split below
PostgreSQL's 8000-byte limit. `subscribe` LISTENs on a dedicated connection that reconnects by
itself; events sent while it was away are lost (they are hints), so after a reconnect it
delivers READY and TIMER to make the engine look again.

Errors. asyncpg and OS errors never leave this module: a lost or refused connection, a server
shutting down or refusing connections, too many connections, a full disk, a closed pool become
`StoreUnavailableError`; anything else `StoreError`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeAlias, TypeVar

import asyncpg

from ergon_server.errors import (
    ErgonError,
    InvalidArgumentError,
    StoreError,
    StoreUnavailableError,
)
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
    StoreEventKind,
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
    check_limit,
    check_new_flow,
    check_park_delays,
    check_wait,
    child_entry,
    park_delay_ms,
)
from ergon_server.storage.migrate import (
    SCHEMA_VERSION_DDL,
    Migration,
    load_migrations,
    migrate,
)

__all__ = ["DEFAULT_CHANNEL", "PostgresStore"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Row = Any
if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A pool connection; generic only in the type stubs.
    _Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

# The LISTEN/NOTIFY channel replicas of one deployment share.
DEFAULT_CHANNEL = "ergon_events"

# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
_MAX_PAYLOAD = 7_900

# Taken by the migration runner so that replicas starting together migrate once (any constant
# unlikely to collide with an application's own advisory locks).
_MIGRATION_LOCK = 0x45_52_47_4F_4E_4D_49_47  # "ERGONMIG"

_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

# SQLSTATE prefixes meaning "the database cannot do this right now" rather than "this request
# or the schema is wrong": connection exceptions (08), transaction rollbacks that outlived the
# retries (40), insufficient resources such as a full disk or too many connections (53),
# operator intervention such as a shutdown or a server still starting (57), system errors such
# as I/O (58), a lock not available (55P03), a read-only server (25006) and an idle transaction
# ended by the server (25P03).
_UNAVAILABLE_STATES = ("08", "40", "53", "57", "58", "55P03", "25006", "25P03")
# Transaction outcomes that a fresh attempt of the same transaction may not meet again:
# serialization failure and deadlock detected.
_RETRY_STATES = ("40001", "40P01")
# asyncpg's InterfaceError texts that mean the pool or the connection is gone.
_GONE_MESSAGES = ("closed", "closing", "released", "not connected")


class _RetryTransaction(Exception):
    """Another replica changed what this transaction read; run it again."""


class _StaleConnection(Exception):
    """The held connection failed before the transaction began; nothing ran."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _RetryTransaction | _StaleConnection):
        return True
    return isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in _RETRY_STATES


def _translate(exc: BaseException) -> ErgonError:
    """Map a driver (or unexpected) exception to the store's error tree."""
    if isinstance(exc, ErgonError):
        return exc
    error: ErgonError
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        message = f"{type(exc).__name__}: {exc}"
        if state.startswith(_UNAVAILABLE_STATES):
            error = StoreUnavailableError(f"postgres store unavailable: {message}")
        else:
            error = StoreError(f"postgres store error: {message}")
    elif isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The protocol lost track of the connection's state; seen when the server ended an
        # idle connection (MagicStack/asyncpg#784). The connection is dropped; a new one may
        # well work.
        error = StoreUnavailableError(f"postgres store unavailable: {exc!r}")
    elif isinstance(exc, asyncpg.InterfaceError):
        text = str(exc).lower()
        if any(word in text for word in _GONE_MESSAGES):
            error = StoreUnavailableError(f"postgres store unavailable: {exc}")
        else:
            error = StoreError(f"postgres store error: {exc}")
    elif isinstance(exc, OSError | TimeoutError):
        # Refused, reset, unreachable, DNS failures and connect timeouts.
        error = StoreUnavailableError(f"postgres store unavailable: {exc!r}")
    elif isinstance(exc, _RetryTransaction):
        error = StoreUnavailableError(
            "postgres store unavailable: concurrent writers kept conflicting"
        )
    elif isinstance(exc, _StaleConnection):
        cause = exc.__cause__
        error = StoreUnavailableError(f"postgres store unavailable: {cause!r}")
    else:
        error = StoreError(f"postgres store failed unexpectedly: {exc!r}")
    error.__cause__ = exc
    return error


def _usable(conn: _Conn) -> bool:
    """Whether a held pool connection can still run statements."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        # The pool takes a connection back when it closes (the server ended it), and its
        # proxy then refuses every call.
        return False


def _fresh(error: ErgonError) -> ErgonError:
    """A copy of `error` so that many awaiting callers do not share one traceback."""
    copy = type(error)(error.message, error.reason)
    copy.__cause__ = error.__cause__
    return copy


# --- JSON codecs (the same documents as the SQLite store's) ------------------------------


def _failure_to_json(failure: Failure | None) -> str | None:
    if failure is None:
        return None
    return json.dumps(
        {
            "type": failure.type,
            "message": failure.message,
            "non_retryable": failure.non_retryable,
            "stack_trace": failure.stack_trace,
            "reason": failure.reason,
        },
        separators=(",", ":"),
    )


def _failure_from_json(text: str | None) -> Failure | None:
    if text is None:
        return None
    data = json.loads(text)
    return Failure(
        type=data["type"],
        message=data["message"],
        non_retryable=data.get("non_retryable", False),
        stack_trace=data.get("stack_trace", ""),
        reason=data.get("reason", ""),
    )


def _policy_to_json(policy: RetryPolicy | None) -> str | None:
    if policy is None:
        return None
    return json.dumps(
        {
            "max_attempts": policy.max_attempts,
            "initial_delay_ms": policy.initial_delay_ms,
            "max_delay_ms": policy.max_delay_ms,
            "backoff_multiplier": policy.backoff_multiplier,
            "non_retryable_error_types": list(policy.non_retryable_error_types),
        },
        separators=(",", ":"),
    )


def _policy_from_json(text: str | None) -> RetryPolicy | None:
    if text is None:
        return None
    data = json.loads(text)
    return RetryPolicy(
        max_attempts=data["max_attempts"],
        initial_delay_ms=data["initial_delay_ms"],
        max_delay_ms=data["max_delay_ms"],
        backoff_multiplier=data["backoff_multiplier"],
        non_retryable_error_types=tuple(data["non_retryable_error_types"]),
    )


# --- rows --------------------------------------------------------------------------------

_FLOW_COLUMNS = (
    "seq, flow_id, flow_type, status, input, result, error, attempt, labels, created_at, "
    "updated_at, ready_at, completed_at, retry_policy, lease_token, lease_owner, "
    "lease_expires_at, parent_flow_id, cancel_requested"
)

_JOURNAL_COLUMNS = "sequence, key, kind, status, result, error, attempts, args_hash, recorded_at"
_JOURNAL_ROW = ", ".join("j." + column.strip() for column in _JOURNAL_COLUMNS.split(","))


def _flow_from_row(row: _Row) -> FlowRecord:
    return FlowRecord(
        flow_id=row[1],
        flow_type=row[2],
        status=FlowStatus(row[3]),
        input=row[4],
        result=row[5],
        error=_failure_from_json(row[6]),
        attempt=row[7],
        labels=json.loads(row[8]),
        created_at=row[9],
        updated_at=row[10],
        ready_at=row[11],
        completed_at=row[12],
        retry_policy=_policy_from_json(row[13]),
        lease_token=row[14],
        lease_owner=row[15],
        lease_expires_at=row[16],
        parent_flow_id=row[17],
        cancel_requested=bool(row[18]),
    )


def _journal_from_row(row: _Row, offset: int = 0) -> JournalRecord:
    return JournalRecord(
        sequence=row[offset],
        key=row[offset + 1],
        kind=EntryKind(row[offset + 2]),
        status=EntryStatus(row[offset + 3]),
        result=row[offset + 4],
        error=_failure_from_json(row[offset + 5]),
        attempts=row[offset + 6],
        args_hash=row[offset + 7],
        recorded_at=row[offset + 8],
    )


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _row_count(status: str) -> int:
    """The row count of a command status such as "UPDATE 3"."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# --- notifications ---------------------------------------------------------------------------

_EVENT_CODES = {
    StoreEventKind.READY: "R",
    StoreEventKind.TIMER: "T",
    StoreEventKind.WAKEUP: "W",
    StoreEventKind.CANCEL_REQUESTED: "C",
    StoreEventKind.ENDED: "E",
}
_EVENT_KINDS = {code: kind for kind, code in _EVENT_CODES.items()}


def _encode_events(events: Iterable[StoreEvent], limit: int = _MAX_PAYLOAD) -> list[str]:
    """Pack events into as few NOTIFY payloads of at most `limit` bytes as fit.

    A payload is a JSON list of lists: ["R"], ["T"], ["W", flow_id, lease_token, key],
    ["C", flow_id, lease_token], ["E", flow_id]. ASCII-only JSON, so characters are bytes.
    An event too big for any payload (a huge flow_id) is dropped: events are hints.
    """
    payloads: list[str] = []
    parts: list[str] = []
    size = 2
    for event in events:
        code = _EVENT_CODES[event.kind]
        item: list[object] = [code]
        if event.kind is StoreEventKind.WAKEUP:
            item += [event.flow_id, event.lease_token, event.key]
        elif event.kind is StoreEventKind.CANCEL_REQUESTED:
            item += [event.flow_id, event.lease_token]
        elif event.kind is StoreEventKind.ENDED:
            item.append(event.flow_id)
        part = json.dumps(item, separators=(",", ":"), ensure_ascii=True)
        if len(part) + 2 > limit:
            _log.debug("dropping a store event too big to notify: %s...", part[:100])
            continue
        if parts and size + 1 + len(part) > limit:
            payloads.append("[" + ",".join(parts) + "]")
            parts, size = [], 2
        size += len(part) + (1 if parts else 0)
        parts.append(part)
    if parts:
        payloads.append("[" + ",".join(parts) + "]")
    return payloads


def _decode_events(payload: str) -> list[StoreEvent]:
    """The events of one payload; anything malformed (another writer's NOTIFY) is skipped."""
    try:
        items = json.loads(payload)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    events: list[StoreEvent] = []
    for item in items:
        if not isinstance(item, list) or not item or item[0] not in _EVENT_KINDS:
            continue
        kind = _EVENT_KINDS[item[0]]
        try:
            if kind is StoreEventKind.WAKEUP:
                flow_id, token, key = item[1:4]
                events.append(StoreEvent(kind, str(flow_id), int(token), str(key)))
            elif kind is StoreEventKind.CANCEL_REQUESTED:
                flow_id, token = item[1:3]
                events.append(StoreEvent(kind, str(flow_id), int(token)))
            elif kind is StoreEventKind.ENDED:
                events.append(StoreEvent(kind, str(item[1])))
            else:
                events.append(StoreEvent(kind))
        except (ValueError, TypeError, IndexError):
            continue
    return events


class _Events:
    """What one transaction changed that other replicas should hear about (coalesced)."""

    __slots__ = ("items", "ready", "timer")

    def __init__(self) -> None:
        self.ready = False
        self.timer = False
        # Ordered and deduplicated: PostgreSQL also folds identical payloads of one transaction.
        self.items: dict[StoreEvent, None] = {}

    def wakeup(self, flow_id: str, lease_token: int, key: str) -> None:
        self.items[StoreEvent(StoreEventKind.WAKEUP, flow_id, lease_token, key)] = None

    def cancel_requested(self, flow_id: str, lease_token: int) -> None:
        self.items[StoreEvent(StoreEventKind.CANCEL_REQUESTED, flow_id, lease_token)] = None

    def ended(self, flow_id: str) -> None:
        self.items[StoreEvent(StoreEventKind.ENDED, flow_id)] = None

    def events(self) -> list[StoreEvent]:
        events: list[StoreEvent] = []
        if self.ready:
            events.append(StoreEvent(StoreEventKind.READY))
        if self.timer:
            events.append(StoreEvent(StoreEventKind.TIMER))
        return events + list(self.items)


class _Tx:
    """One transaction of the lane: its connection, the flows it has locked, its events."""

    __slots__ = ("conn", "events", "locked")

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.events = _Events()
        # Flows whose row this transaction holds FOR UPDATE (or inserted itself).
        self.locked: set[str] = set()

    async def lock(self, flow_ids: Iterable[str], *, skip_locked: bool = False) -> None:
        """Lock the named flows that exist, in flow_id order (the order every writer uses).

        With `skip_locked`, flows another transaction holds are left out (not waited for).
        """
        missing = sorted(set(flow_ids) - self.locked)
        if not missing:
            return
        skip = " SKIP LOCKED" if skip_locked else ""
        rows = await self.conn.fetch(
            "SELECT flow_id FROM flows WHERE flow_id = ANY($1::text[]) "
            f"ORDER BY flow_id FOR UPDATE{skip}",
            missing,
        )
        self.locked.update(row[0] for row in rows)

    async def notify(self, channel: str) -> None:
        """Queue this transaction's events; PostgreSQL delivers them at commit."""
        payloads = _encode_events(self.events.events())
        if payloads:
            await self.conn.execute(
                "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
                channel,
                payloads,
            )


async def _fence(tx: _Tx, flow_ids: Iterable[str]) -> dict[str, list[Any]]:
    """Lock the named flows and read their current [status, lease_token]."""
    ids = sorted(set(flow_ids))
    if not ids:
        return {}
    # Only flows columns are read, so the values are current even after a lock wait.
    rows = await tx.conn.fetch(
        "SELECT flow_id, status, lease_token FROM flows WHERE flow_id = ANY($1::text[]) "
        "ORDER BY flow_id FOR UPDATE",
        ids,
    )
    tx.locked.update(row[0] for row in rows)
    return {row[0]: [row[1], row[2]] for row in rows}


# --- waits: a stage's view of the flows and waits it touches ------------------------------

_OPEN = "OPEN"
_SATISFIED = "SATISFIED"
_CANCELLED = "CANCELLED"

# Everything a stage needs to decide a flow's next state, in one read. It reads other tables
# (waits, journal), so it runs only once the flows are locked: a statement's snapshot is
# taken when it starts, and one that waited for a lock would see those tables as they were.
_STATE_SQL = (
    "SELECT f.flow_id, f.status, f.lease_token, f.lease_owner, f.journal_seq, f.parks, "
    "f.attempt, f.cancel_requested, "
    "EXISTS (SELECT 1 FROM waits AS w WHERE w.flow_id = f.flow_id AND w.status = 'OPEN'), "
    "EXISTS (SELECT 1 FROM waits AS w WHERE w.child_flow_id = f.flow_id "
    "AND w.kind = 'CHILD' AND w.status <> 'SATISFIED'), "
    "CASE WHEN f.cancel_requested THEN (SELECT j.error FROM journal AS j "
    "WHERE j.flow_id = f.flow_id AND j.key = $2) END "
    "FROM flows AS f WHERE f.flow_id = ANY($1::text[])"
)

# A wait row, and whether its key has a journal entry already.
_WAIT_COLUMNS = (
    "w.flow_id, w.key, w.kind, w.status, w.fire_at, w.signal_name, w.child_flow_id, "
    "w.created_at, EXISTS (SELECT 1 FROM journal AS j WHERE j.flow_id = w.flow_id "
    "AND j.key = w.key)"
)

_INSERT_ENTRY = (
    "INSERT INTO journal (flow_id, key, sequence, kind, status, result, error, attempts, "
    "args_hash, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)

# Inserts a new wait, or sets the status of an existing one (its other fields are kept from
# the first registration).
_UPSERT_WAIT = (
    "INSERT INTO waits (flow_id, key, kind, status, fire_at, signal_name, child_flow_id, "
    "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
    "ON CONFLICT (flow_id, key) DO UPDATE SET status = excluded.status"
)

# Rows of a table joined to a list of (flow_id, key) pairs, one index probe per pair.
_PAIRS = "unnest($1::text[], $2::text[]) AS p(flow_id, key)"


def _pair_params(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [pair[0] for pair in pairs], [pair[1] for pair in pairs]


class _FlowState:
    """A flow as a stage simulates it (see `_STATE_SQL`)."""

    __slots__ = (
        "attempt",
        "cancel_error",
        "cancel_requested",
        "journal_seq",
        "lease_owner",
        "lease_token",
        "open_waits",
        "parks",
        "status",
        "waited_on",
    )

    def __init__(self, row: _Row) -> None:
        self.status: str = row[1]
        self.lease_token: int = row[2]
        self.lease_owner: str | None = row[3]
        self.journal_seq: int = row[4]
        self.parks: int = row[5]
        self.attempt: int = row[6]
        self.cancel_requested: bool = row[7]
        # Whether the flow may have OPEN waits (to cancel when it ends).
        self.open_waits: bool = row[8]
        # Whether a wait not yet satisfied names the flow as its child.
        self.waited_on: bool = row[9]
        self.cancel_error: str | None = row[10]

    def holds(self, lease_token: int) -> bool:
        return self.status == "RUNNING" and self.lease_token == lease_token

    def cancellation(self) -> Failure:
        """The error of a flow ended by its cancel request: its CANCEL entry's."""
        return _failure_from_json(self.cancel_error) or cancellation_failure("")


class _WaitRow:
    """A wait as a stage simulates it."""

    __slots__ = (
        "child_flow_id",
        "created_at",
        "fire_at",
        "has_entry",
        "kind",
        "signal_name",
        "status",
    )

    def __init__(
        self,
        kind: EntryKind,
        status: str,
        fire_at: int | None,
        signal_name: str | None,
        child_flow_id: str | None,
        created_at: int,
        has_entry: bool,
    ) -> None:
        self.kind = kind
        self.status = status
        self.fire_at = fire_at
        self.signal_name = signal_name
        self.child_flow_id = child_flow_id
        self.created_at = created_at
        # Whether the key had a journal entry when the row was read.
        self.has_entry = has_entry


class _Sim:
    """What one stage reads and writes about flows, journal entries and waits.

    A stage locks and reads each flow's state once (`load`), applies its commands in order to
    these simulated states, and `flush` writes the net effect with one `executemany` per
    statement shape. Reads of waits go through `waits`, where the stage's own changes win over
    the database. Signal rows and new flows are written at once instead (their reads are
    direct). It also records the stage's notifications in the transaction's events.
    """

    def __init__(self, tx: _Tx) -> None:
        self.tx = tx
        self.conn = tx.conn
        self.states: dict[str, _FlowState | None] = {}
        # Pending column values per flow: applying them in any order gives the same rows,
        # because each is a plain value, the last one set winning.
        self.updates: dict[str, dict[str, object]] = {}
        # Pending journal entries, in sequence order per flow.
        self.records: dict[tuple[str, str], JournalRecord] = {}
        # Retried flows: (flow_id, last sequence then) to drop FAILED entries up to.
        self.trims: list[tuple[str, int]] = []
        self.waits: dict[tuple[str, str], _WaitRow] = {}
        self.dirty: dict[tuple[str, str], None] = {}
        # Flows that ended: their OPEN waits are cancelled at flush.
        self.ended: list[str] = []
        # Child flow_id -> the (flow_id, key) of the waits that name it, sorted.
        self.links: dict[str, list[tuple[str, str]]] = {}

    async def load(self, flow_ids: Iterable[str]) -> None:
        """Lock and read the state of the flows not read yet (None for a missing flow)."""
        missing = [flow_id for flow_id in _unique(flow_ids) if flow_id not in self.states]
        if not missing:
            return
        await self.tx.lock(missing)
        for flow_id in missing:
            self.states[flow_id] = None
        rows = await self.conn.fetch(_STATE_SQL, missing, CANCEL_KEY)
        late = [row[0] for row in rows if row[0] not in self.tx.locked]
        if late:
            # Created by another replica between the lock and the read: lock, read again.
            await self.tx.lock(late)
            rows = [row for row in rows if row[0] not in late]
            rows += await self.conn.fetch(_STATE_SQL, late, CANCEL_KEY)
        for row in rows:
            self.states[row[0]] = _FlowState(row)

    def forget(self, flow_ids: Iterable[str]) -> None:
        """Drop cached absences of flows that a command has just created."""
        for flow_id in flow_ids:
            if flow_id in self.states and self.states[flow_id] is None:
                del self.states[flow_id]

    def state(self, flow_id: str) -> _FlowState:
        state = self.states.get(flow_id)
        if state is None:
            raise StoreError(f"flow {flow_id!r} was not loaded")
        return state

    def update(self, flow_id: str, **columns: object) -> None:
        self.updates.setdefault(flow_id, {}).update(columns)

    def entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """An entry this stage recorded."""
        return self.records.get((flow_id, key))

    def add_entry(
        self,
        flow_id: str,
        key: str,
        kind: EntryKind,
        status: EntryStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> JournalRecord:
        """A wait's or cancellation's entry: one attempt, no args hash, the next sequence."""
        state = self.state(flow_id)
        state.journal_seq += 1
        record = JournalRecord(state.journal_seq, key, kind, status, result, error, 1, "", now_ms)
        self.records[(flow_id, key)] = record
        return record

    def cache_wait(self, row: _Row) -> _WaitRow:
        """The stage's view of a wait read from the database (its own changes win)."""
        pair = (row[0], row[1])
        wait = self.waits.get(pair)
        if wait is None:
            wait = _WaitRow(EntryKind(row[2]), row[3], row[4], row[5], row[6], row[7], row[8])
            self.waits[pair] = wait
        return wait

    def put_wait(self, flow_id: str, key: str, wait: _WaitRow) -> None:
        self.waits[(flow_id, key)] = wait
        self.dirty[(flow_id, key)] = None
        if wait.status == _OPEN:
            state = self.states.get(flow_id)
            if state is not None:
                state.open_waits = True

    def set_wait(self, flow_id: str, key: str, wait: _WaitRow, status: str) -> None:
        wait.status = status
        self.put_wait(flow_id, key, wait)

    async def load_waits(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Read these waits into `waits` (absent ones stay absent); their flows are locked."""
        wanted = [pair for pair in dict.fromkeys(pairs) if pair not in self.waits]
        if not wanted:
            return
        rows = await self.conn.fetch(
            f"SELECT {_WAIT_COLUMNS} FROM {_PAIRS} JOIN waits AS w "
            "ON w.flow_id = p.flow_id AND w.key = p.key",
            *_pair_params(wanted),
        )
        for row in rows:
            self.cache_wait(row)

    async def load_links(self, child_ids: Iterable[str]) -> None:
        """Read the waits naming these flows as children, and lock and read their flows."""
        missing = [child for child in _unique(child_ids) if child not in self.links]
        if not missing:
            return
        for child in missing:
            self.links[child] = []
        links = await self.conn.fetch(
            "SELECT child_flow_id, flow_id, key FROM waits WHERE kind = 'CHILD' "
            "AND status <> 'SATISFIED' AND child_flow_id = ANY($1::text[])",
            missing,
        )
        if not links:
            return
        # The waits belong to the parents: read them only once their flows are locked.
        await self.load(row[1] for row in links)
        await self.load_waits([(row[1], row[2]) for row in links])
        for child, flow_id, key in links:
            wait = self.waits.get((flow_id, key))
            if wait is not None and wait.status != _SATISFIED:
                self.links[child].append((flow_id, key))
        for child in missing:
            self.links[child].sort()

    def satisfy(
        self,
        flow_id: str,
        key: str,
        wait: _WaitRow,
        status: EntryStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
        *,
        wake: bool = True,
    ) -> Satisfied | None:
        """Satisfy a wait (once): record its entry and wake its flow if it waited for it.

        Returns what to report: None when the wait was not OPEN (a CANCELLED wait gets its
        entry and leaves the flow alone) or when its key already had an entry. `wake=False`
        when the caller holding the lease gets the entry in its answer (no WAKEUP event).
        """
        was_open = wait.status == _OPEN
        self.set_wait(flow_id, key, wait, _SATISFIED)
        if wait.has_entry or (flow_id, key) in self.records:
            return None
        record = self.add_entry(flow_id, key, wait.kind, status, result, error, now_ms)
        if not was_open:
            return None
        state = self.state(flow_id)
        if state.status == "WAITING":
            state.status = "PENDING"
            state.lease_owner = None
            self.update(
                flow_id,
                status="PENDING",
                ready_at=now_ms,
                updated_at=now_ms,
                lease_owner=None,
                lease_expires_at=None,
            )
            self.tx.events.ready = True
        elif state.status == "RUNNING" and wake:
            self.tx.events.wakeup(flow_id, state.lease_token, key)
        return Satisfied(
            flow_id, record, FlowStatus(state.status), state.lease_token, state.lease_owner
        )

    def end_now(
        self,
        flow_id: str,
        status: FlowStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> bool:
        """End a flow and cancel its open waits; True if waits may name it as a child.

        Then `satisfy_parents` must follow (see `end`); most flows are nobody's child, so the
        common path stays synchronous.
        """
        state = self.state(flow_id)
        state.status = status.value
        state.lease_owner = None
        if status is FlowStatus.COMPLETED:
            state.parks = 0
        self.update(
            flow_id,
            status=status.value,
            result=result,
            error=_failure_to_json(error),
            completed_at=now_ms,
            updated_at=now_ms,
            lease_owner=None,
            lease_expires_at=None,
            parks=state.parks,
        )
        self.tx.events.ended(flow_id)
        if state.open_waits:
            state.open_waits = False
            self.ended.append(flow_id)
            for (owner, _), wait in self.waits.items():
                if owner == flow_id and wait.status == _OPEN:
                    wait.status = _CANCELLED
        return state.waited_on

    async def satisfy_parents(
        self,
        flow_id: str,
        status: FlowStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> list[Satisfied]:
        """Satisfy the waits naming an ended flow as their child (`end_now` first)."""
        await self.load_links([flow_id])
        entry = child_entry(status, result, error)
        satisfied: list[Satisfied] = []
        for parent_id, key in self.links[flow_id]:
            wait = self.waits[(parent_id, key)]
            parent = self.states.get(parent_id)
            if wait.status == _SATISFIED or parent is None or parent.status in _TERMINAL:
                continue
            done = self.satisfy(parent_id, key, wait, *entry, now_ms)
            if done is not None:
                satisfied.append(done)
        return satisfied

    async def end(
        self,
        flow_id: str,
        status: FlowStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> list[Satisfied]:
        """End a flow: cancel its open waits and satisfy the waits for it as a child."""
        if not self.end_now(flow_id, status, result, error, now_ms):
            return []
        return await self.satisfy_parents(flow_id, status, result, error, now_ms)

    async def flush(self) -> None:
        """Write the stage's net effect."""
        conn = self.conn
        groups: dict[tuple[str, ...], list[tuple[object, ...]]] = {}
        for flow_id, columns in self.updates.items():
            # Same code path, same column order: one statement per path.
            groups.setdefault(tuple(columns), []).append((*columns.values(), flow_id))
        for names, rows in groups.items():
            assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(names, 1))
            await conn.executemany(
                f"UPDATE flows SET {assignments} WHERE flow_id = ${len(names) + 1}", rows
            )
        if self.records:
            await conn.executemany(
                _INSERT_ENTRY,
                [
                    (
                        flow_id,
                        record.key,
                        record.sequence,
                        record.kind.value,
                        record.status.value,
                        record.result,
                        _failure_to_json(record.error),
                        record.attempts,
                        record.args_hash,
                        record.recorded_at,
                    )
                    for (flow_id, _), record in self.records.items()
                ],
            )
        if self.trims:
            # Entries recorded after the retry (higher sequences) are kept.
            await conn.executemany(
                "DELETE FROM journal WHERE flow_id = $1 AND status = 'FAILED' AND sequence <= $2",
                self.trims,
            )
        if self.dirty:
            rows = []
            for flow_id, key in self.dirty:
                wait = self.waits[(flow_id, key)]
                rows.append(
                    (
                        flow_id,
                        key,
                        wait.kind.value,
                        wait.status,
                        wait.fire_at,
                        wait.signal_name,
                        wait.child_flow_id,
                        wait.created_at,
                    )
                )
            await conn.executemany(_UPSERT_WAIT, rows)
        if self.ended:
            await conn.execute(
                "UPDATE waits SET status = 'CANCELLED' "
                "WHERE flow_id = ANY($1::text[]) AND status = 'OPEN'",
                self.ended,
            )


async def _consume_signal(tx: _Tx, flow_id: str, name: str, key: str, now_ms: int) -> bytes | None:
    """Consume the oldest unconsumed signal of the mailbox into `key`; its payload or None."""
    rows = await tx.conn.fetch(
        "UPDATE signals SET consumed_at = $1, consumed_key = $2 "
        "WHERE flow_id = $3 AND name = $4 AND sequence = (SELECT sequence FROM signals "
        "WHERE flow_id = $3 AND name = $4 AND consumed_at IS NULL ORDER BY sequence LIMIT 1) "
        "RETURNING payload",
        now_ms,
        key,
        flow_id,
        name,
    )
    return rows[0][0] if rows else None


async def _journal_entries(
    tx: _Tx, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], JournalRecord]:
    """The stored journal entries under these (flow_id, key) pairs."""
    wanted = list(dict.fromkeys(pairs))
    if not wanted:
        return {}
    rows = await tx.conn.fetch(
        f"SELECT j.flow_id, {_JOURNAL_ROW} FROM {_PAIRS} JOIN journal AS j "
        "ON j.flow_id = p.flow_id AND j.key = p.key",
        *_pair_params(wanted),
    )
    return {(row[0], row[2]): _journal_from_row(row, 1) for row in rows}


# --- write commands ----------------------------------------------------------------------


class _Command(Generic[_T]):
    """One write verb waiting in the lane.

    `apply_all` applies a stage: a list of commands of the same class, in queue order, inside
    the batch's transaction; it stores each command's answer in `result`, which reaches the
    caller only after the commit. A batch that is rolled back and run again applies its
    commands again from scratch, so a command keeps no state but its inputs and `result`.
    """

    __slots__ = ("future", "result")

    # Whether commands of this class may share a stage (be applied together).
    mergeable: ClassVar[bool] = False
    # Whether the command's footprint is unknown, so no other command may cross it.
    barrier: ClassVar[bool] = False

    def __init__(self, future: asyncio.Future[_T]) -> None:
        self.future = future
        self.result: _T

    def resources(self) -> Iterable[str]:
        """Names of what this command reads or writes, to order it against others."""
        return ()

    def ending_flows(self) -> Iterable[str]:
        """Flows this command may end: it also writes the flows that wait for them as children."""
        return ()

    def child_links(self) -> Iterable[tuple[str, str]]:
        """(child flow_id, waiting flow_id) of the CHILD waits this command may create."""
        return ()

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Apply a stage of commands of this class in order."""
        raise NotImplementedError

    def resolve(self) -> None:
        """Hand the committed result to the caller."""
        if self.future.done():
            return
        try:
            result = self.result
        except AttributeError:
            self.future.set_exception(StoreError(f"{type(self).__name__} produced no result"))
        else:
            self.future.set_result(result)

    def fail(self, error: ErgonError) -> None:
        """Hand an error to the caller."""
        if not self.future.done():
            self.future.set_exception(_fresh(error))


_FLOW = "flow:"


def _flow_resources(flow_ids: Iterable[str]) -> list[str]:
    return [_FLOW + flow_id for flow_id in flow_ids]


_INSERT_FLOWS = (
    "INSERT INTO flows (flow_id, flow_type, status, input, attempt, labels, retry_policy, "
    "created_at, updated_at, ready_at, parent_flow_id, parent_key) "
    "SELECT t.flow_id, t.flow_type, 'PENDING', t.input, 1, t.labels, t.retry_policy, t.now, "
    "t.now, t.ready_at, t.parent_flow_id, t.parent_key "
    "FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::bigint[], "
    "$7::bigint[], $8::text[], $9::text[]) "
    "AS t(flow_id, flow_type, input, labels, retry_policy, now, ready_at, parent_flow_id, "
    "parent_key) "
    "ON CONFLICT (flow_id) DO NOTHING RETURNING flow_id"
)


async def _schedule(tx: _Tx, items: Sequence[tuple[NewFlow, int]]) -> list[ScheduleResult]:
    """Schedule flows in order, simulating the rows they create so duplicates see each other.

    The reads take no lock: rows that exist never change what a schedule compares (type,
    input, a request's flow). A row another replica inserts after them makes an insert below
    skip it, and the transaction runs again (`_RetryTransaction`).
    """
    conn = tx.conn
    existing: dict[str, tuple[str, bytes]] = {
        row[0]: (row[1], row[2])
        for row in await conn.fetch(
            "SELECT flow_id, flow_type, input FROM flows WHERE flow_id = ANY($1::text[])",
            _unique(flow.flow_id for flow, _ in items),
        )
    }
    request_ids = _unique(flow.request_id for flow, _ in items if flow.request_id)
    requests: dict[str, str] = {}
    if request_ids:
        requests = {
            row[0]: row[1]
            for row in await conn.fetch(
                "SELECT request_id, flow_id FROM request_ids WHERE request_id = ANY($1::text[])",
                request_ids,
            )
        }
    new_flows: list[tuple[Any, ...]] = []
    new_requests: list[tuple[str, str]] = []
    results: list[ScheduleResult] = []
    for flow, now_ms in items:
        if flow.request_id and flow.request_id in requests:
            results.append(ScheduleResult(requests[flow.request_id], ScheduleOutcome.EXISTING))
            continue
        known = existing.get(flow.flow_id)
        if known is None:
            outcome = ScheduleOutcome.CREATED
            existing[flow.flow_id] = (flow.flow_type, flow.input)
            ready_at = flow.start_at if flow.start_at is not None else now_ms
            new_flows.append(
                (
                    flow.flow_id,
                    flow.flow_type,
                    flow.input,
                    json.dumps(flow.labels, separators=(",", ":")),
                    _policy_to_json(flow.retry_policy),
                    now_ms,
                    ready_at,
                    flow.parent_flow_id or None,
                    flow.parent_key or None,
                )
            )
        elif known == (flow.flow_type, flow.input):
            outcome = ScheduleOutcome.EXISTING
        else:
            results.append(ScheduleResult(flow.flow_id, ScheduleOutcome.CONFLICT))
            continue
        if flow.request_id:
            requests[flow.request_id] = flow.flow_id
            new_requests.append((flow.request_id, flow.flow_id))
        results.append(ScheduleResult(flow.flow_id, outcome))
    if new_flows:
        # One array per column; unnest keeps their order, so seq follows scheduling order.
        columns = [list(column) for column in zip(*new_flows, strict=True)]
        inserted = await conn.fetch(_INSERT_FLOWS, *columns)
        if len(inserted) != len(new_flows):
            raise _RetryTransaction("a flow_id was scheduled concurrently")
        tx.locked.update(row[0] for row in inserted)
        tx.events.ready = True
    if new_requests:
        # In request_id order, as another replica inserting some of the same ids does, so
        # the two wait for each other instead of deadlocking.
        new_requests.sort()
        inserted = await conn.fetch(
            "INSERT INTO request_ids (request_id, flow_id) "
            "SELECT * FROM unnest($1::text[], $2::text[]) "
            "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            [pair[0] for pair in new_requests],
            [pair[1] for pair in new_requests],
        )
        if len(inserted) != len(new_requests):
            raise _RetryTransaction("a request_id was used concurrently")
    return results


async def _send_signal(
    tx: _Tx,
    sim: _Sim,
    flow_id: str,
    name: str,
    payload: bytes,
    request_id: str,
    now_ms: int,
) -> SignalResult:
    """Append a signal; if the flow has an open wait for its name, satisfy the oldest one."""
    conn = tx.conn
    await tx.lock([flow_id])
    rows = await conn.fetch(
        "SELECT status, (SELECT sequence FROM signals AS s "
        "WHERE s.flow_id = f.flow_id AND s.request_id = $1 AND s.request_id <> '') "
        "FROM flows AS f WHERE f.flow_id = $2",
        request_id,
        flow_id,
    )
    if not rows:
        return SignalResult(SignalOutcome.NOT_FOUND)
    status, seen = rows[0]
    if seen is not None:
        return SignalResult(SignalOutcome.DELIVERED, seen)
    if status in _TERMINAL:
        return SignalResult(SignalOutcome.CLOSED)
    sequence: int = await conn.fetchval(
        "INSERT INTO signals (flow_id, name, sequence, payload, request_id, created_at) "
        "VALUES ($1, $2, (SELECT COALESCE(MAX(sequence), 0) + 1 FROM signals "
        "WHERE flow_id = $1 AND name = $2), $3, $4, $5) RETURNING sequence",
        flow_id,
        name,
        payload,
        request_id,
        now_ms,
    )
    waits = await conn.fetch(
        f"SELECT {_WAIT_COLUMNS} FROM waits AS w WHERE w.flow_id = $1 AND w.signal_name = $2 "
        "AND w.status = 'OPEN' AND w.kind = 'SIGNAL' ORDER BY w.created_at, w.key",
        flow_id,
        name,
    )
    if waits:
        await sim.load([flow_id])
    for row in waits:
        wait = sim.cache_wait(row)
        key = row[1]
        if wait.status != _OPEN:
            continue
        if wait.has_entry or sim.entry(flow_id, key) is not None:
            sim.set_wait(flow_id, key, wait, _SATISFIED)
            continue
        consumed = await _consume_signal(tx, flow_id, name, key, now_ms)
        if consumed is None:
            break
        done = sim.satisfy(flow_id, key, wait, EntryStatus.COMPLETED, consumed, None, now_ms)
        return SignalResult(SignalOutcome.DELIVERED, sequence, done)
    return SignalResult(SignalOutcome.DELIVERED, sequence)


class _ScheduleFlows(_Command[list[ScheduleResult]]):
    __slots__ = ("flows", "now_ms")
    mergeable = True

    def __init__(
        self,
        future: asyncio.Future[list[ScheduleResult]],
        flows: Sequence[NewFlow],
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.flows = flows
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        # All schedules stay in queue order among themselves, so `seq` (scheduling order)
        # follows the queue; request ids are then ordered too.
        return ["schedule-order", *_flow_resources(flow.flow_id for flow in self.flows)]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Schedule every command's flows with one round of reads and inserts."""
        items = [(flow, command.now_ms) for command in commands for flow in command.flows]
        results = await _schedule(tx, items)
        start = 0
        for command in commands:
            command.result = results[start : start + len(command.flows)]
            start += len(command.flows)


_UPSERT_STEP = (
    "INSERT INTO journal (flow_id, key, sequence, kind, status, result, error, attempts, "
    "args_hash, recorded_at) "
    "VALUES ($1, $2, (SELECT journal_seq + 1 FROM flows WHERE flow_id = $1), $3, $4, $5, $6, "
    "$7, $8, $9) "
    "ON CONFLICT (flow_id, key) DO UPDATE SET status = excluded.status, "
    "result = excluded.result, error = excluded.error, attempts = excluded.attempts, "
    "args_hash = excluded.args_hash, recorded_at = excluded.recorded_at "
    "WHERE journal.status = 'RETRYING'"
)


class _RecordSteps(_Command[list[WriteOutcome]]):
    __slots__ = ("now_ms", "records")
    mergeable = True

    def __init__(
        self,
        future: asyncio.Future[list[WriteOutcome]],
        records: Sequence[StepRecord],
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.records = records
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(record.flow_id for record in self.records)

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Fence every record with one locking SELECT, then upsert the accepted ones at once.

        Step records never change a flow's status or token, so one snapshot fences the whole
        stage. `executemany` runs the upsert once per row, in order, in one round trip: the
        upsert leaves final entries alone and the insert trigger hands out sequences, so
        repeated keys in the stage behave as if applied one by one.
        """
        states = await _fence(
            tx, (record.flow_id for command in commands for record in command.records)
        )
        rows: list[tuple[object, ...]] = []
        for command in commands:
            outcomes: list[WriteOutcome] = []
            for record in command.records:
                state = states.get(record.flow_id)
                if state is None:
                    outcomes.append(WriteOutcome.NOT_FOUND)
                elif state[0] != "RUNNING" or state[1] != record.lease_token:
                    outcomes.append(WriteOutcome.LEASE_LOST)
                else:
                    outcomes.append(WriteOutcome.OK)
                    rows.append(
                        (
                            record.flow_id,
                            record.key,
                            record.kind.value,
                            record.status.value,
                            record.result,
                            _failure_to_json(record.error),
                            record.attempts,
                            record.args_hash,
                            command.now_ms,
                        )
                    )
            command.result = outcomes
        if rows:
            await tx.conn.executemany(_UPSERT_STEP, rows)


class _FinishFlows(_Command[tuple[list[WriteOutcome], list[Satisfied]]]):
    __slots__ = ("finishes", "now_ms")
    mergeable = True

    def __init__(
        self,
        future: asyncio.Future[tuple[list[WriteOutcome], list[Satisfied]]],
        finishes: Sequence[FlowFinish],
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.finishes = finishes
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(finish.flow_id for finish in self.finishes)

    def ending_flows(self) -> Iterable[str]:
        return [finish.flow_id for finish in self.finishes]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Read the flows once, simulate the transitions in order, write them at once.

        Only flows that some wait names as a child cost more: one read of those waits and
        of their flows' states for the whole stage.
        """
        sim = _Sim(tx)
        await sim.load(finish.flow_id for command in commands for finish in command.finishes)
        await sim.load_links(
            flow_id
            for flow_id, state in sim.states.items()
            if state is not None and state.waited_on
        )
        for command in commands:
            now_ms = command.now_ms
            outcomes: list[WriteOutcome] = []
            satisfied: list[Satisfied] = []
            for finish in command.finishes:
                state = sim.states.get(finish.flow_id)
                if state is None:
                    outcomes.append(WriteOutcome.NOT_FOUND)
                elif state.lease_token != finish.lease_token:
                    outcomes.append(WriteOutcome.LEASE_LOST)
                elif state.status == "RUNNING":
                    outcomes.append(WriteOutcome.OK)
                    if state.cancel_requested:
                        satisfied += await sim.end(
                            finish.flow_id, FlowStatus.CANCELLED, None, state.cancellation(), now_ms
                        )
                    elif finish.status is FlowStatus.FAILED and finish.retry_delay_ms > 0:
                        state.status = "PENDING"
                        state.lease_owner = None
                        state.attempt += 1
                        sim.update(
                            finish.flow_id,
                            status="PENDING",
                            result=None,
                            error=_failure_to_json(finish.error),
                            attempt=state.attempt,
                            ready_at=now_ms + finish.retry_delay_ms,
                            updated_at=now_ms,
                            lease_owner=None,
                            lease_expires_at=None,
                        )
                        sim.trims.append((finish.flow_id, state.journal_seq))
                        tx.events.ready = True
                    else:
                        completed = finish.status is FlowStatus.COMPLETED
                        result = finish.result if completed else None
                        error = None if completed else finish.error
                        if sim.end_now(finish.flow_id, finish.status, result, error, now_ms):
                            satisfied += await sim.satisfy_parents(
                                finish.flow_id, finish.status, result, error, now_ms
                            )
                elif state.status == finish.status.value or (
                    state.status == "CANCELLED" and state.cancel_requested
                ):
                    outcomes.append(WriteOutcome.OK)
                else:
                    outcomes.append(WriteOutcome.LEASE_LOST)
            command.result = (outcomes, satisfied)
        await sim.flush()


class _ReleaseFlows(_Command[list[WriteOutcome]]):
    __slots__ = ("leases", "now_ms")
    mergeable = True

    def __init__(
        self, future: asyncio.Future[list[WriteOutcome]], leases: Sequence[Lease], now_ms: int
    ) -> None:
        super().__init__(future)
        self.leases = leases
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(lease.flow_id for lease in self.leases)

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Fence with one locking SELECT, then re-queue every accepted flow at once."""
        states = await _fence(
            tx, (lease.flow_id for command in commands for lease in command.leases)
        )
        rows: list[tuple[object, ...]] = []
        for command in commands:
            outcomes: list[WriteOutcome] = []
            for lease in command.leases:
                state = states.get(lease.flow_id)
                if state is None:
                    outcomes.append(WriteOutcome.NOT_FOUND)
                elif state[0] != "RUNNING" or state[1] != lease.lease_token:
                    outcomes.append(WriteOutcome.LEASE_LOST)
                else:
                    outcomes.append(WriteOutcome.OK)
                    state[0] = "PENDING"
                    rows.append((command.now_ms, lease.flow_id))
            command.result = outcomes
        if rows:
            await tx.conn.executemany(
                "UPDATE flows SET status = 'PENDING', ready_at = $1, updated_at = $1, "
                "lease_owner = NULL, lease_expires_at = NULL WHERE flow_id = $2",
                rows,
            )
            tx.events.ready = True


# One type: an ordered probe of the partial index, locking as it goes and skipping rows other
# transactions hold. Several: the same probe per type (an array comparison would read and sort
# every pending row of those types), merged; each probe may lock up to `limit` rows, which the
# merge does not all keep (they stay locked until commit, and other claimers skip them).
_CLAIM_ONE_TYPE = (
    "SELECT seq FROM flows WHERE status = 'PENDING' AND flow_type = $4 AND ready_at <= $3 "
    "ORDER BY ready_at, seq LIMIT $5 FOR UPDATE SKIP LOCKED"
)
_CLAIM_TYPES = (
    "SELECT c.seq FROM unnest($4::text[]) AS t(flow_type) CROSS JOIN LATERAL ("
    "SELECT seq, ready_at FROM flows WHERE status = 'PENDING' AND flow_type = t.flow_type "
    "AND ready_at <= $3 ORDER BY ready_at, seq LIMIT $5 FOR UPDATE SKIP LOCKED) AS c "
    "ORDER BY c.ready_at, c.seq LIMIT $5"
)
# A locking CTE runs once, whatever plan the UPDATE gets.
_CLAIM = (
    "WITH picked AS ({candidates}) "
    "UPDATE flows AS f SET status = 'RUNNING', lease_token = f.lease_token + 1, "
    "lease_owner = $1, lease_expires_at = $2, updated_at = $3 FROM picked "
    "WHERE f.seq = picked.seq RETURNING f.ready_at, f.seq, f.flow_id, f.flow_type, f.input, "
    "f.lease_token, f.attempt, f.retry_policy, f.journal_seq"
)


class _ClaimFlows(_Command[list[ClaimedFlow]]):
    __slots__ = ("flow_types", "lease_expires_at", "limit", "now_ms", "session_id")
    barrier = True

    def __init__(
        self,
        future: asyncio.Future[list[ClaimedFlow]],
        session_id: str,
        flow_types: list[str],
        limit: int,
        lease_expires_at: int,
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.session_id = session_id
        self.flow_types = flow_types
        self.limit = limit
        self.lease_expires_at = lease_expires_at
        self.now_ms = now_ms

    def statement(self) -> tuple[str, list[object]]:
        """The claiming UPDATE and its parameters."""
        params: list[object] = [self.session_id, self.lease_expires_at, self.now_ms]
        if len(self.flow_types) == 1:
            sql = _CLAIM.format(candidates=_CLAIM_ONE_TYPE)
            params.append(self.flow_types[0])
        else:
            sql = _CLAIM.format(candidates=_CLAIM_TYPES)
            params.append(self.flow_types)
        return sql, [*params, self.limit]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Claim and lease in one UPDATE ... RETURNING, then read the journals."""
        for command in commands:
            command.result = await command._apply(tx)

    async def _apply(self, tx: _Tx) -> list[ClaimedFlow]:
        if not self.flow_types or self.limit <= 0:
            return []
        sql, params = self.statement()
        claimed = sorted(await tx.conn.fetch(sql, *params), key=lambda row: (row[0], row[1]))
        if not claimed:
            return []
        tx.locked.update(row[2] for row in claimed)
        journals: dict[str, list[JournalRecord]] = {row[2]: [] for row in claimed}
        # A flow claimed for the first time has no journal: skip the read when none has one.
        with_history = [row[2] for row in claimed if row[8] > 0]
        if with_history:
            for row in await tx.conn.fetch(
                f"SELECT flow_id, {_JOURNAL_COLUMNS} FROM journal "
                "WHERE flow_id = ANY($1::text[]) ORDER BY flow_id, sequence",
                with_history,
            ):
                journals[row[0]].append(_journal_from_row(row, 1))
        return [
            ClaimedFlow(
                flow_id=row[2],
                flow_type=row[3],
                input=row[4],
                lease_token=row[5],
                attempt=row[6],
                retry_policy=_policy_from_json(row[7]),
                journal=journals[row[2]],
            )
            for row in claimed
        ]


class _RenewLeases(_Command[int]):
    __slots__ = ("lease_expires_at", "session_id")
    barrier = True

    def __init__(self, future: asyncio.Future[int], session_id: str, lease_expires_at: int) -> None:
        super().__init__(future)
        self.session_id = session_id
        self.lease_expires_at = lease_expires_at

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Extend the session's leases through the partial index on lease_owner."""
        for command in commands:
            # Locked in flow_id order like every other writer, so a heartbeat cannot deadlock
            # with another replica's batch; a row that changed while waiting is re-checked.
            status = await tx.conn.execute(
                "WITH mine AS (SELECT seq FROM flows WHERE status = 'RUNNING' "
                "AND lease_owner = $2 ORDER BY flow_id FOR UPDATE) "
                "UPDATE flows AS f SET lease_expires_at = $1 FROM mine WHERE f.seq = mine.seq",
                command.lease_expires_at,
                command.session_id,
            )
            command.result = _row_count(status)


class _ExpireLeases(_Command[list[str]]):
    __slots__ = ("now_ms",)
    barrier = True

    def __init__(self, future: asyncio.Future[list[str]], now_ms: int) -> None:
        super().__init__(future)
        self.now_ms = now_ms

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Re-queue expired leases through the partial index on lease_expires_at.

        A flow another replica is writing at this moment is skipped, not waited for: it is
        re-queued by a later scan if its lease is still expired then.
        """
        for command in commands:
            rows = await tx.conn.fetch(
                "WITH due AS (SELECT seq FROM flows WHERE status = 'RUNNING' "
                "AND lease_expires_at < $1 FOR UPDATE SKIP LOCKED) "
                "UPDATE flows AS f SET status = 'PENDING', ready_at = $1, updated_at = $1, "
                "lease_owner = NULL, lease_expires_at = NULL FROM due WHERE f.seq = due.seq "
                "RETURNING f.seq, f.flow_id",
                command.now_ms,
            )
            command.result = [row[1] for row in sorted(rows, key=lambda row: row[0])]
            if rows:
                tx.locked.update(command.result)
                tx.events.ready = True


class _ReattachLeases(_Command[list[str]]):
    __slots__ = ("lease_expires_at", "leases", "now_ms", "session_id")

    def __init__(
        self,
        future: asyncio.Future[list[str]],
        session_id: str,
        leases: Sequence[Lease],
        lease_expires_at: int,
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.session_id = session_id
        self.leases = leases
        self.lease_expires_at = lease_expires_at
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(lease.flow_id for lease in self.leases)

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Move the leases that are still live to the new session."""
        for command in commands:
            ids = sorted({lease.flow_id for lease in command.leases})
            rows = await tx.conn.fetch(
                "SELECT flow_id, status, lease_token, lease_expires_at FROM flows "
                "WHERE flow_id = ANY($1::text[]) ORDER BY flow_id FOR UPDATE",
                ids,
            )
            tx.locked.update(row[0] for row in rows)
            live = {
                (row[0], row[2])
                for row in rows
                if row[1] == "RUNNING" and row[3] is not None and row[3] >= command.now_ms
            }
            moved = _unique(
                lease.flow_id
                for lease in command.leases
                if (lease.flow_id, lease.lease_token) in live
            )
            if moved:
                await tx.conn.execute(
                    "UPDATE flows SET lease_owner = $1, lease_expires_at = $2, updated_at = $3 "
                    "WHERE flow_id = ANY($4::text[])",
                    command.session_id,
                    command.lease_expires_at,
                    command.now_ms,
                    moved,
                )
            command.result = moved


class _CancelFlow(_Command[tuple[CancelOutcome, list[Satisfied]]]):
    __slots__ = ("flow_id", "now_ms", "reason")

    def __init__(
        self,
        future: asyncio.Future[tuple[CancelOutcome, list[Satisfied]]],
        flow_id: str,
        reason: str,
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.flow_id = flow_id
        self.reason = reason
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources([self.flow_id])

    def ending_flows(self) -> Iterable[str]:
        return [self.flow_id]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Cancel each flow, or ask it to stop if it runs."""
        for command in commands:
            sim = _Sim(tx)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> tuple[CancelOutcome, list[Satisfied]]:
        await sim.load([self.flow_id])
        state = sim.states.get(self.flow_id)
        if state is None:
            return CancelOutcome.NOT_FOUND, []
        if state.status in _TERMINAL:
            return CancelOutcome.CLOSED, []
        rows = await sim.conn.fetch(
            "SELECT error FROM journal WHERE flow_id = $1 AND key = $2",
            self.flow_id,
            CANCEL_KEY,
        )
        if rows:
            error = _failure_from_json(rows[0][0]) or cancellation_failure(self.reason)
        else:
            error = cancellation_failure(self.reason)
            sim.add_entry(
                self.flow_id,
                CANCEL_KEY,
                EntryKind.CANCEL,
                EntryStatus.COMPLETED,
                None,
                error,
                self.now_ms,
            )
        if state.status == "RUNNING":
            if not state.cancel_requested:
                state.cancel_requested = True
                state.cancel_error = _failure_to_json(error)
                sim.update(self.flow_id, cancel_requested=True, updated_at=self.now_ms)
            sim.tx.events.cancel_requested(self.flow_id, state.lease_token)
            return CancelOutcome.CANCEL_REQUESTED, []
        satisfied = await sim.end(self.flow_id, FlowStatus.CANCELLED, None, error, self.now_ms)
        return CancelOutcome.CANCELLED, satisfied


class _SendSignal(_Command[SignalResult]):
    __slots__ = ("flow_id", "name", "now_ms", "payload", "request_id")

    def __init__(
        self,
        future: asyncio.Future[SignalResult],
        flow_id: str,
        name: str,
        payload: bytes,
        request_id: str,
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.flow_id = flow_id
        self.name = name
        self.payload = payload
        self.request_id = request_id
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources([self.flow_id])

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Append each signal to its mailbox (an open wait consumes it)."""
        for command in commands:
            sim = _Sim(tx)
            command.result = await _send_signal(
                tx,
                sim,
                command.flow_id,
                command.name,
                command.payload,
                command.request_id,
                command.now_ms,
            )
            await sim.flush()


class _SignalWithSchedule(_Command[tuple[ScheduleResult, SignalResult]]):
    __slots__ = ("flow", "name", "now_ms", "payload")
    # A request id may resolve to another flow than the one named: footprint unknown upfront.
    barrier = True

    def __init__(
        self,
        future: asyncio.Future[tuple[ScheduleResult, SignalResult]],
        flow: NewFlow,
        name: str,
        payload: bytes,
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.flow = flow
        self.name = name
        self.payload = payload
        self.now_ms = now_ms

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Schedule, then signal the flow the schedule resolved to."""
        for command in commands:
            (scheduled,) = await _schedule(tx, [(command.flow, command.now_ms)])
            if scheduled.outcome is ScheduleOutcome.CONFLICT:
                command.result = (scheduled, SignalResult(SignalOutcome.NOT_FOUND))
                continue
            sim = _Sim(tx)
            signal = await _send_signal(
                tx,
                sim,
                scheduled.flow_id,
                command.name,
                command.payload,
                command.flow.request_id,
                command.now_ms,
            )
            await sim.flush()
            command.result = (scheduled, signal)


class _RegisterFlowTypes(_Command[None]):
    __slots__ = ("flow_types", "now_ms")

    def __init__(self, future: asyncio.Future[None], flow_types: list[str], now_ms: int) -> None:
        super().__init__(future)
        self.flow_types = flow_types
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return ["flow-types"]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Insert the types not seen before."""
        for command in commands:
            if command.flow_types:
                # Sorted: replicas registering the same types wait for each other in one order.
                await tx.conn.execute(
                    "INSERT INTO flow_types (flow_type, registered_at) "
                    "SELECT t, $2 FROM unnest($1::text[]) AS t ON CONFLICT (flow_type) DO NOTHING",
                    sorted(command.flow_types),
                    command.now_ms,
                )
            command.result = None


class _RegisterWaits(_Command[list[WaitResult]]):
    __slots__ = ("now_ms", "waits")

    def __init__(
        self,
        future: asyncio.Future[list[WaitResult]],
        waits: Sequence[WaitRequest],
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.waits = waits
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        names = _flow_resources(wait.flow_id for wait in self.waits)
        children = [wait.child.flow_id for wait in self.waits if wait.child is not None]
        if children:
            # Children are scheduled: keep scheduling order with the other schedules.
            names += ["schedule-order", *_flow_resources(children)]
        return names

    def child_links(self) -> Iterable[tuple[str, str]]:
        return [(wait.child.flow_id, wait.flow_id) for wait in self.waits if wait.child is not None]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Register each command's waits, reading their flows, entries and rows at once."""
        for command in commands:
            sim = _Sim(tx)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> list[WaitResult]:
        await sim.load(wait.flow_id for wait in self.waits)
        pairs = [(wait.flow_id, wait.key) for wait in self.waits if sim.states.get(wait.flow_id)]
        stored = await _journal_entries(sim.tx, pairs)
        await sim.load_waits(pairs)
        results: list[WaitResult] = []
        for request in self.waits:
            state = sim.states.get(request.flow_id)
            if state is None:
                results.append(WaitResult(WriteOutcome.NOT_FOUND))
                continue
            if not state.holds(request.lease_token):
                results.append(WaitResult(WriteOutcome.LEASE_LOST))
                continue
            pair = (request.flow_id, request.key)
            wait = sim.waits.get(pair)
            entry = sim.entry(*pair) or stored.get(pair)
            if entry is None:
                if wait is None:
                    wait = await self._new_wait(sim, request)
                else:
                    sim.set_wait(request.flow_id, request.key, wait, _OPEN)
                await self._check_now(sim, request.flow_id, request.key, wait)
                entry = sim.entry(*pair)
                if wait.kind is EntryKind.TIMER and wait.status == _OPEN:
                    # Another replica's timer loop may be sleeping past this fire time.
                    sim.tx.events.timer = True
            fire_at = wait.fire_at if wait is not None else None
            results.append(WaitResult(WriteOutcome.OK, entry, fire_at))
        return results

    async def _new_wait(self, sim: _Sim, request: WaitRequest) -> _WaitRow:
        child_flow_id: str | None = None
        if request.kind is EntryKind.CHILD and request.child is not None:
            child = dataclasses.replace(
                request.child, parent_flow_id=request.flow_id, parent_key=request.key
            )
            (scheduled,) = await _schedule(sim.tx, [(child, self.now_ms)])
            child_flow_id = scheduled.flow_id
            sim.forget([child_flow_id])
            links = sim.links.get(child_flow_id)
            if links is not None:
                links.append((request.flow_id, request.key))
                links.sort()
        wait = _WaitRow(
            request.kind,
            _OPEN,
            request.fire_at if request.kind is EntryKind.TIMER else None,
            request.signal_name if request.kind is EntryKind.SIGNAL else None,
            child_flow_id,
            self.now_ms,
            False,
        )
        sim.put_wait(request.flow_id, request.key, wait)
        return wait

    async def _check_now(self, sim: _Sim, flow_id: str, key: str, wait: _WaitRow) -> None:
        """Satisfy a just (re)opened wait if it can be satisfied now.

        The caller holds the lease and gets the entry in its answer: no WAKEUP is sent.
        """
        now_ms = self.now_ms
        if wait.kind is EntryKind.TIMER:
            if wait.fire_at is not None and wait.fire_at <= now_ms:
                sim.satisfy(
                    flow_id, key, wait, EntryStatus.COMPLETED, None, None, now_ms, wake=False
                )
        elif wait.kind is EntryKind.SIGNAL:
            payload = await _consume_signal(sim.tx, flow_id, wait.signal_name or "", key, now_ms)
            if payload is not None:
                sim.satisfy(
                    flow_id, key, wait, EntryStatus.COMPLETED, payload, None, now_ms, wake=False
                )
        elif wait.child_flow_id is not None:
            # Lock the child before reading its status: a replica ending it at this moment
            # either has committed (and the status read sees the end) or waits for this
            # transaction (and then finds this wait when it looks for its parents).
            await sim.tx.lock([wait.child_flow_id])
            rows = await sim.conn.fetch(
                "SELECT status, result, error FROM flows WHERE flow_id = $1",
                wait.child_flow_id,
            )
            if rows and rows[0][0] in _TERMINAL:
                status, result, error = rows[0]
                entry = child_entry(FlowStatus(status), result, _failure_from_json(error))
                sim.satisfy(flow_id, key, wait, *entry, now_ms, wake=False)


class _RegisterWaitsBarrier(_RegisterWaits):
    """Registers CHILD waits whose child has a request id, which may name any flow."""

    __slots__ = ()
    barrier = True


class _SuspendFlows(_Command[tuple[list[SuspendResult], list[Satisfied]]]):
    __slots__ = ("now_ms", "requests")

    def __init__(
        self,
        future: asyncio.Future[tuple[list[SuspendResult], list[Satisfied]]],
        requests: Sequence[SuspendRequest],
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.requests = requests
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(request.flow_id for request in self.requests)

    def ending_flows(self) -> Iterable[str]:
        return [request.flow_id for request in self.requests]

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Suspend each command's flows in order."""
        for command in commands:
            sim = _Sim(tx)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> tuple[list[SuspendResult], list[Satisfied]]:
        conn = sim.conn
        now_ms = self.now_ms
        await sim.load(request.flow_id for request in self.requests)
        results: list[SuspendResult] = []
        satisfied: list[Satisfied] = []
        for request in self.requests:
            flow_id = request.flow_id
            state = sim.states.get(flow_id)
            if state is None:
                results.append(SuspendResult(SuspendOutcome.NOT_FOUND))
                continue
            if not state.holds(request.lease_token):
                results.append(SuspendResult(SuspendOutcome.LEASE_LOST))
                continue
            keys = _unique(request.open_keys)
            for row in await conn.fetch(
                f"SELECT {_WAIT_COLUMNS} FROM waits AS w "
                "WHERE w.flow_id = $1 AND w.status = 'OPEN'",
                flow_id,
            ):
                sim.cache_wait(row)
            wanted = set(keys)
            for (owner, key), wait in list(sim.waits.items()):
                if owner == flow_id and wait.status == _OPEN and key not in wanted:
                    sim.set_wait(flow_id, key, wait, _CANCELLED)
            found = await _journal_entries(sim.tx, [(flow_id, key) for key in keys])
            for key in keys:
                mine = sim.entry(flow_id, key)
                if mine is not None:
                    found[(flow_id, key)] = mine
            if found:
                entries = tuple(sorted(found.values(), key=lambda entry: entry.sequence))
                results.append(SuspendResult(SuspendOutcome.RESUME, entries))
            elif state.cancel_requested:
                satisfied += await sim.end(
                    flow_id, FlowStatus.CANCELLED, None, state.cancellation(), now_ms
                )
                results.append(SuspendResult(SuspendOutcome.CANCELLED))
            else:
                state.status = "WAITING"
                state.lease_owner = None
                sim.update(
                    flow_id,
                    status="WAITING",
                    updated_at=now_ms,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                results.append(SuspendResult(SuspendOutcome.SUSPENDED))
        return results, satisfied


class _FireTimers(_Command[list[Satisfied]]):
    __slots__ = ("limit", "now_ms")
    # Which flows it touches is known only once the due timers are read.
    barrier = True

    def __init__(self, future: asyncio.Future[list[Satisfied]], now_ms: int, limit: int) -> None:
        super().__init__(future)
        self.now_ms = now_ms
        self.limit = limit

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Fire due timers through the partial index on open timers."""
        for command in commands:
            sim = _Sim(tx)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> list[Satisfied]:
        tx = sim.tx
        fired: list[Satisfied] = []
        after: tuple[int, str, str] | None = None
        while len(fired) < self.limit:
            want = self.limit - len(fired)
            where = "status = 'OPEN' AND kind = 'TIMER' AND fire_at <= $1"
            params: list[object] = [self.now_ms]
            if after is not None:
                where += " AND (fire_at, flow_id, key) > ($3, $4, $5)"
                params += after
            rows = await tx.conn.fetch(
                f"SELECT fire_at, flow_id, key FROM waits WHERE {where} "
                "ORDER BY fire_at, flow_id, key LIMIT $2",
                params[0],
                want,
                *params[1:],
            )
            if not rows:
                break
            # The waits belong to their flows: lock the flows, then read the waits again (a
            # flow another replica holds right now is skipped; its timer fires on a later scan).
            flow_ids = _unique(row[1] for row in rows)
            await tx.lock(flow_ids, skip_locked=True)
            mine = [(row[1], row[2]) for row in rows if row[1] in tx.locked]
            await sim.load(pair[0] for pair in mine)
            await sim.load_waits(mine)
            for row in rows:
                if len(fired) == self.limit:
                    break
                flow_id, key = row[1], row[2]
                wait = sim.waits.get((flow_id, key))
                if flow_id not in tx.locked or wait is None or wait.status != _OPEN:
                    continue
                state = sim.states.get(flow_id)
                if state is None or state.status in _TERMINAL:
                    sim.set_wait(flow_id, key, wait, _CANCELLED)
                    continue
                done = sim.satisfy(
                    flow_id, key, wait, EntryStatus.COMPLETED, None, None, self.now_ms
                )
                if done is not None:
                    fired.append(done)
            if len(rows) < want:
                break
            after = (rows[-1][0], rows[-1][1], rows[-1][2])
        return fired


class _ParkFlows(_Command[list[WriteOutcome]]):
    __slots__ = ("initial_delay_ms", "max_delay_ms", "now_ms", "parks")

    def __init__(
        self,
        future: asyncio.Future[list[WriteOutcome]],
        parks: Sequence[Park],
        now_ms: int,
        initial_delay_ms: int,
        max_delay_ms: int,
    ) -> None:
        super().__init__(future)
        self.parks = parks
        self.now_ms = now_ms
        self.initial_delay_ms = initial_delay_ms
        self.max_delay_ms = max_delay_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(park.flow_id for park in self.parks)

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Fence with one read, then park every accepted flow at once."""
        for command in commands:
            sim = _Sim(tx)
            await sim.load(park.flow_id for park in command.parks)
            outcomes: list[WriteOutcome] = []
            for park in command.parks:
                state = sim.states.get(park.flow_id)
                if state is None:
                    outcomes.append(WriteOutcome.NOT_FOUND)
                    continue
                if not state.holds(park.lease_token):
                    outcomes.append(WriteOutcome.LEASE_LOST)
                    continue
                outcomes.append(WriteOutcome.OK)
                delay = park_delay_ms(command.initial_delay_ms, command.max_delay_ms, state.parks)
                state.status = "PENDING"
                state.lease_owner = None
                state.parks += 1
                sim.update(
                    park.flow_id,
                    status="PENDING",
                    error=_failure_to_json(park.error),
                    ready_at=command.now_ms + delay,
                    updated_at=command.now_ms,
                    lease_owner=None,
                    lease_expires_at=None,
                    parks=state.parks,
                )
                tx.events.ready = True
            command.result = outcomes
            await sim.flush()


_AnyCommand = _Command[Any]


async def _child_links(tx: _Tx, batch: Sequence[_AnyCommand]) -> dict[str, set[str]]:
    """For each flow a batch may end, the flows whose CHILD waits name it.

    Ending a child writes its waiting flows (their entries, their status), so the planner
    must order it against the batch's other commands on those flows. The waits in the
    database, plus those the batch itself may create, cover every such flow: a wait's child
    never changes and wait rows are never deleted. (Read without locks: it only orders this
    process's commands; the commands lock what they write.)
    """
    ending = _unique(flow_id for command in batch for flow_id in command.ending_flows())
    if not ending:
        return {}
    links: dict[str, set[str]] = {}
    for command in batch:
        for child, waiting in command.child_links():
            links.setdefault(child, set()).add(waiting)
    for child, waiting in await tx.conn.fetch(
        "SELECT child_flow_id, flow_id FROM waits "
        "WHERE kind = 'CHILD' AND child_flow_id = ANY($1::text[])",
        ending,
    ):
        links.setdefault(child, set()).add(waiting)
    return links


def _plan_stages(
    batch: Sequence[_AnyCommand], links: dict[str, set[str]] | None = None
) -> list[list[_AnyCommand]]:
    """Group a batch into stages whose in-order application equals applying it in queue order.

    The SQLite store's planner, unchanged: a mergeable command joins the earliest stage of its
    class that comes after every stage holding an earlier command with a resource in common
    (and after the last barrier); otherwise it opens a new stage at the end. Barriers and
    non-mergeable commands always open a new stage at the end. A command that may end a flow
    also touches the flows waiting for it as a child (`links`).

    Args:
        batch: Commands in queue order.
        links: For each flow the batch may end, the flows waiting for it (`_child_links`).

    Returns:
        Stages in application order; each is a non-empty list of commands of one class, in
        queue order.
    """
    stages: list[list[_AnyCommand]] = []
    stages_of_class: dict[type[_AnyCommand], list[int]] = {}
    last_stage: dict[str, int] = {}
    floor = -1
    for command in batch:
        kind = type(command)
        if kind.barrier:
            floor = len(stages)
            stages.append([command])
            continue
        resources = list(command.resources())
        if links:
            resources += [
                _FLOW + waiting
                for flow_id in command.ending_flows()
                for waiting in sorted(links.get(flow_id, ()))
            ]
        after = max([floor, *(last_stage.get(name, -1) for name in resources)])
        index = -1
        if kind.mergeable:
            candidates = stages_of_class.setdefault(kind, [])
            position = bisect.bisect_left(candidates, after)
            if position < len(candidates):
                index = candidates[position]
            else:
                index = len(stages)
                candidates.append(index)
                stages.append([])
        else:
            index = len(stages)
            stages.append([])
        stages[index].append(command)
        for name in resources:
            if last_stage.get(name, -1) < index:
                last_stage[name] = index
    return stages


def _batch_flows(batch: Sequence[_AnyCommand], links: dict[str, set[str]]) -> list[str]:
    """Every existing flow a batch names (and the parents of the flows it may end), sorted."""
    names: set[str] = set()
    for command in batch:
        for name in command.resources():
            if name.startswith(_FLOW):
                names.add(name[len(_FLOW) :])
        for flow_id in command.ending_flows():
            names.update(links.get(flow_id, ()))
    return sorted(names)


# --- migrations --------------------------------------------------------------------------


class _PostgresMigrationTarget:
    """The migration runner's view of a connection.

    Every step holds a transaction-level advisory lock, so replicas starting together take
    turns: the first applies a file, the others find its version recorded and apply nothing.
    """

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    async def ensure_version_table(self) -> None:
        # Two CREATE TABLE IF NOT EXISTS running at once can both try to create the type.
        async with self._conn.transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await self._conn.execute(SCHEMA_VERSION_DDL)

    async def current_version(self) -> int:
        version = await self._conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(version)

    async def apply(self, migration: Migration) -> None:
        async with self._conn.transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if await self.current_version() < migration.version:
                # No parameters: the simple query protocol runs the whole file.
                await self._conn.execute(migration.sql)
                await self._conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )


# --- LISTEN ----------------------------------------------------------------------------------


class _Listener:
    """A dedicated LISTEN connection that reconnects by itself.

    Silence is not proof of life, so an idle connection is pinged every `keepalive_s`; a ping
    that fails or a connection that closes starts a reconnect loop with capped backoff. After
    a reconnect, READY and TIMER are delivered, since events sent meanwhile were lost.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        channel: str,
        deliver: Callable[[StoreEvent], None],
        keepalive_s: float,
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._deliver = deliver
        self._keepalive_s = keepalive_s
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and LISTEN; raise if the first connection fails."""
        self._conn = await self._listen()
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"ergon-postgres-listener:{self._channel}"
        )

    async def _listen(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await self._connect()
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(self._channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self._lost = lost
        return conn

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        for event in _decode_events(str(payload)):
            self._deliver(event)

    async def _supervise(self) -> None:
        while True:
            conn = self._conn
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=self._keepalive_s)
            except TimeoutError:
                if conn is not None and await self._alive(conn):
                    continue
            _log.warning("the postgres LISTEN connection was lost; reconnecting")
            if conn is not None:
                conn.terminate()
            self._conn = None
            delay = 0.05
            while self._conn is None:
                try:
                    self._conn = await self._listen()
                except Exception as exc:
                    _log.warning("reconnecting the postgres LISTEN connection failed: %r", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            _log.info("the postgres LISTEN connection is back")
            self._deliver(StoreEvent(StoreEventKind.READY))
            self._deliver(StoreEvent(StoreEventKind.TIMER))

    async def _alive(self, conn: asyncpg.Connection) -> bool:
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=self._keepalive_s)
        except Exception:
            return False
        return True

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=5.0)
            except Exception:
                conn.terminate()


# --- the store ---------------------------------------------------------------------------


class PostgresStore:
    """The `Store` on PostgreSQL: a group-commit lane for writes, a pool for reads.

    Several instances (server replicas) may share one database; see the module docstring for
    how they stay correct without talking to each other.

    Args:
        dsn: A libpq-style URL, e.g. postgresql://user:password@host:5432/ergon.
        min_size: Connections the pool keeps open.
        max_size: The most connections the pool opens (one of them serves the lane).
        max_batch: The most commands one group commit applies.
        retries: How many times a batch is run before a serialization failure or deadlock
            reaches its callers as `StoreUnavailableError`.
        channel: The LISTEN/NOTIFY channel; replicas of one deployment must agree on it.
        connect_timeout_s: How long opening one connection may take.
        keepalive_s: How often the idle LISTEN connection is pinged.
        server_settings: Session settings for every connection, over the defaults
            (application_name "ergon-server", idle_in_transaction_session_timeout 60 s).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        max_batch: int = 500,
        retries: int = 8,
        channel: str = DEFAULT_CHANNEL,
        connect_timeout_s: float = 10.0,
        keepalive_s: float = 15.0,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        if min_size < 0 or max_size < 2 or min_size > max_size:
            raise InvalidArgumentError(
                "the postgres pool needs 0 <= min_size <= max_size and max_size >= 2 "
                f"(got min_size={min_size}, max_size={max_size})"
            )
        if max_batch < 1 or retries < 1 or not channel:
            raise InvalidArgumentError(
                "max_batch and retries must be at least 1 and the channel non-empty"
            )
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._max_batch = max_batch
        self._retries = retries
        self._channel = channel
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._server_settings = {
            "application_name": "ergon-server",
            # A replica that stalls inside a transaction (a partition, a frozen process) must
            # not hold its row locks, and so the other replicas, for longer than this.
            "idle_in_transaction_session_timeout": "60000",
            **(server_settings or {}),
        }
        self._pool: asyncpg.Pool | None = None
        # The lane's connection, held across batches (released on errors and at close).
        self._writer: _Conn | None = None
        self._queue: collections.deque[_AnyCommand] = collections.deque()
        self._wakeup = asyncio.Event()
        self._lane: asyncio.Task[None] | None = None
        self._accepting = False
        self._lifecycle = asyncio.Lock()
        self._listener: _Listener | None = None
        self._listeners: list[Callable[[StoreEvent], None]] = []

    @property
    def dsn(self) -> str:
        """The database URL."""
        return self._dsn

    # --- life cycle ---

    async def open(self) -> None:
        """Connect, apply pending migrations and start the lane.

        Raises:
            SchemaVersionError: The database was migrated by a newer ergon-server.
            StoreUnavailableError: The server cannot be reached or refuses connections.
            StoreError: The store is already open, or the database is unusable.
        """
        async with self._lifecycle:
            if self._pool is not None:
                raise StoreError("the postgres store is already open")
            pool: asyncpg.Pool | None = None
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._connect_timeout_s,
                    server_settings=self._server_settings,
                )
                async with pool.acquire() as conn:
                    await migrate(_PostgresMigrationTarget(conn), load_migrations("postgres"))
            except BaseException as exc:
                if pool is not None:
                    pool.terminate()
                if isinstance(exc, Exception):
                    raise _translate(exc) from exc
                raise
            self._pool = pool
            self._queue.clear()
            self._wakeup = asyncio.Event()
            self._accepting = True
            self._lane = asyncio.get_running_loop().create_task(
                self._run_lane(), name="ergon-postgres-lane"
            )

    async def close(self) -> None:
        """Commit every queued write, then close the connections. Idempotent."""
        async with self._lifecycle:
            self._accepting = False
            lane, self._lane = self._lane, None
            if lane is not None:
                self._wakeup.set()
                # The lane drains the queue before it returns. A lane that died has failed its
                # commands already; closing must still release connections.
                await asyncio.wait([lane])
                if not lane.cancelled() and lane.exception() is not None:
                    _log.error("the postgres lane had stopped", exc_info=lane.exception())
            listener, self._listener = self._listener, None
            if listener is not None:
                await listener.stop()
            self._listeners = []
            await self._drop_writer()
            pool, self._pool = self._pool, None
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=10.0)
                except Exception:
                    _log.warning("closing the postgres pool failed; terminating", exc_info=True)
                    pool.terminate()

    # --- the lane ---

    def _submit(self, command: _Command[_T]) -> asyncio.Future[_T]:
        if not self._accepting:
            raise StoreUnavailableError("the postgres store is not open")
        self._queue.append(command)
        self._wakeup.set()
        return command.future

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _run_lane(self) -> None:
        batch: list[_AnyCommand] = []
        try:
            while True:
                if not self._queue:
                    if not self._accepting:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                await self._commit(batch)
                batch = []
        except BaseException as exc:
            # Never leave a caller waiting, whatever stopped the lane.
            error = StoreUnavailableError(f"the postgres store's lane stopped: {exc!r}")
            for command in [*batch, *self._queue]:
                command.fail(error)
            self._queue.clear()
            self._accepting = False
            raise

    async def _commit(self, batch: list[_AnyCommand]) -> None:
        try:
            await self._run(batch)
        except ErgonError as error:
            if len(batch) == 1 or isinstance(error, StoreUnavailableError):
                for command in batch:
                    command.fail(error)
                return
            _log.warning(
                "a group commit of %d writes failed (%s); retrying one by one", len(batch), error
            )
            for command in batch:
                try:
                    await self._run([command])
                except ErgonError as single:
                    command.fail(single)
                else:
                    command.resolve()
            return
        for command in batch:
            command.resolve()

    async def _run(self, batch: Sequence[_AnyCommand]) -> None:
        """Apply a batch in one transaction, again on a serialization failure or deadlock."""
        delay = 0.002
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._transaction(batch)
                return
            except Exception as exc:
                # Whatever failed, the connection's state is not known (a transaction left
                # open, a protocol interrupted): the pool resets it or closes it, and the next
                # attempt takes a fresh one.
                await self._drop_writer()
                if _retryable(exc) and attempt < self._retries:
                    _log.debug("a postgres batch will run again (%r)", exc)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 0.25)
                    continue
                error = _translate(exc)
                if error is exc:
                    raise
                raise error from exc

    async def _writer_connection(self) -> _Conn:
        if self._writer is None or not _usable(self._writer):
            pool = self._pool
            if pool is None:
                raise StoreUnavailableError("the postgres store is not open")
            await self._drop_writer()
            self._writer = await pool.acquire(timeout=self._connect_timeout_s)
        return self._writer

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self._pool is not None:
            try:
                await self._pool.release(writer, timeout=5.0)
            except Exception:
                _log.debug("releasing the lane's connection failed", exc_info=True)

    async def _transaction(self, batch: Sequence[_AnyCommand]) -> None:
        conn = await self._writer_connection()
        transaction = conn.transaction()
        try:
            await transaction.start()
        except Exception as exc:
            # The held connection died while idle (a server restart, an idle timeout): no
            # statement of the batch ran, so running it again on a fresh connection is safe.
            raise _StaleConnection() from exc
        tx = _Tx(conn)
        try:
            links: dict[str, set[str]] = {}
            if len(batch) > 1:
                links = await _child_links(tx, batch)
                # One statement locks every flow the batch names, in flow_id order.
                await tx.lock(_batch_flows(batch, links))
            for stage in _plan_stages(batch, links):
                await type(stage[0]).apply_all(tx, stage)
            await tx.notify(self._channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        await transaction.commit()

    # --- reads ---

    def _reader(self) -> asyncpg.Pool:
        if not self._accepting or self._pool is None:
            raise StoreUnavailableError("the postgres store is not open")
        return self._pool

    async def _read(self, sql: str, *params: object) -> list[_Row]:
        pool = self._reader()
        try:
            return list(await pool.fetch(sql, *params))
        except Exception as exc:
            error = _translate(exc)
            if not isinstance(error, StoreUnavailableError) or isinstance(exc, OSError):
                raise error from exc
        # A pooled connection the server ended while idle fails once; a read can simply be
        # asked again (the pool replaces the dead connection).
        try:
            return list(await pool.fetch(sql, *params))
        except Exception as exc:
            raise _translate(exc) from exc

    async def get_flow(self, flow_id: str) -> FlowRecord | None:
        """The flow, or None."""
        rows = await self._read(f"SELECT {_FLOW_COLUMNS} FROM flows WHERE flow_id = $1", flow_id)
        return _flow_from_row(rows[0]) if rows else None

    async def list_flows(
        self,
        statuses: Sequence[FlowStatus],
        flow_type: str | None,
        limit: int,
        cursor: int | None,
    ) -> FlowPage:
        """Flows in scheduling order, filtered (empty statuses / None type: any), paged."""
        check_limit(limit)
        where = ["seq > $1"]
        params: list[object] = [cursor if cursor is not None else 0]
        wanted = _unique(status.value for status in statuses)
        if wanted:
            params.append(wanted)
            where.append(f"status = ANY(${len(params)}::text[])")
        if flow_type is not None:
            params.append(flow_type)
            where.append(f"flow_type = ${len(params)}")
        params.append(limit + 1)
        rows = await self._read(
            f"SELECT {_FLOW_COLUMNS} FROM flows WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT ${len(params)}",
            *params,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return FlowPage(
            flows=[_flow_from_row(row) for row in rows],
            next_cursor=rows[-1][0] if more else None,
        )

    async def get_history(
        self, flow_id: str, after_sequence: int, limit: int
    ) -> list[JournalRecord]:
        """Journal entries of the flow with sequence > after_sequence, in order, at most limit."""
        check_limit(limit)
        rows = await self._read(
            f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE flow_id = $1 AND sequence > $2 "
            "ORDER BY sequence LIMIT $3",
            flow_id,
            after_sequence,
            limit,
        )
        return [_journal_from_row(row) for row in rows]

    async def get_entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """One journal entry of a flow, or None."""
        rows = await self._read(
            f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE flow_id = $1 AND key = $2",
            flow_id,
            key,
        )
        return _journal_from_row(rows[0]) if rows else None

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        types = _unique(flow_types)
        if not types:
            self._reader()
            return None
        # One MIN per type: each is a single probe of the partial index.
        rows = await self._read(
            "SELECT MIN((SELECT MIN(ready_at) FROM flows "
            "WHERE status = 'PENDING' AND flow_type = t)) FROM unnest($1::text[]) AS t",
            types,
        )
        value = rows[0][0]
        return int(value) if value is not None else None

    async def known_flow_types(self, flow_types: Sequence[str]) -> set[str]:
        """Which of these flow types were ever registered."""
        types = _unique(flow_types)
        rows = await self._read(
            "SELECT flow_type FROM flow_types WHERE flow_type = ANY($1::text[])", types
        )
        return {row[0] for row in rows}

    async def next_timer_at(self) -> int | None:
        """The earliest fire_at among open TIMER waits, or None."""
        rows = await self._read(
            "SELECT MIN(fire_at) FROM waits WHERE status = 'OPEN' AND kind = 'TIMER'"
        )
        value = rows[0][0]
        return int(value) if value is not None else None

    # --- notifications ---

    async def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Deliver hints of changes made through this database by any process (LISTEN).

        The first call opens a dedicated LISTEN connection (failing if it cannot); it
        reconnects by itself if dropped, and then delivers READY and TIMER since events sent
        meanwhile were lost. A listener must not block; its exceptions are logged.

        Raises:
            StoreUnavailableError: The store is not open, or the connection failed.
        """
        self._reader()
        self._listeners.append(listener)
        if self._listener is not None:
            return
        server_settings = self._server_settings

        async def connect() -> asyncpg.Connection:
            conn: asyncpg.Connection = await asyncpg.connect(
                self._dsn, timeout=self._connect_timeout_s, server_settings=server_settings
            )
            return conn

        listening = _Listener(connect, self._channel, self._deliver, self._keepalive_s)
        try:
            await listening.start()
        except Exception as exc:
            self._listeners.remove(listener)
            raise _translate(exc) from exc
        self._listener = listening

    def _deliver(self, event: StoreEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                _log.exception("a store event listener failed on %s", event)

    # --- writes ---

    async def register_flow_types(self, flow_types: Sequence[str], now_ms: int) -> None:
        """Remember that workers run these flow types (kept across restarts)."""
        types = _unique(flow_types)
        await self._submit(_RegisterFlowTypes(self._future(), types, now_ms))

    async def schedule_flows(self, flows: Sequence[NewFlow], now_ms: int) -> list[ScheduleResult]:
        """Create flows as PENDING, one result per input in order, all in one transaction."""
        for flow in flows:
            check_new_flow(flow)
        return await self._submit(_ScheduleFlows(self._future(), list(flows), now_ms))

    async def claim_flows(
        self,
        session_id: str,
        flow_types: Sequence[str],
        limit: int,
        lease_expires_at: int,
        now_ms: int,
    ) -> list[ClaimedFlow]:
        """Lease up to `limit` PENDING flows of these types whose ready_at <= now_ms.

        Rows another replica holds locked at that moment are skipped (SKIP LOCKED), so two
        replicas never claim one flow and never wait for each other.
        """
        command = _ClaimFlows(
            self._future(), session_id, _unique(flow_types), limit, lease_expires_at, now_ms
        )
        return await self._submit(command)

    async def record_steps(self, records: Sequence[StepRecord], now_ms: int) -> list[WriteOutcome]:
        """Apply step outcomes, fenced, one outcome per record in order."""
        return await self._submit(_RecordSteps(self._future(), list(records), now_ms))

    async def finish_flows(
        self, finishes: Sequence[FlowFinish], now_ms: int
    ) -> tuple[list[WriteOutcome], list[Satisfied]]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`.

        A retried finish of a flow that a cancel request ended (CANCELLED, same token)
        answers OK, whatever it asks.
        """
        for finish in finishes:
            check_finish(finish)
        return await self._submit(_FinishFlows(self._future(), list(finishes), now_ms))

    async def release_flows(self, leases: Sequence[Lease], now_ms: int) -> list[WriteOutcome]:
        """Give flows back unfinished: RUNNING -> PENDING, ready now, lease cleared, fenced."""
        return await self._submit(_ReleaseFlows(self._future(), list(leases), now_ms))

    async def renew_leases(self, session_id: str, lease_expires_at: int) -> int:
        """Extend every RUNNING lease owned by the session; returns how many."""
        return await self._submit(_RenewLeases(self._future(), session_id, lease_expires_at))

    async def reattach_leases(
        self, session_id: str, leases: Sequence[Lease], lease_expires_at: int, now_ms: int
    ) -> list[str]:
        """Move leases a reconnecting worker still holds to its new session.

        A lease is live while `now_ms <= lease_expires_at` (`expire_leases` takes it only
        once `lease_expires_at < now_ms`).
        """
        command = _ReattachLeases(
            self._future(), session_id, list(leases), lease_expires_at, now_ms
        )
        return await self._submit(command)

    async def expire_leases(self, now_ms: int) -> list[str]:
        """Re-queue RUNNING flows whose lease expired before now_ms, in scheduling order."""
        return await self._submit(_ExpireLeases(self._future(), now_ms))

    async def cancel_flow(
        self, flow_id: str, reason: str, now_ms: int
    ) -> tuple[CancelOutcome, list[Satisfied]]:
        """Cancel a flow that has not ended, recording a CANCEL entry under `CANCEL_KEY`.

        The cancellation (`cancellation_failure(reason)`) is the entry's error and, once the
        flow is CANCELLED, the flow's error; a flow cancelled twice keeps the first.
        """
        return await self._submit(_CancelFlow(self._future(), flow_id, reason, now_ms))

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox; an open wait consumes it."""
        command = _SendSignal(self._future(), flow_id, name, payload, request_id, now_ms)
        return await self._submit(command)

    async def signal_with_schedule(
        self, flow: NewFlow, name: str, payload: bytes, now_ms: int
    ) -> tuple[ScheduleResult, SignalResult]:
        """Schedule the flow as `schedule_flows` would and deliver a signal to it, atomically.

        The flow's `request_id` also deduplicates the signal, so a retried call appends
        nothing. On CONFLICT no signal is delivered and the signal answer is NOT_FOUND.
        """
        check_new_flow(flow)
        command = _SignalWithSchedule(self._future(), flow, name, payload, now_ms)
        return await self._submit(command)

    async def register_waits(self, waits: Sequence[WaitRequest], now_ms: int) -> list[WaitResult]:
        """Register waits, fenced, idempotent by (flow_id, key); one result per wait in order.

        A key registered before keeps its first registration (kind, fire_at, signal name,
        child); registering it again only reopens it. A CHILD whose flow_id exists (with any
        type or input) is that flow; with a known request_id, the flow the request created.
        """
        for wait in waits:
            check_wait(wait)
        unknown = any(wait.child is not None and wait.child.request_id for wait in waits)
        kind = _RegisterWaitsBarrier if unknown else _RegisterWaits
        return await self._submit(kind(self._future(), list(waits), now_ms))

    async def suspend_flows(
        self, requests: Sequence[SuspendRequest], now_ms: int
    ) -> tuple[list[SuspendResult], list[Satisfied]]:
        """Let flows whose every branch waits give their slot back, fenced.

        The open waits not in `open_keys` are cancelled whatever the answer. RESUME carries
        the entries of `open_keys` in journal order.
        """
        return await self._submit(_SuspendFlows(self._future(), list(requests), now_ms))

    async def fire_timers(self, now_ms: int, limit: int) -> list[Satisfied]:
        """Fire up to `limit` open TIMER waits with fire_at <= now_ms, oldest first.

        Ties are broken by (flow_id, key). Timers of ended flows are cancelled on the way and
        do not count toward `limit`; a limit below 1 fires nothing. A timer of a flow that
        another replica is writing at that moment is left for a later scan.
        """
        if limit <= 0:
            self._reader()
            return []
        return await self._submit(_FireTimers(self._future(), now_ms, limit))

    async def park_flows(
        self, parks: Sequence[Park], now_ms: int, initial_delay_ms: int, max_delay_ms: int
    ) -> list[WriteOutcome]:
        """Park flows whose code no longer matches their journal, fenced."""
        check_park_delays(initial_delay_ms, max_delay_ms)
        command = _ParkFlows(self._future(), list(parks), now_ms, initial_delay_ms, max_delay_ms)
        return await self._submit(command)
