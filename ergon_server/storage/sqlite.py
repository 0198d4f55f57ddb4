"""The SQLite store: one file, WAL, and a group commit on one writer connection.

Writes. Every write verb becomes a command object on a queue and awaits its future. One
committer task takes everything queued (up to `max_batch` commands), opens one
`BEGIN IMMEDIATE` transaction, applies the commands, commits once (one fsync for the whole
batch) and only then resolves the futures. Each aiosqlite call is a hop to the connection's
thread, so commands are not applied one by one: the batch is first planned into *stages*, and
a stage applies many commands of one kind with a handful of statements (one fencing SELECT over
all flows of all step records, then one `executemany`).

Planning keeps the outcome identical to applying the commands one by one in queue order.
Commands touching disjoint flows commute, so a command may join an earlier stage of its kind
as long as no earlier command touching one of its flows sits in a later stage; commands whose
footprint is not a known set of flows (claims, lease expiry and renewal, timer firing) are
barriers that nothing crosses. Ending a flow also writes the flows whose CHILD waits name it
(their journal, their status), so before planning a batch reads, for the flows it may end,
which flows wait for them, and those count as touched too. Inside a stage the commands are
applied in queue order, repeated flows included: a stage simulates the states it reads
(`_Sim`: flows, journal sequences, waits) and writes the net effect at the end.

Group commit covers every verb, but only the hot ones (schedule, step records, finishes,
releases) merge into shared stages; the verbs of waits (register, suspend, signal, cancel,
park) each get a stage of their own inside the shared transaction.

If a batch fails, it is rolled back and nothing in it is reported applied. A failure that
retrying cannot cure right now (locked, disk full, I/O error) fails every command of the
batch; any other failure re-runs the commands one per transaction, so one bad command cannot
fail its neighbours.

Reads go to a small pool of separate connections, which in WAL mode see the last commit and
never wait for the writer.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import aiosqlite

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

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Row = Any

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
MEMORY_PATH = ":memory:"

# Bound parameters per IN (...) list: far below SQLite's limit, so one list never fails.
_IN_CHUNK = 500
# Above this many flow types a claim uses one IN list (which sorts) instead of one ordered
# index probe per type glued with UNION ALL (SQLite caps compound selects at 500 terms).
_MAX_UNION_TYPES = 64

_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

# Prefixes of error names (sqlite3.Error.sqlite_errorname, extended codes included) meaning
# "the store cannot do this right now" rather than "this request or the file is wrong".
_UNAVAILABLE_ERRORS = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
    "SQLITE_NOMEM",
    "SQLITE_READONLY",
)
# The same by message, for errors raised without a code.
_UNAVAILABLE_MESSAGES = (
    "database is locked",
    "database table is locked",
    "disk i/o error",
    "database or disk is full",
    "unable to open database",
    "attempt to write a readonly database",
    "out of memory",
)


def _translate(exc: BaseException) -> ErgonError:
    """Map a driver (or unexpected) exception to the store's error tree."""
    if isinstance(exc, ErgonError):
        return exc
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        message = str(exc)
        lowered = message.lower()
        unavailable = name.startswith(_UNAVAILABLE_ERRORS) or any(
            text in lowered for text in _UNAVAILABLE_MESSAGES
        )
        if unavailable:
            error: ErgonError = StoreUnavailableError(f"sqlite store unavailable: {message}")
        else:
            error = StoreError(f"sqlite store error: {message}")
    else:
        error = StoreError(f"sqlite store failed unexpectedly: {exc!r}")
    error.__cause__ = exc
    return error


def _fresh(error: ErgonError) -> ErgonError:
    """A copy of `error` so that many awaiting callers do not share one traceback."""
    copy = type(error)(error.message, error.reason)
    copy.__cause__ = error.__cause__
    return copy


# --- JSON codecs -------------------------------------------------------------------------


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


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _chunks(values: Sequence[_T]) -> Iterable[Sequence[_T]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


async def _fetch_in(
    conn: aiosqlite.Connection, sql: str, keys: Sequence[str], *extra: object
) -> list[_Row]:
    """Run `sql` (with one `{marks}` IN list) over `keys` in chunks, extra params first."""
    rows: list[_Row] = []
    for chunk in _chunks(keys):
        rows.extend(
            await conn.execute_fetchall(sql.format(marks=_marks(len(chunk))), (*extra, *chunk))
        )
    return rows


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


async def _fence(conn: aiosqlite.Connection, flow_ids: Iterable[str]) -> dict[str, list[Any]]:
    """Current [status, lease_token] of each named flow that exists."""
    rows = await _fetch_in(
        conn,
        "SELECT flow_id, status, lease_token FROM flows WHERE flow_id IN ({marks})",
        _unique(flow_ids),
    )
    return {row[0]: [row[1], row[2]] for row in rows}


# --- waits: a stage's view of the flows and waits it touches ------------------------------

_OPEN = "OPEN"
_SATISFIED = "SATISFIED"
_CANCELLED = "CANCELLED"

# Everything a stage needs to decide a flow's next state, in one probe per flow.
# (Each column costs more to carry out of aiosqlite than the probes: the flags share one.)
_STATE_SQL = (
    "SELECT flow_id, status, lease_token, lease_owner, journal_seq, parks, attempt, "
    "cancel_requested "
    "| (EXISTS (SELECT 1 FROM waits AS w WHERE w.flow_id = flows.flow_id "
    "AND w.status = 'OPEN') << 1) "
    "| (EXISTS (SELECT 1 FROM waits AS w WHERE w.child_flow_id = flows.flow_id "
    "AND w.kind = 'CHILD' AND w.status <> 'SATISFIED') << 2), "
    "CASE WHEN cancel_requested THEN (SELECT error FROM journal AS j "
    f"WHERE j.flow_id = flows.flow_id AND j.key = '{CANCEL_KEY}') END "
    "FROM flows WHERE flow_id IN ({marks})"
)

# A wait row, and whether its key has a journal entry already.
_WAIT_COLUMNS = (
    "w.flow_id, w.key, w.kind, w.status, w.fire_at, w.signal_name, w.child_flow_id, "
    "w.created_at, EXISTS (SELECT 1 FROM journal AS j WHERE j.flow_id = w.flow_id "
    "AND j.key = w.key)"
)

_INSERT_ENTRY = (
    "INSERT INTO journal (flow_id, key, sequence, kind, status, result, error, attempts, "
    "args_hash, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Inserts a new wait, or sets the status of an existing one (its other fields are kept from
# the first registration).
_UPSERT_WAIT = (
    "INSERT INTO waits (flow_id, key, kind, status, fire_at, signal_name, child_flow_id, "
    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (flow_id, key) DO UPDATE SET status = excluded.status"
)


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
        flags: int = row[7]
        self.cancel_requested = bool(flags & 1)
        # Whether the flow may have OPEN waits (to cancel when it ends).
        self.open_waits = bool(flags & 2)
        # Whether a wait not yet satisfied names the flow as its child.
        self.waited_on = bool(flags & 4)
        self.cancel_error: str | None = row[8]

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

    A stage reads each flow's state once (`load`), applies its commands in order to these
    simulated states, and `flush` writes the net effect with one `executemany` per statement
    shape. Reads of waits go through `waits`, where the stage's own changes win over the
    database. Signal rows and new flows are written at once instead (their reads are direct).
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
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
        """Read the state of the flows not read yet (None for a missing flow)."""
        missing = [flow_id for flow_id in _unique(flow_ids) if flow_id not in self.states]
        if not missing:
            return
        for flow_id in missing:
            self.states[flow_id] = None
        for row in await _fetch_in(self.conn, _STATE_SQL, missing):
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
            wait = _WaitRow(EntryKind(row[2]), row[3], row[4], row[5], row[6], row[7], bool(row[8]))
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
        """Read these waits into `waits` (absent ones stay absent)."""
        wanted = [pair for pair in dict.fromkeys(pairs) if pair not in self.waits]
        for chunk in _chunks(wanted):
            rows = await self.conn.execute_fetchall(
                _by_pairs(f"SELECT {_WAIT_COLUMNS} FROM {{pairs}} JOIN waits AS w", "w", chunk),
                [value for pair in chunk for value in pair],
            )
            for row in rows:
                self.cache_wait(row)

    async def load_links(self, child_ids: Iterable[str]) -> None:
        """Read the waits naming these flows as children, and their flows' states."""
        missing = [child for child in _unique(child_ids) if child not in self.links]
        if not missing:
            return
        for child in missing:
            self.links[child] = []
        rows = await _fetch_in(
            self.conn,
            f"SELECT {_WAIT_COLUMNS} FROM waits AS w WHERE w.kind = 'CHILD' "
            "AND w.status <> 'SATISFIED' AND w.child_flow_id IN ({marks})",
            missing,
        )
        for row in rows:
            self.cache_wait(row)
            self.links[row[6]].append((row[0], row[1]))
        for child in missing:
            self.links[child].sort()
        await self.load(row[0] for row in rows)

    def satisfy(
        self,
        flow_id: str,
        key: str,
        wait: _WaitRow,
        status: EntryStatus,
        result: bytes | None,
        error: Failure | None,
        now_ms: int,
    ) -> Satisfied | None:
        """Satisfy a wait (once): record its entry and wake its flow if it waited for it.

        Returns what to report: None when the wait was not OPEN (a CANCELLED wait gets its
        entry and leaves the flow alone) or when its key already had an entry.
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
            assignments = ", ".join(f"{name} = ?" for name in names)
            await conn.executemany(f"UPDATE flows SET {assignments} WHERE flow_id = ?", rows)
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
                "DELETE FROM journal WHERE flow_id = ? AND status = 'FAILED' AND sequence <= ?",
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
            await conn.executemany(
                "UPDATE waits SET status = 'CANCELLED' WHERE flow_id = ? AND status = 'OPEN'",
                [(flow_id,) for flow_id in self.ended],
            )


_JOURNAL_ROW = ", ".join("j." + column.strip() for column in _JOURNAL_COLUMNS.split(","))


def _by_pairs(select: str, alias: str, pairs: Sequence[tuple[str, str]]) -> str:
    """`select` (with a `{pairs}` table) restricted to these (flow_id, key) pairs.

    A join against a VALUES list probes the primary key once per pair, where SQLite would
    scan the table for `(flow_id, key) IN (VALUES ...)`.
    """
    values = "(VALUES " + ", ".join(["(?, ?)"] * len(pairs)) + ") AS pairs"
    return (
        select.format(pairs=values)
        + f" ON {alias}.flow_id = pairs.column1 AND {alias}.key = pairs.column2"
    )


async def _consume_signal(
    conn: aiosqlite.Connection, flow_id: str, name: str, key: str, now_ms: int
) -> bytes | None:
    """Consume the oldest unconsumed signal of the mailbox into `key`; its payload or None."""
    rows = list(
        await conn.execute_fetchall(
            "UPDATE signals SET consumed_at = ?, consumed_key = ? WHERE rowid = ("
            "SELECT rowid FROM signals WHERE flow_id = ? AND name = ? AND consumed_at IS NULL "
            "ORDER BY sequence LIMIT 1) RETURNING payload",
            (now_ms, key, flow_id, name),
        )
    )
    return rows[0][0] if rows else None


async def _journal_entries(
    conn: aiosqlite.Connection, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], JournalRecord]:
    """The stored journal entries under these (flow_id, key) pairs."""
    found: dict[tuple[str, str], JournalRecord] = {}
    for chunk in _chunks(list(dict.fromkeys(pairs))):
        rows = await conn.execute_fetchall(
            _by_pairs(
                f"SELECT j.flow_id, {_JOURNAL_ROW} FROM {{pairs}} JOIN journal AS j", "j", chunk
            ),
            [value for pair in chunk for value in pair],
        )
        for row in rows:
            found[(row[0], row[2])] = _journal_from_row(row, 1)
    return found


# --- write commands ----------------------------------------------------------------------


class _Command(Generic[_T]):
    """One write verb waiting in the group-commit queue.

    `apply_all` applies a stage: a list of commands of the same class, in queue order, inside
    the batch's transaction; it stores each command's answer in `result`, which reaches the
    caller only after the commit.
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
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


def _flow_resources(flow_ids: Iterable[str]) -> list[str]:
    return ["flow:" + flow_id for flow_id in flow_ids]


async def _schedule(
    conn: aiosqlite.Connection, items: Sequence[tuple[NewFlow, int]]
) -> list[ScheduleResult]:
    """Schedule flows in order, simulating the rows they create so duplicates see each other."""
    existing: dict[str, tuple[str, bytes]] = {
        row[0]: (row[1], row[2])
        for row in await _fetch_in(
            conn,
            "SELECT flow_id, flow_type, input FROM flows WHERE flow_id IN ({marks})",
            _unique(flow.flow_id for flow, _ in items),
        )
    }
    request_ids = _unique(flow.request_id for flow, _ in items if flow.request_id)
    requests: dict[str, str] = {}
    if request_ids:
        requests = {
            row[0]: row[1]
            for row in await _fetch_in(
                conn,
                "SELECT request_id, flow_id FROM request_ids WHERE request_id IN ({marks})",
                request_ids,
            )
        }
    new_flows: list[tuple[object, ...]] = []
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
        await conn.executemany(
            "INSERT INTO flows (flow_id, flow_type, status, input, attempt, labels, "
            "retry_policy, created_at, updated_at, ready_at, parent_flow_id, parent_key) "
            "VALUES (?, ?, 'PENDING', ?, 1, ?, ?, ?, ?, ?, ?, ?)",
            new_flows,
        )
    if new_requests:
        await conn.executemany(
            "INSERT INTO request_ids (request_id, flow_id) VALUES (?, ?)", new_requests
        )
    return results


async def _send_signal(
    conn: aiosqlite.Connection,
    sim: _Sim,
    flow_id: str,
    name: str,
    payload: bytes,
    request_id: str,
    now_ms: int,
) -> SignalResult:
    """Append a signal; if the flow has an open wait for its name, satisfy the oldest one."""
    rows = list(
        await conn.execute_fetchall(
            "SELECT status, (SELECT sequence FROM signals "
            "WHERE flow_id = flows.flow_id AND request_id = ? AND request_id <> '') "
            "FROM flows WHERE flow_id = ?",
            (request_id, flow_id),
        )
    )
    if not rows:
        return SignalResult(SignalOutcome.NOT_FOUND)
    status, seen = rows[0]
    if seen is not None:
        return SignalResult(SignalOutcome.DELIVERED, seen)
    if status in _TERMINAL:
        return SignalResult(SignalOutcome.CLOSED)
    inserted = list(
        await conn.execute_fetchall(
            "INSERT INTO signals (flow_id, name, sequence, payload, request_id, created_at) "
            "VALUES (?, ?, (SELECT COALESCE(MAX(sequence), 0) + 1 FROM signals "
            "WHERE flow_id = ? AND name = ?), ?, ?, ?) RETURNING sequence",
            (flow_id, name, flow_id, name, payload, request_id, now_ms),
        )
    )
    sequence = inserted[0][0]
    waits = list(
        await conn.execute_fetchall(
            f"SELECT {_WAIT_COLUMNS} FROM waits AS w WHERE w.flow_id = ? AND w.signal_name = ? "
            "AND w.status = 'OPEN' AND w.kind = 'SIGNAL' ORDER BY w.created_at, w.key",
            (flow_id, name),
        )
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
        consumed = await _consume_signal(conn, flow_id, name, key, now_ms)
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Schedule every command's flows with one round of reads and inserts."""
        items = [(flow, command.now_ms) for command in commands for flow in command.flows]
        results = await _schedule(conn, items)
        start = 0
        for command in commands:
            command.result = results[start : start + len(command.flows)]
            start += len(command.flows)


_UPSERT_STEP = (
    "INSERT INTO journal (flow_id, key, sequence, kind, status, result, error, attempts, "
    "args_hash, recorded_at) "
    "VALUES (?, ?, (SELECT journal_seq + 1 FROM flows WHERE flow_id = ?), ?, ?, ?, ?, ?, ?, ?) "
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Fence every record with one SELECT, then upsert the accepted ones at once.

        Step records never change a flow's status or token, so one snapshot fences the whole
        stage. The upsert leaves final entries alone and the insert trigger hands out
        sequences, so repeated keys in the stage behave as if applied one by one.
        """
        states = await _fence(
            conn, (record.flow_id for command in commands for record in command.records)
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
                            record.flow_id,
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
            await conn.executemany(_UPSERT_STEP, rows)


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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Read the flows once, simulate the transitions in order, write them at once.

        Only flows that some wait names as a child cost more: one read of those waits and
        of their flows' states for the whole stage.
        """
        sim = _Sim(conn)
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Fence with one SELECT, then re-queue every accepted flow at once."""
        states = await _fence(
            conn, (lease.flow_id for command in commands for lease in command.leases)
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
                    rows.append((command.now_ms, command.now_ms, lease.flow_id))
            command.result = outcomes
        if rows:
            await conn.executemany(
                "UPDATE flows SET status = 'PENDING', ready_at = ?, updated_at = ?, "
                "lease_owner = NULL, lease_expires_at = NULL WHERE flow_id = ?",
                rows,
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

    def _candidates(self) -> tuple[str, list[object]]:
        """SELECT of the seqs to claim: an ordered index probe per type, merged."""
        # The literal 'PENDING' (not a parameter) lets SQLite use the partial index.
        probe = (
            "SELECT seq, ready_at FROM flows WHERE status = 'PENDING' AND flow_type {test} "
            "AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?"
        )
        if len(self.flow_types) == 1:
            return probe.format(test="= ?"), [self.flow_types[0], self.now_ms, self.limit]
        if len(self.flow_types) > _MAX_UNION_TYPES:
            sql = probe.format(test=f"IN ({_marks(len(self.flow_types))})")
            return sql, [*self.flow_types, self.now_ms, self.limit]
        one = "SELECT seq, ready_at FROM (" + probe.format(test="= ?") + ")"
        sql = (
            "SELECT seq, ready_at FROM ("
            + " UNION ALL ".join([one] * len(self.flow_types))
            + ") ORDER BY ready_at, seq LIMIT ?"
        )
        params: list[object] = []
        for flow_type in self.flow_types:
            params += [flow_type, self.now_ms, self.limit]
        return sql, [*params, self.limit]

    @classmethod
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Claim and lease in one UPDATE ... RETURNING, then read the journals."""
        for command in commands:
            command.result = await command._apply(conn)

    async def _apply(self, conn: aiosqlite.Connection) -> list[ClaimedFlow]:
        if not self.flow_types or self.limit <= 0:
            return []
        candidates, params = self._candidates()
        claimed = sorted(
            await conn.execute_fetchall(
                "UPDATE flows SET status = 'RUNNING', lease_token = lease_token + 1, "
                "lease_owner = ?, lease_expires_at = ?, updated_at = ? "
                f"WHERE seq IN (SELECT seq FROM ({candidates})) "
                "RETURNING ready_at, seq, flow_id, flow_type, input, lease_token, attempt, "
                "retry_policy",
                (self.session_id, self.lease_expires_at, self.now_ms, *params),
            )
        )
        if not claimed:
            return []
        journals: dict[str, list[JournalRecord]] = {row[2]: [] for row in claimed}
        for row in await _fetch_in(
            conn,
            f"SELECT flow_id, {_JOURNAL_COLUMNS} FROM journal WHERE flow_id IN ({{marks}}) "
            "ORDER BY flow_id, sequence",
            list(journals),
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Extend the session's leases through the partial index on lease_owner."""
        for command in commands:
            cursor = await conn.execute(
                "UPDATE flows INDEXED BY flows_lease_owner SET lease_expires_at = ? "
                "WHERE status = 'RUNNING' AND lease_owner = ?",
                (command.lease_expires_at, command.session_id),
            )
            command.result = cursor.rowcount


class _ExpireLeases(_Command[list[str]]):
    __slots__ = ("now_ms",)
    barrier = True

    def __init__(self, future: asyncio.Future[list[str]], now_ms: int) -> None:
        super().__init__(future)
        self.now_ms = now_ms

    @classmethod
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Re-queue expired leases through the partial index on lease_expires_at."""
        for command in commands:
            rows = await conn.execute_fetchall(
                "UPDATE flows INDEXED BY flows_lease_expiry SET status = 'PENDING', "
                "ready_at = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL "
                "WHERE status = 'RUNNING' AND lease_expires_at < ? RETURNING seq, flow_id",
                (command.now_ms, command.now_ms, command.now_ms),
            )
            command.result = [row[1] for row in sorted(rows)]


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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Move the leases that are still live to the new session."""
        for command in commands:
            rows = await _fetch_in(
                conn,
                "SELECT flow_id, status, lease_token, lease_expires_at FROM flows "
                "WHERE flow_id IN ({marks})",
                _unique(lease.flow_id for lease in command.leases),
            )
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
                await conn.executemany(
                    "UPDATE flows SET lease_owner = ?, lease_expires_at = ?, updated_at = ? "
                    "WHERE flow_id = ?",
                    [
                        (command.session_id, command.lease_expires_at, command.now_ms, flow_id)
                        for flow_id in moved
                    ],
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Cancel each flow, or ask it to stop if it runs."""
        for command in commands:
            sim = _Sim(conn)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> tuple[CancelOutcome, list[Satisfied]]:
        await sim.load([self.flow_id])
        state = sim.states.get(self.flow_id)
        if state is None:
            return CancelOutcome.NOT_FOUND, []
        if state.status in _TERMINAL:
            return CancelOutcome.CLOSED, []
        rows = list(
            await sim.conn.execute_fetchall(
                "SELECT error FROM journal WHERE flow_id = ? AND key = ?",
                (self.flow_id, CANCEL_KEY),
            )
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
                sim.update(self.flow_id, cancel_requested=1, updated_at=self.now_ms)
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Append each signal to its mailbox (an open wait consumes it)."""
        for command in commands:
            sim = _Sim(conn)
            command.result = await _send_signal(
                conn,
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Schedule, then signal the flow the schedule resolved to."""
        for command in commands:
            (scheduled,) = await _schedule(conn, [(command.flow, command.now_ms)])
            if scheduled.outcome is ScheduleOutcome.CONFLICT:
                command.result = (scheduled, SignalResult(SignalOutcome.NOT_FOUND))
                continue
            sim = _Sim(conn)
            signal = await _send_signal(
                conn,
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Insert the types not seen before."""
        for command in commands:
            await conn.executemany(
                "INSERT INTO flow_types (flow_type, registered_at) VALUES (?, ?) "
                "ON CONFLICT (flow_type) DO NOTHING",
                [(flow_type, command.now_ms) for flow_type in command.flow_types],
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Register each command's waits, reading their flows, entries and rows at once."""
        for command in commands:
            sim = _Sim(conn)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> list[WaitResult]:
        await sim.load(wait.flow_id for wait in self.waits)
        pairs = [(wait.flow_id, wait.key) for wait in self.waits if sim.states.get(wait.flow_id)]
        stored = await _journal_entries(sim.conn, pairs)
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
            fire_at = wait.fire_at if wait is not None else None
            results.append(WaitResult(WriteOutcome.OK, entry, fire_at))
        return results

    async def _new_wait(self, sim: _Sim, request: WaitRequest) -> _WaitRow:
        child_flow_id: str | None = None
        if request.kind is EntryKind.CHILD and request.child is not None:
            child = dataclasses.replace(
                request.child, parent_flow_id=request.flow_id, parent_key=request.key
            )
            (scheduled,) = await _schedule(sim.conn, [(child, self.now_ms)])
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
        """Satisfy a just (re)opened wait if it can be satisfied now."""
        now_ms = self.now_ms
        if wait.kind is EntryKind.TIMER:
            if wait.fire_at is not None and wait.fire_at <= now_ms:
                sim.satisfy(flow_id, key, wait, EntryStatus.COMPLETED, None, None, now_ms)
        elif wait.kind is EntryKind.SIGNAL:
            payload = await _consume_signal(sim.conn, flow_id, wait.signal_name or "", key, now_ms)
            if payload is not None:
                sim.satisfy(flow_id, key, wait, EntryStatus.COMPLETED, payload, None, now_ms)
        elif wait.child_flow_id is not None:
            rows = list(
                await sim.conn.execute_fetchall(
                    "SELECT status, result, error FROM flows WHERE flow_id = ?",
                    (wait.child_flow_id,),
                )
            )
            if rows and rows[0][0] in _TERMINAL:
                status, result, error = rows[0]
                entry = child_entry(FlowStatus(status), result, _failure_from_json(error))
                sim.satisfy(flow_id, key, wait, *entry, now_ms)


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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Suspend each command's flows in order."""
        for command in commands:
            sim = _Sim(conn)
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
            for row in await conn.execute_fetchall(
                f"SELECT {_WAIT_COLUMNS} FROM waits AS w WHERE w.flow_id = ? AND w.status = 'OPEN'",
                (flow_id,),
            ):
                sim.cache_wait(row)
            wanted = set(keys)
            for (owner, key), wait in list(sim.waits.items()):
                if owner == flow_id and wait.status == _OPEN and key not in wanted:
                    sim.set_wait(flow_id, key, wait, _CANCELLED)
            found = await _journal_entries(conn, [(flow_id, key) for key in keys])
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Fire due timers through the partial index on open timers."""
        for command in commands:
            sim = _Sim(conn)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: _Sim) -> list[Satisfied]:
        fired: list[Satisfied] = []
        after: tuple[int, str, str] | None = None
        while len(fired) < self.limit:
            want = self.limit - len(fired)
            where = "w.status = 'OPEN' AND w.kind = 'TIMER' AND w.fire_at <= ?"
            params: list[object] = [self.now_ms]
            if after is not None:
                where += " AND (w.fire_at, w.flow_id, w.key) > (?, ?, ?)"
                params += after
            rows = list(
                await sim.conn.execute_fetchall(
                    f"SELECT {_WAIT_COLUMNS} FROM waits AS w INDEXED BY waits_timers "
                    f"WHERE {where} ORDER BY w.fire_at, w.flow_id, w.key LIMIT ?",
                    (*params, want),
                )
            )
            if not rows:
                break
            await sim.load(row[0] for row in rows)
            for row in rows:
                if len(fired) == self.limit:
                    break
                flow_id, key = row[0], row[1]
                wait = sim.cache_wait(row)
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
            after = (rows[-1][4], rows[-1][0], rows[-1][1])
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
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Fence with one read, then park every accepted flow at once."""
        for command in commands:
            sim = _Sim(conn)
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
            command.result = outcomes
            await sim.flush()


_AnyCommand = _Command[Any]


async def _child_links(
    conn: aiosqlite.Connection, batch: Sequence[_AnyCommand]
) -> dict[str, set[str]]:
    """For each flow a batch may end, the flows whose CHILD waits name it.

    Ending a child writes its waiting flows (their entries, their status), so the planner
    must order it against the batch's other commands on those flows. The waits in the
    database, plus those the batch itself may create, cover every such flow: a wait's child
    never changes and wait rows are never deleted.
    """
    ending = _unique(flow_id for command in batch for flow_id in command.ending_flows())
    if not ending:
        return {}
    links: dict[str, set[str]] = {}
    for command in batch:
        for child, waiting in command.child_links():
            links.setdefault(child, set()).add(waiting)
    for child, waiting in await _fetch_in(
        conn,
        "SELECT child_flow_id, flow_id FROM waits INDEXED BY waits_children "
        "WHERE kind = 'CHILD' AND child_flow_id IN ({marks})",
        ending,
    ):
        links.setdefault(child, set()).add(waiting)
    return links


def _plan_stages(
    batch: Sequence[_AnyCommand], links: dict[str, set[str]] | None = None
) -> list[list[_AnyCommand]]:
    """Group a batch into stages whose in-order application equals applying it in queue order.

    A mergeable command joins the earliest stage of its class that comes after every stage
    holding an earlier command with a resource in common (and after the last barrier);
    otherwise it opens a new stage at the end. Barriers and non-mergeable commands always open
    a new stage at the end. A command that may end a flow also touches the flows waiting for
    it as a child (`links`).

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
                "flow:" + waiting
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


# --- migrations --------------------------------------------------------------------------


def _split_statements(script: str) -> list[str]:
    """Split an SQLite script into statements; each must end its last line with `;`.

    `sqlite3.complete_statement` knows where a trigger body ends, so `BEGIN ... END;` stays
    whole.
    """
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if any(line.strip() and not line.strip().startswith("--") for line in buffer.splitlines()):
        raise StoreError("migration script ends with an incomplete statement")
    return statements


class _SqliteMigrationTarget:
    """The migration runner's view of an aiosqlite connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def ensure_version_table(self) -> None:
        await self._conn.execute(SCHEMA_VERSION_DDL)

    async def current_version(self) -> int:
        rows = list(
            await self._conn.execute_fetchall(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version"
            )
        )
        return int(rows[0][0])

    async def apply(self, migration: Migration) -> None:
        conn = self._conn
        await conn.execute("BEGIN IMMEDIATE")
        try:
            if await self.current_version() < migration.version:
                for statement in _split_statements(migration.sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES (?, ?)",
                    (migration.version, migration.name),
                )
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise


# --- the store ---------------------------------------------------------------------------


class SqliteStore:
    """The `Store` on an SQLite file (WAL) with a group-commit writer and a reader pool.

    Args:
        path: The database file; its directory is created if missing. ":memory:" keeps the
            database in memory (reads then share the writer connection).
        synchronous: SQLite's `synchronous` pragma: FULL (the default) fsyncs every commit;
            NORMAL may lose the last commits on power loss, never on a process crash.
        readers: How many read connections serve the read verbs.
        max_batch: The most commands one group commit applies.
        busy_timeout_ms: How long a statement waits for a lock held by another process
            before the call fails with `StoreUnavailableError`.
    """

    def __init__(
        self,
        path: str,
        synchronous: str = "FULL",
        *,
        readers: int = 2,
        max_batch: int = 500,
        busy_timeout_ms: int = 5_000,
    ) -> None:
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise InvalidArgumentError(
                f"sqlite synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, "
                f"not {synchronous!r}"
            )
        if readers < 1 or max_batch < 1 or busy_timeout_ms < 0:
            raise InvalidArgumentError(
                "readers and max_batch must be at least 1, busy_timeout_ms at least 0"
            )
        self._path = path
        self._synchronous = mode
        self._reader_count = readers
        self._max_batch = max_batch
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        # Only for ":memory:": reads use the writer and must not see a batch mid-transaction.
        self._shared_lock: asyncio.Lock | None = None
        self._queue: collections.deque[_AnyCommand] = collections.deque()
        self._wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._accepting = False
        self._lifecycle = asyncio.Lock()

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    # --- life cycle ---

    async def open(self) -> None:
        """Connect, apply pending migrations and start the committer.

        Raises:
            SchemaVersionError: The database was migrated by a newer ergon-server.
            StoreUnavailableError: The file cannot be opened.
            StoreError: The store is already open, or the database is unusable.
        """
        async with self._lifecycle:
            if self._writer is not None:
                raise StoreError("the sqlite store is already open")
            try:
                await self._connect()
            except BaseException as exc:
                await self._disconnect()
                if isinstance(exc, Exception):
                    raise _translate(exc) from exc
                raise
            self._queue.clear()
            self._wakeup = asyncio.Event()
            self._accepting = True
            self._committer = asyncio.get_running_loop().create_task(
                self._run_committer(), name=f"ergon-sqlite-committer:{self._path}"
            )

    async def _connect(self) -> None:
        in_memory = self._path == MEMORY_PATH
        if not in_memory:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(self._path, isolation_level=None)
        self._writer = writer
        if not in_memory:
            rows = list(await writer.execute_fetchall("PRAGMA journal_mode = WAL"))
            if str(rows[0][0]).lower() != "wal":
                raise StoreError(f"could not put {self._path} in WAL mode (got {rows[0][0]})")
        await writer.execute(f"PRAGMA synchronous = {self._synchronous}")
        await writer.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        await writer.execute("PRAGMA foreign_keys = ON")
        await migrate(_SqliteMigrationTarget(writer), load_migrations("sqlite"))
        if in_memory:
            self._shared_lock = asyncio.Lock()
            return
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self._path, isolation_level=None)
            self._readers.append(reader)
            await reader.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await reader.execute("PRAGMA query_only = ON")

    async def _disconnect(self) -> None:
        connections = [*self._readers, *([self._writer] if self._writer is not None else [])]
        self._readers = []
        self._writer = None
        self._shared_lock = None
        for conn in connections:
            try:
                await conn.close()
            except Exception:
                _log.warning("closing an sqlite connection failed", exc_info=True)

    async def close(self) -> None:
        """Commit every queued write, then close the connections. Idempotent."""
        async with self._lifecycle:
            self._accepting = False
            committer, self._committer = self._committer, None
            if committer is not None:
                self._wakeup.set()
                # The committer drains the queue before it returns. A committer that died
                # has failed its commands already; closing must still release connections.
                await asyncio.wait([committer])
                if not committer.cancelled() and committer.exception() is not None:
                    _log.error("the sqlite committer had stopped", exc_info=committer.exception())
            await self._disconnect()

    # --- the group commit ---

    def _submit(self, command: _Command[_T]) -> asyncio.Future[_T]:
        if not self._accepting:
            raise StoreUnavailableError("the sqlite store is not open")
        self._queue.append(command)
        self._wakeup.set()
        return command.future

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _run_committer(self) -> None:
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
            # Never leave a caller waiting, whatever stopped the committer.
            error = StoreUnavailableError(f"the sqlite store's committer stopped: {exc!r}")
            for command in [*batch, *self._queue]:
                command.fail(error)
            self._queue.clear()
            self._accepting = False
            raise

    async def _commit(self, batch: list[_AnyCommand]) -> None:
        try:
            await self._transaction(batch)
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
                    await self._transaction([command])
                except ErgonError as single:
                    command.fail(single)
                else:
                    command.resolve()
            return
        for command in batch:
            command.resolve()

    async def _transaction(self, batch: Sequence[_AnyCommand]) -> None:
        conn = self._writer
        if conn is None:
            raise StoreUnavailableError("the sqlite store is not open")
        lock = self._shared_lock if self._shared_lock is not None else contextlib.nullcontext()
        async with lock:
            try:
                await conn.execute("BEGIN IMMEDIATE")
                links = await _child_links(conn, batch) if len(batch) > 1 else {}
                for stage in _plan_stages(batch, links):
                    await type(stage[0]).apply_all(conn, stage)
                await conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                if isinstance(exc, Exception):
                    raise _translate(exc) from exc
                raise

    # --- reads ---

    async def _read(self, sql: str, params: Sequence[object] = ()) -> list[_Row]:
        if not self._accepting:
            raise StoreUnavailableError("the sqlite store is not open")
        try:
            if self._shared_lock is not None and self._writer is not None:
                async with self._shared_lock:
                    return list(await self._writer.execute_fetchall(sql, params))
            reader = self._readers[self._next_reader % len(self._readers)]
            self._next_reader += 1
            return list(await reader.execute_fetchall(sql, params))
        except Exception as exc:
            raise _translate(exc) from exc

    async def get_flow(self, flow_id: str) -> FlowRecord | None:
        """The flow, or None."""
        rows = await self._read(f"SELECT {_FLOW_COLUMNS} FROM flows WHERE flow_id = ?", (flow_id,))
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
        where = ["seq > ?"]
        params: list[object] = [cursor if cursor is not None else 0]
        wanted = _unique(status.value for status in statuses)
        if wanted:
            where.append(f"status IN ({_marks(len(wanted))})")
            params += wanted
        if flow_type is not None:
            where.append("flow_type = ?")
            params.append(flow_type)
        rows = await self._read(
            f"SELECT {_FLOW_COLUMNS} FROM flows WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            (*params, limit + 1),
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
            f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE flow_id = ? AND sequence > ? "
            "ORDER BY sequence LIMIT ?",
            (flow_id, after_sequence, limit),
        )
        return [_journal_from_row(row) for row in rows]

    async def get_entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """One journal entry of a flow, or None."""
        rows = await self._read(
            f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE flow_id = ? AND key = ?",
            (flow_id, key),
        )
        return _journal_from_row(rows[0]) if rows else None

    async def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Never calls the listener: one server process owns a SQLite file."""
        if not self._accepting:
            raise StoreUnavailableError("the sqlite store is not open")

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        types = _unique(flow_types)
        if not types:
            if not self._accepting:
                raise StoreUnavailableError("the sqlite store is not open")
            return None
        earliest: int | None = None
        for chunk in _chunks(types):
            # One MIN per type: each is a single probe of the partial index.
            probe = (
                "SELECT MIN(ready_at) AS m FROM flows WHERE status = 'PENDING' AND flow_type = ?"
            )
            rows = await self._read(
                f"SELECT MIN(m) FROM ({' UNION ALL '.join([probe] * len(chunk))})", chunk
            )
            value = rows[0][0]
            if value is not None and (earliest is None or value < earliest):
                earliest = value
        return earliest

    async def known_flow_types(self, flow_types: Sequence[str]) -> set[str]:
        """Which of these flow types were ever registered."""
        types = _unique(flow_types)
        if not self._accepting:
            raise StoreUnavailableError("the sqlite store is not open")
        known: set[str] = set()
        for chunk in _chunks(types):
            rows = await self._read(
                f"SELECT flow_type FROM flow_types WHERE flow_type IN ({_marks(len(chunk))})", chunk
            )
            known.update(row[0] for row in rows)
        return known

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
        """Lease up to `limit` PENDING flows of these types whose ready_at <= now_ms."""
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
        do not count toward `limit`; a limit below 1 fires nothing.
        """
        if limit <= 0:
            if not self._accepting:
                raise StoreUnavailableError("the sqlite store is not open")
            return []
        return await self._submit(_FireTimers(self._future(), now_ms, limit))

    async def next_timer_at(self) -> int | None:
        """The earliest fire_at among open TIMER waits, or None."""
        rows = await self._read(
            "SELECT MIN(fire_at) FROM waits INDEXED BY waits_timers "
            "WHERE status = 'OPEN' AND kind = 'TIMER'"
        )
        value = rows[0][0]
        return int(value) if value is not None else None

    async def park_flows(
        self, parks: Sequence[Park], now_ms: int, initial_delay_ms: int, max_delay_ms: int
    ) -> list[WriteOutcome]:
        """Park flows whose code no longer matches their journal, fenced."""
        check_park_delays(initial_delay_ms, max_delay_ms)
        command = _ParkFlows(self._future(), list(parks), now_ms, initial_delay_ms, max_delay_ms)
        return await self._submit(command)
