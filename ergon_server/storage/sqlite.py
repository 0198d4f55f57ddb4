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
footprint is not a known set of flows (claims, lease expiry and renewal) are barriers that
nothing crosses. Inside a stage the commands are applied in queue order, repeated flows
included (a stage simulates the flow states it reads).

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
import json
import logging
import sqlite3
from collections.abc import Iterable, Sequence
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
    "lease_expires_at"
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
            "retry_policy, created_at, updated_at, ready_at) "
            "VALUES (?, ?, 'PENDING', ?, 1, ?, ?, ?, ?, ?)",
            new_flows,
        )
    if new_requests:
        await conn.executemany(
            "INSERT INTO request_ids (request_id, flow_id) VALUES (?, ?)", new_requests
        )
    return results


async def _send_signal(
    conn: aiosqlite.Connection,
    flow_id: str,
    name: str,
    payload: bytes,
    request_id: str,
    now_ms: int,
) -> SignalResult:
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
    return SignalResult(SignalOutcome.DELIVERED, inserted[0][0])


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


class _FinishFlows(_Command[list[WriteOutcome]]):
    __slots__ = ("finishes", "now_ms")
    mergeable = True

    def __init__(
        self,
        future: asyncio.Future[list[WriteOutcome]],
        finishes: Sequence[FlowFinish],
        now_ms: int,
    ) -> None:
        super().__init__(future)
        self.finishes = finishes
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources(finish.flow_id for finish in self.finishes)

    @classmethod
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Fence with one SELECT, simulate the transitions in order, write them at once."""
        states = await _fence(
            conn, (finish.flow_id for command in commands for finish in command.finishes)
        )
        ends: list[tuple[object, ...]] = []
        retries: list[tuple[object, ...]] = []
        for command in commands:
            now_ms = command.now_ms
            outcomes: list[WriteOutcome] = []
            for finish in command.finishes:
                state = states.get(finish.flow_id)
                if state is None:
                    outcomes.append(WriteOutcome.NOT_FOUND)
                elif state[1] != finish.lease_token:
                    outcomes.append(WriteOutcome.LEASE_LOST)
                elif state[0] == "RUNNING":
                    outcomes.append(WriteOutcome.OK)
                    error = _failure_to_json(finish.error)
                    if finish.status is FlowStatus.FAILED and finish.retry_delay_ms > 0:
                        state[0] = "PENDING"
                        retries.append(
                            (error, now_ms + finish.retry_delay_ms, now_ms, finish.flow_id)
                        )
                    else:
                        state[0] = finish.status.value
                        completed = finish.status is FlowStatus.COMPLETED
                        result = finish.result if completed else None
                        error = None if completed else error
                        ends.append(
                            (finish.status.value, result, error, now_ms, now_ms, finish.flow_id)
                        )
                elif state[0] == finish.status.value:
                    outcomes.append(WriteOutcome.OK)
                else:
                    outcomes.append(WriteOutcome.LEASE_LOST)
            command.result = outcomes
        if ends:
            await conn.executemany(
                "UPDATE flows SET status = ?, result = ?, error = ?, completed_at = ?, "
                "updated_at = ?, lease_owner = NULL, lease_expires_at = NULL "
                "WHERE flow_id = ?",
                ends,
            )
        if retries:
            await conn.executemany(
                "UPDATE flows SET status = 'PENDING', result = NULL, error = ?, "
                "attempt = attempt + 1, ready_at = ?, updated_at = ?, lease_owner = NULL, "
                "lease_expires_at = NULL WHERE flow_id = ?",
                retries,
            )
            await conn.executemany(
                "DELETE FROM journal WHERE flow_id = ? AND status = 'FAILED'",
                [(row[-1],) for row in retries],
            )


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


class _CancelFlow(_Command[CancelOutcome]):
    __slots__ = ("flow_id", "now_ms", "reason")

    def __init__(
        self, future: asyncio.Future[CancelOutcome], flow_id: str, reason: str, now_ms: int
    ) -> None:
        super().__init__(future)
        self.flow_id = flow_id
        self.reason = reason
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        return _flow_resources([self.flow_id])

    @classmethod
    async def apply_all(cls, conn: aiosqlite.Connection, commands: Sequence[Self]) -> None:
        """Cancel with one guarded UPDATE; only a miss needs a second look."""
        for command in commands:
            cancelled = await conn.execute_fetchall(
                "UPDATE flows SET status = 'CANCELLED', error = ?, completed_at = ?, "
                "updated_at = ?, lease_owner = NULL, lease_expires_at = NULL "
                "WHERE flow_id = ? AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED') "
                "RETURNING seq",
                (
                    _failure_to_json(cancellation_failure(command.reason)),
                    command.now_ms,
                    command.now_ms,
                    command.flow_id,
                ),
            )
            if list(cancelled):
                command.result = CancelOutcome.CANCELLED
                continue
            found = await conn.execute_fetchall(
                "SELECT 1 FROM flows WHERE flow_id = ?", (command.flow_id,)
            )
            command.result = CancelOutcome.CLOSED if list(found) else CancelOutcome.NOT_FOUND


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
        """Append each signal to its mailbox."""
        for command in commands:
            command.result = await _send_signal(
                conn,
                command.flow_id,
                command.name,
                command.payload,
                command.request_id,
                command.now_ms,
            )


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
            signal = await _send_signal(
                conn,
                scheduled.flow_id,
                command.name,
                command.payload,
                command.flow.request_id,
                command.now_ms,
            )
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


_AnyCommand = _Command[Any]


def _plan_stages(batch: Sequence[_AnyCommand]) -> list[list[_AnyCommand]]:
    """Group a batch into stages whose in-order application equals applying it in queue order.

    A mergeable command joins the earliest stage of its class that comes after every stage
    holding an earlier command with a resource in common (and after the last barrier);
    otherwise it opens a new stage at the end. Barriers and non-mergeable commands always open
    a new stage at the end.

    Args:
        batch: Commands in queue order.

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
                for stage in _plan_stages(batch):
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

    async def finish_flows(self, finishes: Sequence[FlowFinish], now_ms: int) -> list[WriteOutcome]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`."""
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

    async def cancel_flow(self, flow_id: str, reason: str, now_ms: int) -> CancelOutcome:
        """Cancel a flow that is not terminal: CANCELLED, its lease cleared, reason recorded.

        The reason is kept as the flow's `error` (see `memory.cancellation_failure`).
        """
        return await self._submit(_CancelFlow(self._future(), flow_id, reason, now_ms))

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox."""
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
