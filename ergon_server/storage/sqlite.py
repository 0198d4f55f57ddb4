"""The SQLite store: one file, WAL, and a group commit on one writer connection.

Writes. Every write verb becomes a command object on a queue and awaits its future. One
committer task takes everything queued (up to `max_batch` commands), opens one
`BEGIN IMMEDIATE` transaction, applies the commands, commits once (one fsync for the whole
batch) and only then resolves the futures. The batch runs as one job on the writer (`_Writer`:
on the event loop's thread while commits are quick, on its own thread after a slow one).
Commands are not applied one by one: the batch is first planned into *stages*, and a stage
applies many commands of one kind with a handful of statements (one fencing SELECT over all
flows of all step records, then one `executemany`).

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

One server owns the file: while open, the store holds an exclusive lock on `<file>.lock`, so a
second server on the same file fails to open instead of dispatching the same flows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar, cast

import aiosqlite

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
    WriteOutcome,
)
from ergon_server.storage._batched import (
    CANCELLED,
    FLOW_COLUMNS,
    HISTORY_SELECT,
    JOURNAL_COLUMNS,
    JOURNAL_ROW,
    NO_TIME,
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


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _chunks(values: Sequence[_T]) -> Iterable[Sequence[_T]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


class _Writer:
    """The writer connection, running a whole transaction per job, one job at a time.

    aiosqlite hops to its thread once per statement, and a group commit's BEGIN, fencing
    reads, `executemany`s and COMMIT cost more in hops than in SQLite. Here the batch's
    coroutine is driven to its end in one `send`: `execute`, `execute_fetchall` and
    `executemany` are coroutines that finish at once.

    Where the job runs: on the event loop's thread while jobs are quick (a small commit,
    fsync included, costs less than the two thread hops it would take), on the writer's own
    thread after a slow one (a large batch, a slow disk), so the loop goes on serving
    streams while it runs; a quick job there brings the next ones back to the loop.
    """

    # A job slower than this sends the next one to the writer's thread.
    INLINE_UNDER_S = 0.002

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ergon-sqlite-writer"
        )
        self._conn: sqlite3.Connection | None = None
        self._in_job = False
        self._inline = True
        # Jobs handed to the thread and not finished: none may run inline beside them.
        self._on_thread = 0

    async def open(self) -> None:
        """Connect."""
        await self.run(self._connect)

    async def _connect(self, _: _Writer) -> None:
        # Jobs run on either thread, never two at once (`run`).
        self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)

    async def run(self, job: Callable[[_Writer], Coroutine[Any, Any, _T]]) -> _T:
        """Run `job(self)` to its end, on the loop's thread or the writer's."""
        if self._inline and not self._on_thread:
            return self._drive(job)
        self._on_thread += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._drive, job)
        finally:
            self._on_thread -= 1

    @property
    def idle_on_loop(self) -> bool:
        """Whether a job now would run at once on the loop's thread (none is in flight)."""
        return self._inline and not self._on_thread

    def _drive(self, job: Callable[[_Writer], Coroutine[Any, Any, _T]]) -> _T:
        started = time.perf_counter()
        self._in_job = True
        coroutine = job(self)
        try:
            try:
                coroutine.send(None)
            except StopIteration as stop:
                return cast(_T, stop.value)
            # Closed while still in the job, so its clean-up (a batch's ROLLBACK) can run.
            coroutine.close()
            raise StoreError("an sqlite command awaited something other than its connection")
        finally:
            self._in_job = False
            self._inline = time.perf_counter() - started < self.INLINE_UNDER_S

    def _connection(self) -> sqlite3.Connection:
        # Only a job may touch the connection: a call from elsewhere would run SQL beside a
        # batch in flight.
        if self._conn is None or not self._in_job:
            raise StoreError("the sqlite writer was used outside a job or after closing")
        return self._conn

    async def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        """Run one statement."""
        return self._connection().execute(sql, params)

    async def execute_fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """Run one statement and return all its rows."""
        return self._connection().execute(sql, params).fetchall()

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> sqlite3.Cursor:
        """Run one statement once per row."""
        return self._connection().executemany(sql, rows)

    async def close(self) -> None:
        """Close the connection and stop the thread (after any batch in flight)."""
        try:
            if self._conn is not None:
                await self.run(self._close)
        finally:
            self._executor.shutdown(wait=False)

    async def _close(self, _: _Writer) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def _fetch_in(conn: _Writer, sql: str, keys: Sequence[str], *extra: object) -> list[_Row]:
    """Run `sql` (with one `{marks}` IN list) over `keys` in chunks, extra params first."""
    rows: list[_Row] = []
    for chunk in _chunks(keys):
        rows.extend(
            await conn.execute_fetchall(sql.format(marks=_marks(len(chunk))), (*extra, *chunk))
        )
    return rows


async def _fence(conn: _Writer, flow_ids: Iterable[str]) -> dict[str, list[Any]]:
    """Current [status, lease_token] of each named flow that exists."""
    rows = await _fetch_in(
        conn,
        "SELECT flow_id, status, lease_token FROM flows WHERE flow_id IN ({marks})",
        unique(flow_ids),
    )
    return {row[0]: [row[1], row[2]] for row in rows}


# --- waits: a stage's view of the flows and waits it touches ------------------------------

# Everything a stage needs to decide a flow's next state, in one probe per flow.
# (Each column costs more to carry out of aiosqlite than the probes: the flags share one.)
_STATE_SQL = (
    "SELECT flow_id, status, lease_token, lease_owner, journal_seq, parks, attempt, "
    "cancel_requested "
    "| (EXISTS (SELECT 1 FROM waits AS w INDEXED BY waits_open "
    "WHERE w.flow_id = flows.flow_id AND w.status = 'OPEN') << 1) "
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

# A flow's OPEN waits, and cancelling them when it ends (the partial index of migration 3).
_OPEN_WAITS = (
    f"SELECT {_WAIT_COLUMNS} FROM waits AS w INDEXED BY waits_open "
    "WHERE w.flow_id = ? AND w.status = 'OPEN'"
)
_CANCEL_OPEN_WAITS = (
    "UPDATE waits INDEXED BY waits_open SET status = 'CANCELLED' "
    "WHERE flow_id = ? AND status = 'OPEN'"
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
        # The three flags share one column (see `_STATE_SQL`).
        flags: int = row[7]
        self.cancel_requested = bool(flags & 1)
        self.open_waits = bool(flags & 2)
        self.waited_on = bool(flags & 4)
        self.cancel_error = row[8]


class _Sim(Sim):
    """A stage's simulation (`Sim`) on SQLite: reads by chunked IN lists and VALUES joins."""

    def __init__(self, conn: _Writer) -> None:
        super().__init__()
        self.conn = conn

    async def load(self, flow_ids: Iterable[str]) -> None:
        """Read the state of the flows not read yet (None for a missing flow)."""
        missing = [flow_id for flow_id in unique(flow_ids) if flow_id not in self.states]
        if not missing:
            return
        for flow_id in missing:
            self.states[flow_id] = None
        for row in await _fetch_in(self.conn, _STATE_SQL, missing):
            self.states[row[0]] = _FlowState(row)

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
        missing = [child for child in unique(child_ids) if child not in self.links]
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

    async def cancel_errors(self, flow_id: str) -> list[str | None]:
        """The `error` of the flow's CANCEL entry in the database: empty if it has none."""
        rows = await self.conn.execute_fetchall(
            "SELECT error FROM journal WHERE flow_id = ? AND key = ?", (flow_id, CANCEL_KEY)
        )
        return [row[0] for row in rows]

    async def load_open_waits(self, flow_id: str) -> None:
        """Read the flow's OPEN waits into `waits` (the stage's own changes win)."""
        for row in await self.conn.execute_fetchall(_OPEN_WAITS, (flow_id,)):
            self.cache_wait(row)

    async def journal_entries(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], JournalRecord]:
        """The journal entries in the database of these (flow_id, key) pairs, where they exist."""
        return await _journal_entries(self.conn, pairs)

    async def schedule(self, items: Sequence[tuple[NewFlow, int]]) -> list[ScheduleResult]:
        """Schedule flows (each with its now_ms) in order, as `schedule_flows` would."""
        return await _schedule(self.conn, items)

    async def consume_signal(self, flow_id: str, name: str, key: str, now_ms: int) -> bytes | None:
        """Consume the oldest unconsumed signal of the mailbox into `key`; its payload or None."""
        return await _consume_signal(self.conn, flow_id, name, key, now_ms)

    async def child_outcome(self, child_flow_id: str) -> list[tuple[str, bytes | None, str | None]]:
        """The (status, result, error) of a child flow, as a list: empty if it does not exist."""
        rows = await self.conn.execute_fetchall(
            "SELECT status, result, error FROM flows WHERE flow_id = ?", (child_flow_id,)
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def flush(self) -> None:
        """Write the stage's net effect."""
        conn = self.conn
        for names, rows in self.update_groups().items():
            assignments = ", ".join(f"{name} = ?" for name in names)
            await conn.executemany(f"UPDATE flows SET {assignments} WHERE flow_id = ?", rows)
        if self.records:
            await conn.executemany(_INSERT_ENTRY, self.entry_rows())
        if self.trims:
            # Entries recorded after the retry (higher sequences) are kept.
            await conn.executemany(
                "DELETE FROM journal WHERE flow_id = ? AND status = 'FAILED' AND sequence <= ?",
                self.trims,
            )
        if self.dirty:
            await conn.executemany(_UPSERT_WAIT, self.wait_rows())
        if self.ended:
            await conn.executemany(_CANCEL_OPEN_WAITS, [(flow_id,) for flow_id in self.ended])


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
    conn: _Writer, flow_id: str, name: str, key: str, now_ms: int
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
    conn: _Writer, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], JournalRecord]:
    """The stored journal entries under these (flow_id, key) pairs."""
    found: dict[tuple[str, str], JournalRecord] = {}
    for chunk in _chunks(list(dict.fromkeys(pairs))):
        rows = await conn.execute_fetchall(
            _by_pairs(
                f"SELECT j.flow_id, {JOURNAL_ROW} FROM {{pairs}} JOIN journal AS j", "j", chunk
            ),
            [value for pair in chunk for value in pair],
        )
        for row in rows:
            found[(row[0], row[2])] = journal_from_row(row, 1)
    return found


# --- write commands ----------------------------------------------------------------------


async def _schedule(conn: _Writer, items: Sequence[tuple[NewFlow, int]]) -> list[ScheduleResult]:
    """Schedule flows in order, simulating the rows they create so duplicates see each other."""
    existing: dict[str, tuple[str, bytes]] = {
        row[0]: (row[1], row[2])
        for row in await _fetch_in(
            conn,
            "SELECT flow_id, flow_type, input FROM flows WHERE flow_id IN ({marks})",
            unique(flow.flow_id for flow, _ in items),
        )
    }
    request_ids = unique(flow.request_id for flow, _ in items if flow.request_id)
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
    plan = plan_schedule(items, existing, requests)
    new_flows = [
        (
            flow.flow_id,
            flow.flow_type,
            flow.input,
            labels_json(flow.labels),
            policy_to_json(flow.retry_policy),
            now_ms,
            now_ms,
            ready_at,
            flow.parent_flow_id or None,
            flow.parent_key or None,
        )
        for flow, now_ms, ready_at in plan.created
    ]
    new_requests, results = plan.requests, plan.results
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
    conn: _Writer,
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
    if status in TERMINAL:
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
    return await satisfy_signal_waits(
        sim,
        flow_id,
        waits,
        sequence,
        lambda key: _consume_signal(conn, flow_id, name, key, now_ms),
        now_ms,
    )


class _ScheduleFlows(ScheduleFlowsCommand):
    @classmethod
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
        """Schedule every command's flows with one round of reads and inserts."""
        cls.hand_out(commands, await _schedule(conn, cls.items(commands)))


_UPSERT_STEP = (
    "INSERT INTO journal (flow_id, key, sequence, kind, status, result, error, attempts, "
    "args_hash, recorded_at) "
    "VALUES (?, ?, (SELECT journal_seq + 1 FROM flows WHERE flow_id = ?), ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (flow_id, key) DO UPDATE SET status = excluded.status, "
    "result = excluded.result, error = excluded.error, attempts = excluded.attempts, "
    "args_hash = excluded.args_hash, recorded_at = excluded.recorded_at "
    "WHERE journal.status = 'RETRYING'"
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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
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
                            failure_to_json(record.error),
                            record.attempts,
                            record.args_hash,
                            command.now_ms,
                        )
                    )
            command.result = outcomes
        if rows:
            await conn.executemany(_UPSERT_STEP, rows)


class _OnSim:
    """Runs a `SimCommand`'s stage on this dialect's `_Sim`."""

    __slots__ = ()

    @classmethod
    def new_sim(cls, conn: _Writer) -> _Sim:
        return _Sim(conn)


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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
        """Claim and lease in one UPDATE ... RETURNING, then read the journals."""
        for command in commands:
            command.result = await command._apply(conn)

    async def _apply(self, conn: _Writer) -> list[ClaimedFlow]:
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
            f"SELECT flow_id, {JOURNAL_COLUMNS} FROM journal WHERE flow_id IN ({{marks}}) "
            "ORDER BY flow_id, sequence",
            list(journals),
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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
        """Extend the session's leases through the partial index on lease_owner."""
        renew = (
            "UPDATE flows INDEXED BY flows_lease_owner SET lease_expires_at = ? "
            "WHERE status = 'RUNNING' AND lease_owner = ?"
        )
        for command in commands:
            params = (command.lease_expires_at, command.session_id)
            if command.flow_ids is None:
                command.result = (await conn.execute(renew, params)).rowcount
                continue
            command.result = 0
            for chunk in _chunks(command.flow_ids):
                sql = f"{renew} AND flow_id IN ({_marks(len(chunk))})"
                command.result += (await conn.execute(sql, (*params, *chunk))).rowcount


# The soonest expired first, through the partial index on lease_expires_at: a scan after a
# long outage re-queues a bounded batch per transaction, not every running flow at once.
_EXPIRED = (
    "SELECT seq, flow_id, lease_token FROM flows INDEXED BY flows_lease_expiry "
    "WHERE status = 'RUNNING' AND lease_expires_at < ? ORDER BY lease_expires_at, seq LIMIT ?"
)


class _ExpireLeases(Command[list[Lease]]):
    __slots__ = ("limit", "now_ms")
    barrier = True

    def __init__(self, future: asyncio.Future[list[Lease]], now_ms: int, limit: int) -> None:
        super().__init__(future)
        self.now_ms = now_ms
        self.limit = limit

    @classmethod
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
        """Re-queue up to `limit` expired leases, the soonest expired first."""
        for command in commands:
            # Read, then write, in the writer's transaction: nothing changes in between.
            rows = await conn.execute_fetchall(_EXPIRED, (command.now_ms, command.limit))
            await conn.executemany(
                "UPDATE flows SET status = 'PENDING', ready_at = ?, updated_at = ?, "
                "lease_owner = NULL, lease_expires_at = NULL WHERE seq = ?",
                [(command.now_ms, command.now_ms, row[0]) for row in rows],
            )
            command.result = [Lease(row[1], row[2]) for row in rows]


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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
        """Move the leases that are still live to the new session."""
        for command in commands:
            rows = await _fetch_in(
                conn,
                "SELECT flow_id, status, lease_token, lease_expires_at FROM flows "
                "WHERE flow_id IN ({marks})",
                unique(lease.flow_id for lease in command.leases),
            )
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
                await conn.executemany(
                    "UPDATE flows SET lease_owner = ?, lease_expires_at = ?, updated_at = ? "
                    "WHERE flow_id = ?",
                    [
                        (command.session_id, command.lease_expires_at, command.now_ms, flow_id)
                        for flow_id in moved
                    ],
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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
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


class _RegisterFlowTypes(Command[None]):
    __slots__ = ("flow_types", "now_ms")

    def __init__(self, future: asyncio.Future[None], flow_types: list[str], now_ms: int) -> None:
        super().__init__(future)
        self.flow_types = flow_types
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return ["flow-types"]

    @classmethod
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
        """Insert the types not seen before."""
        for command in commands:
            await conn.executemany(
                "INSERT INTO flow_types (flow_type, registered_at) VALUES (?, ?) "
                "ON CONFLICT (flow_type) DO NOTHING",
                [(flow_type, command.now_ms) for flow_type in command.flow_types],
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
    async def apply_all(cls, conn: _Writer, commands: Sequence[Self]) -> None:
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
            after = (rows[-1][4], rows[-1][0], rows[-1][1])
        return fired


class _ParkFlows(_OnSim, ParkFlows):
    __slots__ = ()


async def _child_links(conn: _Writer, batch: Sequence[AnyCommand]) -> dict[str, set[str]]:
    """For each flow a batch may end, the flows whose CHILD waits name it.

    Ending a child writes its waiting flows (their entries, their status), so the planner
    must order it against the batch's other commands on those flows. The waits in the
    database, plus those the batch itself may create, cover every such flow: a wait's child
    never changes and wait rows are never deleted.
    """
    ending = unique(flow_id for command in batch for flow_id in command.ending_flows())
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


async def _apply_batch(writer: _Writer, *, batch: Sequence[AnyCommand]) -> None:
    """The body of one group commit; rolled back whole if anything in it fails."""
    await writer.execute("BEGIN IMMEDIATE")
    try:
        links = await _child_links(writer, batch) if len(batch) > 1 else {}
        for stage in plan_stages(batch, links):
            await type(stage[0]).apply_all(writer, stage)
        await writer.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            await writer.execute("ROLLBACK")
        raise


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
    """The migration runner's view of the writer connection (run on its thread)."""

    def __init__(self, conn: _Writer) -> None:
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


def _lock_database(path: str) -> int:
    """Take the exclusive lock on `<path>.lock`; the descriptor that holds it until closed.

    SQLite's own locks guard transactions, not ownership: two servers would both dispatch the
    file's flows, each with its own leases in memory. The lock is on a file of its own, as
    `flock` on the database could meet SQLite's byte-range locks (NFS emulates one with the
    other); the kernel drops it when the process dies, so a crash leaves nothing to clean.

    Raises:
        StoreUnavailableError: Another store (in this process or another) holds the lock, or
            the lock file cannot be opened.
    """
    database = Path(path).resolve()  # a symlink or another spelling locks the same file
    lock_path = database.with_name(database.name + ".lock")
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise StoreUnavailableError(
            f"sqlite store unavailable: cannot open the lock file {lock_path}: {error.strerror}"
        ) from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
        os.close(descriptor)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreUnavailableError(
                f"sqlite store unavailable: cannot lock {lock_path}: {error.strerror}"
            ) from error
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise StoreUnavailableError(
            f"sqlite store unavailable: {database} is in use by another ergon-server{by}, "
            f"which holds {lock_path}; an SQLite file serves one server: stop the other one, "
            "or use PostgreSQL for several replicas"
        ) from error
    # Who holds it, for the message above (only read while the lock is held); a disk too full
    # for these few bytes is not a reason to refuse the lock.
    with contextlib.suppress(OSError):
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


class SqliteStore(BatchedStore):
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

    shared = False  # one server process owns the file

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
    _dialect = "sqlite"
    _committer_noun = "committer"
    _log = logging.getLogger(__name__)

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
        super().__init__(max_batch)
        self._path = path
        self._synchronous = mode
        self._reader_count = readers
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: _Writer | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        self._lock: int | None = None  # the descriptor holding `<path>.lock`

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    # --- life cycle ---

    async def open(self) -> None:
        """Connect, apply pending migrations and start the committer.

        Raises:
            SchemaVersionError: The database was migrated by a newer ergon-server.
            StoreUnavailableError: The file cannot be opened, or another store (another
                server) has it open.
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
            self._start_committer(f"ergon-sqlite-committer:{self._path}")

    async def _connect(self) -> None:
        in_memory = self._path == MEMORY_PATH
        if not in_memory:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._lock = _lock_database(self._path)
        writer = _Writer(self._path)
        self._writer = writer
        await writer.open()
        await writer.run(self._prepare_writer)
        if in_memory:
            return
        for _ in range(self._reader_count):
            reader = await aiosqlite.connect(self._path, isolation_level=None)
            self._readers.append(reader)
            await reader.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await reader.execute("PRAGMA query_only = ON")

    async def _prepare_writer(self, writer: _Writer) -> None:
        if self._path != MEMORY_PATH:
            rows = list(await writer.execute_fetchall("PRAGMA journal_mode = WAL"))
            if str(rows[0][0]).lower() != "wal":
                raise StoreError(f"could not put {self._path} in WAL mode (got {rows[0][0]})")
        await writer.execute(f"PRAGMA synchronous = {self._synchronous}")
        await writer.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        await writer.execute("PRAGMA foreign_keys = ON")
        await migrate(_SqliteMigrationTarget(writer), load_migrations("sqlite"))

    async def _disconnect(self) -> None:
        connections: list[aiosqlite.Connection | _Writer] = [*self._readers]
        if self._writer is not None:
            connections.append(self._writer)
        self._readers = []
        self._writer = None
        for conn in connections:
            try:
                await conn.close()
            except Exception:
                _log.warning("closing an sqlite connection failed", exc_info=True)
        if self._lock is not None:
            lock, self._lock = self._lock, None
            os.close(lock)  # releases the lock, after the last connection is gone

    async def close(self) -> None:
        """Commit every queued write, then close the connections. Idempotent."""
        async with self._lifecycle:
            await self._stop_committer()
            await self._disconnect()

    # --- the group commit ---

    async def _run(self, batch: Sequence[AnyCommand]) -> None:
        """Apply a batch in one `BEGIN IMMEDIATE` transaction (see `_Writer` for the thread)."""
        writer = self._writer
        if writer is None:
            raise StoreUnavailableError("the sqlite store is not open")
        try:
            await writer.run(functools.partial(_apply_batch, batch=batch))
        except Exception as exc:
            raise _translate(exc) from exc

    # --- reads ---

    async def _read(self, sql: str, params: Sequence[object] = ()) -> list[_Row]:
        self._check_open()
        try:
            writer = self._writer
            if writer is not None and (not self._readers or writer.idle_on_loop):
                # ":memory:": only the writer sees the database. A file: while the writer idles
                # on the loop's thread, a read there costs no hop to a reader's thread. Either
                # way it runs one job at a time, so a read never sees a batch half applied.
                return list(await writer.run(lambda w: w.execute_fetchall(sql, params)))
            reader = self._readers[self._next_reader % len(self._readers)]
            self._next_reader += 1
            return list(await reader.execute_fetchall(sql, params))
        except Exception as exc:
            raise _translate(exc) from exc

    async def get_flow(self, flow_id: str) -> FlowRecord | None:
        """The flow, or None."""
        check_text(flow_id, "a flow_id")
        rows = await self._read(f"SELECT {FLOW_COLUMNS} FROM flows WHERE flow_id = ?", (flow_id,))
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
        where = ["seq > ?"]
        params: list[object] = [cursor if cursor is not None else 0]
        wanted = unique(status.value for status in statuses)
        if wanted:
            where.append(f"status IN ({_marks(len(wanted))})")
            params += wanted
        if flow_type is not None:
            where.append("flow_type = ?")
            params.append(flow_type)
        rows = await self._read(
            f"SELECT {FLOW_COLUMNS} FROM flows WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            (*params, limit + 1),
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
            f"{HISTORY_SELECT} WHERE j.flow_id = ? AND j.sequence > ? ORDER BY j.sequence LIMIT ?",
            (flow_id, after_sequence, limit),
        )
        return [history_from_row(row) for row in rows]

    async def get_entry(self, flow_id: str, key: str) -> JournalRecord | None:
        """One journal entry of a flow, or None."""
        check_text(flow_id, "a flow_id")
        check_text(key, "a key")
        rows = await self._read(
            f"SELECT {JOURNAL_COLUMNS} FROM journal WHERE flow_id = ? AND key = ?",
            (flow_id, key),
        )
        return journal_from_row(rows[0]) if rows else None

    async def count_flows(self) -> dict[tuple[FlowStatus, str], int]:
        """How many flows there are, by status and flow type (a full scan: call sparingly)."""
        rows = await self._read(
            "SELECT status, flow_type, COUNT(*) FROM flows GROUP BY status, flow_type", ()
        )
        return {(FlowStatus(row[0]), row[1]): row[2] for row in rows}

    async def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Never calls the listener: one server process owns a SQLite file."""
        self._check_open()

    async def next_ready_at(self, flow_types: Sequence[str]) -> int | None:
        """The earliest ready_at among PENDING flows of these types, or None."""
        check_texts(flow_types, "a flow_type")
        types = unique(flow_types)
        if not types:
            self._check_open()
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
        check_texts(flow_types, "a flow_type")
        types = unique(flow_types)
        self._check_open()
        known: set[str] = set()
        for chunk in _chunks(types):
            rows = await self._read(
                f"SELECT flow_type FROM flow_types WHERE flow_type IN ({_marks(len(chunk))})", chunk
            )
            known.update(row[0] for row in rows)
        return known

    async def next_timer_at(self, after_ms: int | None = None) -> int | None:
        """The earliest fire_at among open TIMER waits (later than `after_ms` if given), or None."""
        rows = await self._read(
            "SELECT MIN(fire_at) FROM waits INDEXED BY waits_timers "
            "WHERE status = 'OPEN' AND kind = 'TIMER' AND fire_at > ?",
            (NO_TIME if after_ms is None else after_ms,),
        )
        value = rows[0][0]
        return int(value) if value is not None else None
