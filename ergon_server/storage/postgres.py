"""The PostgreSQL store: an asyncpg pool, a group-commit lane per process, row locks between them.

Two kinds of concurrency meet here, and each is handled where it can be.

Calls of one store instance (one server process). The `Store` contract, as the conformance
suite checks it on every backend, is that concurrent calls apply as if made one by one in call
order. Calls on separate pool connections would commit in whatever order the database happens
to run them, so every write verb instead becomes a command on one in-process queue (the
*lane*), as in the SQLite store: one task takes everything queued, opens one transaction on
its connection, applies the commands in call order (merged into *stages* where that cannot
change an answer, see `plan_stages`), sends one `pg_notify` batch, commits once and only then
resolves the callers' futures. On two cores the per-statement and per-commit costs are what
limits throughput, and a lane amortizes both: a batch of a few hundred commands costs one
commit, and a stage of many step records costs one statement (`ergon_record_steps`, a function
of migration 2). A batch of step records alone runs that statement without BEGIN and COMMIT
around it: the usual batch while one flow runs its steps, three round trips fewer each. Reads
bypass the lane and run on the pool's other connections.

Processes sharing the database (replicas). Nothing coordinates them but the database, so:
- Every transaction runs at READ COMMITTED, whatever the database or role defaults to: each
  statement sees what was committed before it started, so what a transaction reads after a
  row lock includes everything the lock's previous holder wrote.
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
registered, a RUNNING flow's wait was satisfied or its cancel requested, a lease expired, a
flow ended) and sends them with `pg_notify` on one channel inside the transaction, so they are
delivered only if it commits. A payload is a compact JSON list of events (`_encode_events`),
split below PostgreSQL's 8000-byte limit. `subscribe` LISTENs on a dedicated connection that
reconnects by itself; events sent while it was away are lost (they are hints), so after a
reconnect it delivers READY, TIMER and EVENTS_LOST to make the engine look again.

Errors. asyncpg and OS errors never leave this module: a lost or refused connection, a server
shutting down or refusing connections, too many connections, a full disk, a closed pool become
`StoreUnavailableError`; anything else `StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, cast

import asyncpg

from ergon_server.errors import (
    ErgonError,
    InvalidArgumentError,
    StoreError,
    StoreUnavailableError,
)
from ergon_server.model import (
    CANCEL_KEY,
    ClaimedFlow,
    EntryStatus,
    FlowPage,
    FlowRecord,
    FlowStatus,
    JournalRecord,
    Lease,
    NewFlow,
    Satisfied,
    ScheduleOutcome,
    ScheduleResult,
    SignalOutcome,
    SignalResult,
    StepRecord,
    StoreEvent,
    StoreEventKind,
    WriteOutcome,
)
from ergon_server.storage._batched import (
    CANCELLED,
    FLOW,
    FLOW_COLUMNS,
    HISTORY_SELECT,
    JOURNAL_COLUMNS,
    JOURNAL_ROW,
    NO_TIME,
    OPEN,
    SATISFIED,
    TERMINAL,
    AnyCommand,
    BatchedStore,
    CancelFlow,
    Command,
    CommandSet,
    FinishFlows,
    FlowState,
    ParkFlows,
    RegisterWaits,
    RenewLeases,
    ScheduleFlowsCommand,
    Sim,
    SuspendFlows,
    failure_to_json,
    flow_from_row,
    flow_resources,
    history_from_row,
    journal_from_row,
    labels_json,
    plan_schedule,
    plan_stages,
    policy_from_json,
    policy_to_json,
    satisfy_signal_waits,
    unique,
)
from ergon_server.storage._checks import (
    check_limit,
    check_text,
    check_texts,
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


def _connection_gone(exc: BaseException) -> bool:
    """Whether `exc` says the connection (or the pool) failed, rather than a statement."""
    if isinstance(exc, asyncpg.InterfaceError):
        return any(word in str(exc).lower() for word in _GONE_MESSAGES)
    if isinstance(exc, asyncpg.PostgresError):
        # Connection exceptions (08) and the server ending the session (57P01-57P03).
        return (exc.sqlstate or "").startswith(("08", "57P"))
    return isinstance(exc, OSError | asyncpg.exceptions.InternalClientError)


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
        if _connection_gone(exc):
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


def _literal(text: str) -> str:
    """`text` as a PostgreSQL string constant, whatever `standard_conforming_strings` says."""
    if "\x00" in text:
        raise ValueError("a PostgreSQL string cannot hold NUL")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


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
    StoreEventKind.LEASE_EXPIRED: "X",
}
_EVENT_KINDS = {code: kind for kind, code in _EVENT_CODES.items()}


def _encode_events(
    events: Iterable[StoreEvent], limit: int = _MAX_PAYLOAD, origin: str = ""
) -> list[str]:
    """Pack events into as few NOTIFY payloads of at most `limit` bytes as fit.

    A payload is a JSON list of lists: ["R"], ["T"], ["W", flow_id, lease_token, key],
    ["C", flow_id, lease_token], ["X", flow_id, lease_token], ["E", flow_id]. ASCII-only
    JSON, so characters are bytes.
    With an `origin`, each payload starts with ["O", origin], naming the store instance
    that sent it (a decoder that does not know "O" skips it). An event too big for any
    payload (a huge flow_id) is dropped: events are hints.
    """
    head = [json.dumps(["O", origin], separators=(",", ":"), ensure_ascii=True)] if origin else []
    base = 2 + sum(len(h) for h in head)  # "[", "]" and the head
    after_head = 1 if head else 0  # the comma between the head and the first event
    payloads: list[str] = []
    parts: list[str] = []
    used = base
    for event in events:
        code = _EVENT_CODES[event.kind]
        item: list[object] = [code]
        if event.kind is StoreEventKind.WAKEUP:
            item += [event.flow_id, event.lease_token, event.key]
        elif event.kind in (StoreEventKind.CANCEL_REQUESTED, StoreEventKind.LEASE_EXPIRED):
            item += [event.flow_id, event.lease_token]
        elif event.kind is StoreEventKind.ENDED:
            item.append(event.flow_id)
        part = json.dumps(item, separators=(",", ":"), ensure_ascii=True)
        if base + after_head + len(part) > limit:
            _log.debug("dropping a store event too big to notify: %s...", part[:100])
            continue
        if parts and used + 1 + len(part) > limit:
            payloads.append("[" + ",".join(head + parts) + "]")
            parts, used = [], base
        used += len(part) + (1 if parts else after_head)
        parts.append(part)
    if parts:
        payloads.append("[" + ",".join(head + parts) + "]")
    return payloads


def _decode_events(payload: str, ignore_origin: str = "") -> list[StoreEvent]:
    """The events of one payload; anything malformed (another writer's NOTIFY) is skipped.

    A payload whose origin is `ignore_origin` (this store's own changes) gives no events.
    """
    try:
        items = json.loads(payload)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    if ignore_origin and items and items[0] == ["O", ignore_origin]:
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
            elif kind in (StoreEventKind.CANCEL_REQUESTED, StoreEventKind.LEASE_EXPIRED):
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

    def lease_expired(self, flow_id: str, lease_token: int) -> None:
        self.items[StoreEvent(StoreEventKind.LEASE_EXPIRED, flow_id, lease_token)] = None

    def events(self) -> list[StoreEvent]:
        events: list[StoreEvent] = []
        if self.ready:
            events.append(StoreEvent(StoreEventKind.READY))
        if self.timer:
            events.append(StoreEvent(StoreEventKind.TIMER))
        return events + list(self.items)


class _Tx:
    """One transaction of the lane: its connection, the flows it has locked, its events."""

    __slots__ = ("conn", "events", "final_steps", "locked")

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.events = _Events()
        # Flows whose row this transaction holds FOR UPDATE (or inserted itself).
        self.locked: set[str] = set()
        # (flow_id, key) of step entries this transaction recorded with a final status: a
        # finish that requires them needs no read (a final entry is never rewritten).
        self.final_steps: set[tuple[str, str]] = set()

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

    async def commit(self, channel: str, origin: str) -> None:
        """Send this transaction's events (from `origin`) and commit, in one round trip.

        PostgreSQL delivers the notifications only if the commit succeeds. The payloads go as
        string constants, so NOTIFY and COMMIT make one simple-protocol message: a statement
        with parameters would cost a round trip of its own.
        """
        payloads = _encode_events(self.events.events(), origin=origin)
        notify = "".join(
            f"SELECT pg_notify({_literal(channel)}, {_literal(payload)});" for payload in payloads
        )
        await self.conn.execute(notify + "COMMIT")


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

# A flow's OPEN waits, and cancelling those of ended flows (the partial index of migration 3).
_OPEN_WAITS = f"SELECT {_WAIT_COLUMNS} FROM waits AS w WHERE w.flow_id = $1 AND w.status = 'OPEN'"
_CANCEL_OPEN_WAITS = (
    "UPDATE waits SET status = 'CANCELLED' WHERE flow_id = ANY($1::text[]) AND status = 'OPEN'"
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


class _FlowState(FlowState):
    """A flow as a stage simulates it, read from a row of `_STATE_SQL`."""

    __slots__ = ()

    def __init__(self, row: _Row) -> None:
        self.status = row[1]
        self.lease_token = row[2]
        self.lease_owner = row[3]
        self.journal_seq = row[4]
        self.parks = row[5]
        self.attempt = row[6]
        self.cancel_requested = row[7]
        self.open_waits = row[8]
        self.waited_on = row[9]
        self.cancel_error = row[10]


class _Sim(Sim):
    """A stage's simulation (`Sim`) on PostgreSQL.

    It locks each flow before reading it (`load`), reads waits by `unnest` pairs, and records
    the stage's notifications in the transaction's events.
    """

    def __init__(self, tx: _Tx) -> None:
        super().__init__()
        self.tx = tx
        self.conn = tx.conn

    # The stage's notifications go to the transaction's events.

    def on_ready(self) -> None:
        self.tx.events.ready = True

    def on_wakeup(self, flow_id: str, lease_token: int, key: str) -> None:
        self.tx.events.wakeup(flow_id, lease_token, key)

    def on_ended(self, flow_id: str) -> None:
        self.tx.events.ended(flow_id)

    def on_cancel_requested(self, flow_id: str, lease_token: int) -> None:
        self.tx.events.cancel_requested(flow_id, lease_token)

    def on_timer(self) -> None:
        # Another replica's timer loop may be sleeping past this fire time.
        self.tx.events.timer = True

    async def load(self, flow_ids: Iterable[str]) -> None:
        """Lock and read the state of the flows not read yet (None for a missing flow)."""
        missing = [flow_id for flow_id in unique(flow_ids) if flow_id not in self.states]
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
        missing = [child for child in unique(child_ids) if child not in self.links]
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
            if wait is not None and wait.status != SATISFIED:
                self.links[child].append((flow_id, key))
        for child in missing:
            self.links[child].sort()

    async def cancel_errors(self, flow_id: str) -> list[str | None]:
        """The `error` of the flow's CANCEL entry in the database: empty if it has none."""
        rows = await self.conn.fetch(
            "SELECT error FROM journal WHERE flow_id = $1 AND key = $2", flow_id, CANCEL_KEY
        )
        return [row[0] for row in rows]

    async def load_open_waits(self, flow_id: str) -> None:
        """Read the flow's OPEN waits into `waits` (the stage's own changes win)."""
        for row in await self.conn.fetch(_OPEN_WAITS, flow_id):
            self.cache_wait(row)

    async def journal_entries(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], JournalRecord]:
        """The journal entries in the database of these (flow_id, key) pairs, where they exist."""
        return await _journal_entries(self.tx, pairs)

    async def final_entries(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which pairs have a final entry; those this transaction recorded final cost no read."""
        known = self.tx.final_steps
        final = {pair for pair in pairs if pair in known}
        rest = [pair for pair in pairs if pair not in final]
        return final | (await super().final_entries(rest) if rest else set())

    async def schedule(self, items: Sequence[tuple[NewFlow, int]]) -> list[ScheduleResult]:
        """Schedule flows (each with its now_ms) in order, as `schedule_flows` would."""
        return await _schedule(self.tx, items)

    async def consume_signal(self, flow_id: str, name: str, key: str, now_ms: int) -> bytes | None:
        """Consume the oldest unconsumed signal of the mailbox into `key`; its payload or None."""
        return await _consume_signal(self.tx, flow_id, name, key, now_ms)

    async def child_outcome(self, child_flow_id: str) -> list[tuple[str, bytes | None, str | None]]:
        """The (status, result, error) of a child flow, as a list: empty if it does not exist.

        The child is locked before its status is read: a replica ending it at this moment
        either has committed (and the read sees the end) or waits for this transaction (and
        then finds the parent's wait when it looks for its parents).
        """
        await self.tx.lock([child_flow_id])
        rows = await self.conn.fetch(
            "SELECT status, result, error FROM flows WHERE flow_id = $1", child_flow_id
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def flush(self) -> None:
        """Write the stage's net effect."""
        conn = self.conn
        for names, rows in self.update_groups().items():
            assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(names, 1))
            await conn.executemany(
                f"UPDATE flows SET {assignments} WHERE flow_id = ${len(names) + 1}", rows
            )
        if self.records:
            await conn.executemany(_INSERT_ENTRY, self.entry_rows())
        if self.trims:
            trimmed = {flow_id for flow_id, _ in self.trims}
            self.tx.final_steps = {p for p in self.tx.final_steps if p[0] not in trimmed}
            # Entries recorded after the retry (higher sequences) are kept.
            await conn.executemany(
                "DELETE FROM journal WHERE flow_id = $1 AND status = 'FAILED' AND sequence <= $2",
                self.trims,
            )
        if self.dirty:
            await conn.executemany(_UPSERT_WAIT, self.wait_rows())
        if self.ended:
            await conn.execute(_CANCEL_OPEN_WAITS, self.ended)


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
        f"SELECT j.flow_id, {JOURNAL_ROW} FROM {_PAIRS} JOIN journal AS j "
        "ON j.flow_id = p.flow_id AND j.key = p.key",
        *_pair_params(wanted),
    )
    return {(row[0], row[2]): journal_from_row(row, 1) for row in rows}


# --- write commands ----------------------------------------------------------------------

# What a schedule compares against, in one round trip: the flows it names (type, input) and
# the request ids it carries (their flows).
_SCHEDULE_READ = (
    "SELECT true, flow_id, flow_type, input FROM flows WHERE flow_id = ANY($1::text[]) "
    "UNION ALL "
    "SELECT false, request_id, flow_id, NULL FROM request_ids WHERE request_id = ANY($2::text[])"
)

# The new flows and the new request ids, in one round trip. The request ids' foreign key is
# checked at the end of the statement, when the flows it names exist.
_SCHEDULE_WRITE = (
    "WITH f AS ("
    "INSERT INTO flows (flow_id, flow_type, status, input, attempt, labels, retry_policy, "
    "created_at, updated_at, ready_at, parent_flow_id, parent_key) "
    "SELECT t.flow_id, t.flow_type, 'PENDING', t.input, 1, t.labels, t.retry_policy, t.now, "
    "t.now, t.ready_at, t.parent_flow_id, t.parent_key "
    "FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::bigint[], "
    "$7::bigint[], $8::text[], $9::text[]) "
    "AS t(flow_id, flow_type, input, labels, retry_policy, now, ready_at, parent_flow_id, "
    "parent_key) "
    "ON CONFLICT (flow_id) DO NOTHING RETURNING flow_id), "
    "r AS ("
    "INSERT INTO request_ids (request_id, flow_id) "
    "SELECT * FROM unnest($10::text[], $11::text[]) "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id) "
    "SELECT true, flow_id FROM f UNION ALL SELECT false, request_id FROM r"
)


async def _schedule(tx: _Tx, items: Sequence[tuple[NewFlow, int]]) -> list[ScheduleResult]:
    """Schedule flows in order, simulating the rows they create so duplicates see each other.

    The reads take no lock: rows that exist never change what a schedule compares (type,
    input, a request's flow). A row another replica inserts after them makes an insert below
    skip it, and the transaction runs again (`_RetryTransaction`).
    """
    conn = tx.conn
    existing: dict[str, tuple[str, bytes]] = {}
    requests: dict[str, str] = {}
    for is_flow, key, text, payload in await conn.fetch(
        _SCHEDULE_READ,
        unique(flow.flow_id for flow, _ in items),
        unique(flow.request_id for flow, _ in items if flow.request_id),
    ):
        if is_flow:
            existing[key] = (text, payload)
        else:
            requests[key] = text
    plan = plan_schedule(items, existing, requests)
    new_flows = [
        (
            flow.flow_id,
            flow.flow_type,
            flow.input,
            labels_json(flow.labels),
            policy_to_json(flow.retry_policy),
            now_ms,
            ready_at,
            flow.parent_flow_id or None,
            flow.parent_key or None,
        )
        for flow, now_ms, ready_at in plan.created
    ]
    # In request_id order, as another replica inserting some of the same ids does, so the two
    # wait for each other instead of deadlocking.
    new_requests = sorted(plan.requests)
    if new_flows or new_requests:
        # One array per column ($1-$9, empty when only request ids are new); unnest keeps
        # their order, so seq follows scheduling order.
        columns = [list(column) for column in zip(*new_flows, strict=True)] or [[]] * 9
        inserted = await conn.fetch(
            _SCHEDULE_WRITE,
            *columns,
            [pair[0] for pair in new_requests],
            [pair[1] for pair in new_requests],
        )
        flow_ids = [row[1] for row in inserted if row[0]]
        if len(flow_ids) != len(new_flows):
            raise _RetryTransaction("a flow_id was scheduled concurrently")
        if len(inserted) - len(flow_ids) != len(new_requests):
            raise _RetryTransaction("a request_id was used concurrently")
        tx.locked.update(flow_ids)
        if flow_ids:
            tx.events.ready = True
    return plan.results


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
    if status in TERMINAL:
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
    return await satisfy_signal_waits(
        sim,
        flow_id,
        waits,
        sequence,
        lambda key: _consume_signal(tx, flow_id, name, key, now_ms),
        now_ms,
    )


class _ScheduleFlows(ScheduleFlowsCommand):
    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Schedule every command's flows with one round of reads and inserts."""
        cls.hand_out(commands, await _schedule(tx, cls.items(commands)))


# The fence and the upserts of a stage of step results (migration 0002).
_RECORD_STEPS = (
    "SELECT outcome FROM ergon_record_steps($1::text[], $2::bigint[], $3::text[], $4::text[], "
    "$5::text[], $6::bytea[], $7::text[], $8::integer[], $9::text[], $10::bigint[])"
)


class _RecordSteps(Command[list[WriteOutcome]]):
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
        return flow_resources(record.flow_id for record in self.records)

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Fence and upsert every record in one statement (`ergon_record_steps`), in order.

        Step records never change a flow's status or token, so fencing each against the
        flow's current row is fencing the whole stage against one snapshot.
        """
        rows = [(command, record) for command in commands for record in command.records]
        answers = iter(
            await tx.conn.fetch(
                _RECORD_STEPS,
                [record.flow_id for _, record in rows],
                [record.lease_token for _, record in rows],
                [record.key for _, record in rows],
                [record.kind.value for _, record in rows],
                [record.status.value for _, record in rows],
                [record.result for _, record in rows],
                [failure_to_json(record.error) for _, record in rows],
                [record.attempts for _, record in rows],
                [record.args_hash for _, record in rows],
                [command.now_ms for command, _ in rows],
            )
            if rows
            else []
        )
        for command in commands:
            outcomes = [WriteOutcome(next(answers)[0]) for _ in command.records]
            for record, outcome in zip(command.records, outcomes, strict=True):
                if outcome is not WriteOutcome.NOT_FOUND:
                    tx.locked.add(record.flow_id)
                # OK with a final status: the entry is final now, this one or an earlier
                # final entry the upsert left alone.
                if outcome is WriteOutcome.OK and record.status.final:
                    tx.final_steps.add((record.flow_id, record.key))
            command.result = outcomes


class _OnSim:
    """Runs a `SimCommand`'s stage on this dialect's `_Sim`."""

    __slots__ = ()

    @classmethod
    def new_sim(cls, tx: _Tx) -> _Sim:
        return _Sim(tx)


class _FinishFlows(_OnSim, FinishFlows):
    __slots__ = ()


class _ReleaseFlows(Command[list[WriteOutcome]]):
    __slots__ = ("leases", "now_ms")
    mergeable = True

    def __init__(
        self, future: asyncio.Future[list[WriteOutcome]], leases: Sequence[Lease], now_ms: int
    ) -> None:
        super().__init__(future)
        self.leases = leases
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return flow_resources(lease.flow_id for lease in self.leases)

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


class _ClaimFlows(Command[list[ClaimedFlow]]):
    __slots__ = ("flow_types", "lease_expires_at", "limit", "now_ms", "session_id")
    barrier = True
    urgent = True

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
                f"SELECT flow_id, {JOURNAL_COLUMNS} FROM journal "
                "WHERE flow_id = ANY($1::text[]) ORDER BY flow_id, sequence",
                with_history,
            ):
                journals[row[0]].append(journal_from_row(row, 1))
        return [
            ClaimedFlow(
                flow_id=row[2],
                flow_type=row[3],
                input=row[4],
                lease_token=row[5],
                attempt=row[6],
                retry_policy=policy_from_json(row[7]),
                journal=journals[row[2]],
                ready_at=row[0],
            )
            for row in claimed
        ]


class _RenewLeases(RenewLeases):
    __slots__ = ()

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Extend the session's leases through the partial index on lease_owner."""
        for command in commands:
            # Renewed by owner only (a restart, ExtendLease), the rows are locked here, after
            # the batch's own: a deadlock with another replica is possible, and detected, and
            # the batch runs again. A row that changed while waiting is re-checked.
            status = await tx.conn.execute(
                "WITH mine AS (SELECT seq FROM flows WHERE status = 'RUNNING' "
                "AND lease_owner = $2 AND ($3::text[] IS NULL OR flow_id = ANY($3::text[])) "
                "ORDER BY flow_id FOR UPDATE) "
                "UPDATE flows AS f SET lease_expires_at = $1 FROM mine WHERE f.seq = mine.seq",
                command.lease_expires_at,
                command.session_id,
                None if command.flow_ids is None else list(command.flow_ids),
            )
            command.result = _row_count(status)


# The soonest expired first, through the partial index on lease_expires_at: a scan after a
# long outage re-queues a bounded batch per transaction, not every running flow at once.
_EXPIRE = (
    "WITH due AS (SELECT seq, lease_expires_at FROM flows WHERE status = 'RUNNING' "
    "AND lease_expires_at < $1 ORDER BY lease_expires_at, seq LIMIT $2 "
    "FOR UPDATE SKIP LOCKED) "
    "UPDATE flows AS f SET status = 'PENDING', ready_at = $1, updated_at = $1, "
    "lease_owner = NULL, lease_expires_at = NULL FROM due WHERE f.seq = due.seq "
    "RETURNING due.lease_expires_at, f.seq, f.flow_id, f.lease_token"
)


class _ExpireLeases(Command[list[Lease]]):
    __slots__ = ("limit", "now_ms")
    barrier = True

    def __init__(self, future: asyncio.Future[list[Lease]], now_ms: int, limit: int) -> None:
        super().__init__(future)
        self.now_ms = now_ms
        self.limit = limit

    @classmethod
    async def apply_all(cls, tx: _Tx, commands: Sequence[Self]) -> None:
        """Re-queue up to `limit` expired leases, the soonest expired first.

        A flow another replica is writing at this moment is skipped, not waited for: it is
        re-queued by a later scan if its lease is still expired then. Each expired lease is
        notified (LEASE_EXPIRED): the session holding it may be on another replica, which
        must tell its worker to stop.
        """
        for command in commands:
            rows = await tx.conn.fetch(_EXPIRE, command.now_ms, command.limit)
            ordered = sorted(rows, key=lambda row: (row[0], row[1]))
            command.result = [Lease(row[2], row[3]) for row in ordered]
            if rows:
                tx.locked.update(row[2] for row in ordered)
                tx.events.ready = True
                for row in ordered:
                    tx.events.lease_expired(row[2], row[3])


class _ReattachLeases(Command[list[str]]):
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
        return flow_resources(lease.flow_id for lease in self.leases)

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
            moved = unique(
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


class _CancelFlow(_OnSim, CancelFlow):
    __slots__ = ()


class _SendSignal(Command[SignalResult]):
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
        return flow_resources([self.flow_id])

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


class _SignalWithSchedule(Command[tuple[ScheduleResult, SignalResult]]):
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


class _RegisterFlowTypes(Command[None]):
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


class _RegisterWaits(_OnSim, RegisterWaits):
    __slots__ = ()


class _RegisterWaitsBarrier(_RegisterWaits):
    """Registers CHILD waits whose child has a request id, which may name any flow."""

    __slots__ = ()
    barrier = True


class _SuspendFlows(_OnSim, SuspendFlows):
    __slots__ = ()


class _FireTimers(Command[list[Satisfied]]):
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
            flow_ids = unique(row[1] for row in rows)
            await tx.lock(flow_ids, skip_locked=True)
            mine = [(row[1], row[2]) for row in rows if row[1] in tx.locked]
            await sim.load(pair[0] for pair in mine)
            await sim.load_waits(mine)
            for row in rows:
                if len(fired) == self.limit:
                    break
                flow_id, key = row[1], row[2]
                wait = sim.waits.get((flow_id, key))
                if flow_id not in tx.locked or wait is None or wait.status != OPEN:
                    continue
                state = sim.states.get(flow_id)
                if state is None or state.status in TERMINAL:
                    sim.set_wait(flow_id, key, wait, CANCELLED)
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


class _ParkFlows(_OnSim, ParkFlows):
    __slots__ = ()


async def _lock_batch(tx: _Tx, batch: Sequence[AnyCommand]) -> dict[str, set[str]]:
    """Lock every flow a batch may write, in one statement; return the parents of its ends.

    The result maps each flow the batch may end to the flows whose CHILD waits name it.
    Ending a child writes its waiting flows (their entries, their status), so those are
    locked with the batch's own flows (all in flow_id order, the order every writer uses), and
    the planner must order the child's end against the batch's other commands on them. The
    waits in the database, plus those the batch itself may create, cover every such flow: a
    wait's child never changes and wait rows are never deleted. (The waits are read without
    locks: they only order this process's commands; the commands lock what they write.)
    """
    ending = unique(flow_id for command in batch for flow_id in command.ending_flows())
    links: dict[str, set[str]] = {}
    for command in batch:
        for child, waiting in command.child_links():
            links.setdefault(child, set()).add(waiting)
    names = _batch_flows(batch, links)
    if not ending:
        await tx.lock(names)
        return {}
    rows = await tx.conn.fetch(
        "WITH parents AS (SELECT child_flow_id, flow_id FROM waits "
        "WHERE kind = 'CHILD' AND child_flow_id = ANY($2::text[])), "
        "locked AS (SELECT flow_id FROM flows "
        "WHERE flow_id = ANY($1::text[] || ARRAY(SELECT flow_id FROM parents)) "
        "ORDER BY flow_id FOR UPDATE) "
        "SELECT NULL, flow_id FROM locked UNION ALL SELECT child_flow_id, flow_id FROM parents",
        names,
        ending,
    )
    for child, flow_id in rows:
        if child is None:
            tx.locked.add(flow_id)
        else:
            links.setdefault(child, set()).add(flow_id)
    return links


def _batch_flows(batch: Sequence[AnyCommand], links: dict[str, set[str]]) -> list[str]:
    """The flows a batch may write that it names (and the parents of flows it may end), sorted."""
    names: set[str] = set()
    for command in batch:
        if not command.writes_named_flows:
            # A schedule: locking the flows it names would cost a round trip, usually to lock
            # nothing. (A new request id for an existing flow takes that row's key-share lock
            # when inserted; a rare deadlock there is detected and the batch runs again, as
            # for the locks found later.)
            continue
        for name in command.resources():
            if name.startswith(FLOW):
                names.add(name[len(FLOW) :])
        for flow_id in command.ending_flows():
            names.update(links.get(flow_id, ()))
    return sorted(names)


# --- migrations --------------------------------------------------------------------------


class _PostgresMigrationTarget:
    """The migration runner's view of a connection.

    Every step holds a transaction-level advisory lock, so replicas starting together take
    turns: the first applies a file, the others find its version recorded and apply nothing.
    The transactions are READ COMMITTED: the version is read after the lock is granted, and
    must include what the previous holder committed.
    """

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    async def ensure_version_table(self) -> None:
        # Two CREATE TABLE IF NOT EXISTS running at once can both try to create the type.
        async with self._conn.transaction(isolation="read_committed"):
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await self._conn.execute(SCHEMA_VERSION_DDL)

    async def current_version(self) -> int:
        version = await self._conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(version)

    async def apply(self, migration: Migration) -> None:
        async with self._conn.transaction(isolation="read_committed"):
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if await self.current_version() < migration.version:
                # No parameters: the simple query protocol runs the whole file.
                await self._conn.execute(migration.sql)
                await self._conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection's reset on release, after asyncpg's own (which rolls back).

    asyncpg's default also unlocks session advisory locks, closes cursors, UNLISTENs and
    RESETs settings: one more round trip per release, about three per flow. This store leaves
    none of those on a pooled connection (its advisory locks are transaction-scoped, it
    LISTENs on a connection of its own and sets nothing), so there is nothing to undo.
    """


# --- LISTEN ----------------------------------------------------------------------------------


class _Listener:
    """A dedicated LISTEN connection that reconnects by itself.

    Silence is not proof of life, so an idle connection is pinged every `keepalive_s`; a ping
    that fails or a connection that closes starts a reconnect loop with capped backoff. After
    a reconnect, READY, TIMER and EVENTS_LOST are delivered, since events sent meanwhile were
    lost.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        channel: str,
        deliver: Callable[[StoreEvent], None],
        keepalive_s: float,
        origin: str,
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._deliver = deliver
        self._origin = origin
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
        for event in _decode_events(str(payload), ignore_origin=self._origin):
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
            self._deliver(StoreEvent(StoreEventKind.EVENTS_LOST))

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


class PostgresStore(BatchedStore):
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
            (application_name "ergon-server", idle_in_transaction_session_timeout 60 s);
            default_transaction_isolation is always "read committed", which the store's
            locking relies on.
    """

    shared = True  # replicas share the database

    _commands = CommandSet(
        register_flow_types=_RegisterFlowTypes,
        schedule_flows=_ScheduleFlows,
        claim_flows=_ClaimFlows,
        record_steps=_RecordSteps,
        finish_flows=_FinishFlows,
        release_flows=_ReleaseFlows,
        renew_leases=_RenewLeases,
        reattach_leases=_ReattachLeases,
        expire_leases=_ExpireLeases,
        cancel_flow=_CancelFlow,
        send_signal=_SendSignal,
        signal_with_schedule=_SignalWithSchedule,
        register_waits=_RegisterWaits,
        register_waits_barrier=_RegisterWaitsBarrier,
        suspend_flows=_SuspendFlows,
        fire_timers=_FireTimers,
        park_flows=_ParkFlows,
    )
    _dialect = "postgres"
    _committer_noun = "lane"
    _log = logging.getLogger(__name__)

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
        super().__init__(max_batch)
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._retries = retries
        self._channel = channel
        # Names this instance's notifications, so its own listener skips them: the engine
        # above already acted on its own changes (as it must on SQLite, which has no hints).
        self._origin = uuid.uuid4().hex
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._server_settings = {
            "application_name": "ergon-server",
            # A replica that stalls inside a transaction (a partition, a frozen process) must
            # not hold its row locks, and so the other replicas, for longer than this.
            "idle_in_transaction_session_timeout": "60000",
            **(server_settings or {}),
            # Fixed, whatever the database or role defaults to: a lane transaction reads
            # other tables after taking a flow's row lock, and must see what the lock's
            # previous holder committed (READ COMMITTED takes a snapshot per statement). Under
            # REPEATABLE READ it would read them as they were before the lock wait, and a
            # signal sent meanwhile by another replica would be missed by a wait registered
            # now. The lane's BEGIN names the level too; this covers the single-statement
            # step records and the reads.
            "default_transaction_isolation": "read committed",
        }
        self._pool: asyncpg.Pool | None = None
        # The lane's connection, held across batches (released on errors and at close).
        self._writer: _Conn | None = None
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
                    reset=_keep_session,
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
            self._start_committer("ergon-postgres-lane")

    async def close(self) -> None:
        """Commit every queued write, then close the connections. Idempotent."""
        async with self._lifecycle:
            await self._stop_committer()
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

    async def _run(self, batch: Sequence[AnyCommand]) -> None:
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

    async def _transaction(self, batch: Sequence[AnyCommand]) -> None:
        conn = await self._writer_connection()
        if all(isinstance(command, _RecordSteps) for command in batch):
            # Step results alone are one statement (`_RecordSteps`), atomic by itself: no
            # BEGIN and COMMIT round trips. Nothing to notify: they change no flow's state.
            try:
                await _RecordSteps.apply_all(_Tx(conn), cast(Sequence[_RecordSteps], batch))
            except Exception as exc:
                if not _connection_gone(exc):
                    raise
                # The held connection died (while idle, or under the statement): whether the
                # statement committed is unknown, and running it again is safe (an upsert
                # leaves the entries it wrote alone).
                raise _StaleConnection() from exc
            return
        # BEGIN and COMMIT by hand, not with asyncpg's `Transaction`: the commit goes in one
        # message with the notifications (`_Tx.commit`), which that class cannot do.
        try:
            await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        except Exception as exc:
            # The held connection died while idle (a server restart, an idle timeout): no
            # statement of the batch ran, so running it again on a fresh connection is safe.
            raise _StaleConnection() from exc
        tx = _Tx(conn)
        try:
            links: dict[str, set[str]] = {}
            if len(batch) > 1:
                links = await _lock_batch(tx, batch)
            for stage in plan_stages(batch, links):
                await type(stage[0]).apply_all(tx, stage)
            await tx.commit(self._channel, self._origin)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            raise

    # --- reads ---

    def _reader(self) -> asyncpg.Pool:
        if not self._accepting or self._pool is None:
            raise StoreUnavailableError("the postgres store is not open")
        return self._pool

    def _check_open(self) -> None:
        """Raise `StoreUnavailableError` unless the store serves calls (its pool is open)."""
        self._reader()

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
        check_text(flow_id, "a flow_id")
        rows = await self._read(f"SELECT {FLOW_COLUMNS} FROM flows WHERE flow_id = $1", flow_id)
        return flow_from_row(rows[0]) if rows else None

    async def list_flows(
        self,
        statuses: Sequence[FlowStatus],
        flow_type: str | None,
        limit: int,
        cursor: int | None,
    ) -> FlowPage:
        """Flows in scheduling order, filtered (empty statuses / None type: any), paged."""
        check_limit(limit)
        check_text(flow_type or "", "a flow_type")
        where = ["seq > $1"]
        params: list[object] = [cursor if cursor is not None else 0]
        wanted = unique(status.value for status in statuses)
        if wanted:
            params.append(wanted)
            where.append(f"status = ANY(${len(params)}::text[])")
        if flow_type is not None:
            params.append(flow_type)
            where.append(f"flow_type = ${len(params)}")
        params.append(limit + 1)
        rows = await self._read(
            f"SELECT {FLOW_COLUMNS} FROM flows WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT ${len(params)}",
            *params,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return FlowPage(
            flows=[flow_from_row(row) for row in rows],
            next_cursor=rows[-1][0] if more else None,
        )

    async def get_history(
        self, flow_id: str, after_sequence: int, limit: int
    ) -> list[JournalRecord]:
        """Journal entries of the flow with sequence > after_sequence, in order, at most limit."""
        check_limit(limit)
        check_text(flow_id, "a flow_id")
        rows = await self._read(
            f"{HISTORY_SELECT} WHERE j.flow_id = $1 AND j.sequence > $2 "
            "ORDER BY j.sequence LIMIT $3",
            flow_id,
            after_sequence,
            limit,
        )
        return [history_from_row(row) for row in rows]

    async def get_entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """One journal entry of a flow, or None."""
        check_text(flow_id, "a flow_id")
        check_text(key, "a key")
        rows = await self._read(
            f"SELECT {JOURNAL_COLUMNS} FROM journal WHERE flow_id = $1 AND key = $2",
            flow_id,
            key,
        )
        return journal_from_row(rows[0]) if rows else None

    async def count_flows(self) -> dict[tuple[FlowStatus, str], int]:
        """How many flows there are, by status and flow type (a full scan: call sparingly)."""
        rows = await self._read(
            "SELECT status, flow_type, COUNT(*) FROM flows GROUP BY status, flow_type"
        )
        return {(FlowStatus(row[0]), row[1]): row[2] for row in rows}

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        check_texts(flow_types, "a flow_type")
        types = unique(flow_types)
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
        check_texts(flow_types, "a flow_type")
        types = unique(flow_types)
        rows = await self._read(
            "SELECT flow_type FROM flow_types WHERE flow_type = ANY($1::text[])", types
        )
        return {row[0] for row in rows}

    async def next_timer_at(self, after_ms: int | None = None) -> int | None:
        """The earliest fire_at among open TIMER waits (later than `after_ms` if given), or None."""
        rows = await self._read(
            "SELECT MIN(fire_at) FROM waits WHERE status = 'OPEN' AND kind = 'TIMER' "
            "AND fire_at > $1",
            NO_TIME if after_ms is None else after_ms,
        )
        value = rows[0][0]
        return int(value) if value is not None else None

    # --- notifications ---

    async def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Deliver hints of changes other store instances made through this database (LISTEN).

        The first call opens a dedicated LISTEN connection (failing if it cannot); it
        reconnects by itself if dropped, and then delivers READY, TIMER and EVENTS_LOST since
        events sent meanwhile were lost. A listener must not block; its exceptions are logged.

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

        listening = _Listener(
            connect, self._channel, self._deliver, self._keepalive_s, self._origin
        )
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
