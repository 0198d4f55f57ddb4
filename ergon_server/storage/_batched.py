"""What the SQLite and PostgreSQL stores share: rows, the stage simulation, commands, the facade.

Both SQL stores turn every write verb into a command on an in-process queue; one task takes
everything queued, applies it in one transaction (merged into stages by `plan_stages`) and
resolves the callers' futures only after the commit. Everything here is independent of the
dialect:

- the JSON documents and row layouts the two schemas agree on;
- `Sim`, a stage's simulation of the flows and waits it touches, whose I/O (`load`, `flush`
  and a few reads) each dialect implements, and whose `on_*` hooks let PostgreSQL collect
  its notifications;
- the `Command` base, `plan_stages`, and the commands whose logic is the same on every
  dialect (`SimCommand` subclasses: a dialect subclass only names its `Sim`);
- `BatchedStore`: the queue, its committer loop and the write verbs' facade, which build the
  dialect's commands named in a `CommandSet`.

Each dialect module keeps its SQL, its connections, its error translation, its migration
target and the commands whose statements differ (schedules, step records, claims, leases,
signals, timers); PostgreSQL also keeps its row locking and its listener.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

from ergon_server.errors import ErgonError, StoreError, StoreUnavailableError
from ergon_server.model import (
    CANCEL_KEY,
    CancelOutcome,
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
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

_T = TypeVar("_T")
_Row = Any

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

# Wait statuses.
OPEN = "OPEN"
SATISFIED = "SATISFIED"
CANCELLED = "CANCELLED"

# Earlier than any time a store holds: a lower bound that bounds nothing.
NO_TIME = -(2**63)

# --- JSON codecs (one document format for both schemas) ----------------------------------


def failure_to_json(failure: Failure | None) -> str | None:
    """Encode a failure as the compact JSON document the `error` columns hold."""
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


def failure_from_json(text: str | None) -> Failure | None:
    """Decode an `error` column (None stays None)."""
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


def policy_to_json(policy: RetryPolicy | None) -> str | None:
    """Encode a retry policy as the compact JSON document `flows.retry_policy` holds."""
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


def policy_from_json(text: str | None) -> RetryPolicy | None:
    """Decode `flows.retry_policy` (None stays None)."""
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


# --- rows (the same columns in both schemas) ---------------------------------------------

FLOW_COLUMNS = (
    "seq, flow_id, flow_type, status, input, result, error, attempt, labels, created_at, "
    "updated_at, ready_at, completed_at, retry_policy, lease_token, lease_owner, "
    "lease_expires_at, parent_flow_id, cancel_requested"
)

JOURNAL_COLUMNS = "sequence, key, kind, status, result, error, attempts, args_hash, recorded_at"
# The journal columns of a query that names the journal `j`.
JOURNAL_ROW = ", ".join("j." + column.strip() for column in JOURNAL_COLUMNS.split(","))


def flow_from_row(row: _Row) -> FlowRecord:
    """A flow from a row of `FLOW_COLUMNS`."""
    return FlowRecord(
        flow_id=row[1],
        flow_type=row[2],
        status=FlowStatus(row[3]),
        input=row[4],
        result=row[5],
        error=failure_from_json(row[6]),
        attempt=row[7],
        labels=json.loads(row[8]),
        created_at=row[9],
        updated_at=row[10],
        ready_at=row[11],
        completed_at=row[12],
        retry_policy=policy_from_json(row[13]),
        lease_token=row[14],
        lease_owner=row[15],
        lease_expires_at=row[16],
        parent_flow_id=row[17],
        cancel_requested=bool(row[18]),
    )


# A flow's history: its journal with each timer's due time (the TIMER wait of the same key).
HISTORY_SELECT = (
    f"SELECT {JOURNAL_ROW}, w.fire_at FROM journal j LEFT JOIN waits w "
    "ON w.flow_id = j.flow_id AND w.key = j.key AND w.kind = 'TIMER' AND j.kind = 'TIMER' "
)


def history_from_row(row: _Row) -> JournalRecord:
    """A history entry from a row of `HISTORY_SELECT`."""
    record = journal_from_row(row)
    due_at = row[len(row) - 1]
    return record if due_at is None else dataclasses.replace(record, due_at=due_at)


def journal_from_row(row: _Row, offset: int = 0) -> JournalRecord:
    """A journal entry from a row holding `JOURNAL_COLUMNS` from column `offset` on."""
    return JournalRecord(
        sequence=row[offset],
        key=row[offset + 1],
        kind=EntryKind(row[offset + 2]),
        status=EntryStatus(row[offset + 3]),
        result=row[offset + 4],
        error=failure_from_json(row[offset + 5]),
        attempts=row[offset + 6],
        args_hash=row[offset + 7],
        recorded_at=row[offset + 8],
    )


def unique(values: Iterable[str]) -> list[str]:
    """The values without repeats, in first-seen order."""
    return list(dict.fromkeys(values))


@dataclasses.dataclass
class SchedulePlan:
    """What scheduling a batch decided: answers in order, and the rows to insert."""

    results: list[ScheduleResult]
    # (flow, now_ms, ready_at) of each flow to create, in scheduling order.
    created: list[tuple[NewFlow, int, int]]
    # (request_id, flow_id) pairs to remember.
    requests: list[tuple[str, str]]


def plan_schedule(
    items: Sequence[tuple[NewFlow, int]],
    existing: dict[str, tuple[str, bytes]],
    requests: dict[str, str],
) -> SchedulePlan:
    """Decide each schedule in order, as if sequential: duplicates in the batch see each other.

    `existing` maps the flow ids already stored to (flow_type, input); `requests` the request
    ids already seen to their flow ids. Both are updated with what the plan creates.
    """
    plan = SchedulePlan([], [], [])
    for flow, now_ms in items:
        if flow.request_id and flow.request_id in requests:
            plan.results.append(ScheduleResult(requests[flow.request_id], ScheduleOutcome.EXISTING))
            continue
        known = existing.get(flow.flow_id)
        if known is None:
            outcome = ScheduleOutcome.CREATED
            existing[flow.flow_id] = (flow.flow_type, flow.input)
            ready_at = flow.start_at if flow.start_at is not None else now_ms
            plan.created.append((flow, now_ms, ready_at))
        elif known == (flow.flow_type, flow.input):
            outcome = ScheduleOutcome.EXISTING
        else:
            plan.results.append(ScheduleResult(flow.flow_id, ScheduleOutcome.CONFLICT))
            continue
        if flow.request_id:
            requests[flow.request_id] = flow.flow_id
            plan.requests.append((flow.request_id, flow.flow_id))
        plan.results.append(ScheduleResult(flow.flow_id, outcome))
    return plan


def labels_json(labels: dict[str, str]) -> str:
    """Labels as stored: compact JSON."""
    return json.dumps(labels, separators=(",", ":"))


def fresh(error: ErgonError) -> ErgonError:
    """A copy of `error` so that many awaiting callers do not share one traceback."""
    copy = type(error)(error.message, error.reason)
    copy.__cause__ = error.__cause__
    return copy


# --- a stage's simulated states ----------------------------------------------------------


class FlowState:
    """A flow as a stage simulates it.

    Each dialect subclass reads its own state row (the schemas carry the flags differently)
    in `__init__`; the fields and what they mean are the same.
    """

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

    status: str
    lease_token: int
    lease_owner: str | None
    journal_seq: int
    parks: int
    attempt: int
    cancel_requested: bool
    # Whether the flow may have OPEN waits (to cancel when it ends).
    open_waits: bool
    # Whether a wait not yet satisfied names the flow as its child.
    waited_on: bool
    cancel_error: str | None

    def holds(self, lease_token: int) -> bool:
        """Whether the flow is RUNNING under this lease."""
        return self.status == "RUNNING" and self.lease_token == lease_token

    def cancellation(self) -> Failure:
        """The error of a flow ended by its cancel request: its CANCEL entry's."""
        return failure_from_json(self.cancel_error) or cancellation_failure("")


class WaitRow:
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


class Sim:
    """What one stage reads and writes about flows, journal entries and waits.

    A stage reads each flow's state once (`load`), applies its commands in order to these
    simulated states, and `flush` writes the net effect with one `executemany` per statement
    shape. Reads of waits go through `waits`, where the stage's own changes win over the
    database. Signal rows and new flows are written at once instead (their reads are direct).

    This base holds the simulation; a dialect subclass does the I/O (`load`, `load_waits`,
    `load_links`, `flush`) and may observe what happens through the `_on_*` hooks.
    """

    def __init__(self) -> None:
        self.states: dict[str, FlowState | None] = {}
        # Pending column values per flow: applying them in any order gives the same rows,
        # because each is a plain value, the last one set winning.
        self.updates: dict[str, dict[str, object]] = {}
        # Pending journal entries, in sequence order per flow.
        self.records: dict[tuple[str, str], JournalRecord] = {}
        # Retried flows: (flow_id, last sequence then) to drop FAILED entries up to.
        self.trims: list[tuple[str, int]] = []
        self.waits: dict[tuple[str, str], WaitRow] = {}
        self.dirty: dict[tuple[str, str], None] = {}
        # Flows that ended: their OPEN waits are cancelled at flush.
        self.ended: list[str] = []
        # Child flow_id -> the (flow_id, key) of the waits that name it, sorted.
        self.links: dict[str, list[tuple[str, str]]] = {}

    # --- I/O, per dialect ---

    async def load(self, flow_ids: Iterable[str]) -> None:
        """Read the state of the flows not read yet (None for a missing flow)."""
        raise NotImplementedError

    async def load_waits(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Read these waits into `waits` (absent ones stay absent)."""
        raise NotImplementedError

    async def load_links(self, child_ids: Iterable[str]) -> None:
        """Read the waits naming these flows as children into `links`, and their flows."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Write the stage's net effect."""
        raise NotImplementedError

    async def cancel_errors(self, flow_id: str) -> list[str | None]:
        """The `error` of the flow's CANCEL entry in the database: empty if it has none."""
        raise NotImplementedError

    async def load_open_waits(self, flow_id: str) -> None:
        """Read the flow's OPEN waits into `waits` (the stage's own changes win)."""
        raise NotImplementedError

    async def journal_entries(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], JournalRecord]:
        """The journal entries in the database of these (flow_id, key) pairs, where they exist."""
        raise NotImplementedError

    async def final_entries(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (flow_id, key) pairs have a final journal entry in the database."""
        found = await self.journal_entries(pairs)
        return {pair for pair, entry in found.items() if entry.status.final}

    async def schedule(self, items: Sequence[tuple[NewFlow, int]]) -> list[ScheduleResult]:
        """Schedule flows (each with its now_ms) in order, as `schedule_flows` would."""
        raise NotImplementedError

    async def consume_signal(self, flow_id: str, name: str, key: str, now_ms: int) -> bytes | None:
        """Consume the oldest unconsumed signal of the mailbox into `key`; its payload or None."""
        raise NotImplementedError

    async def child_outcome(self, child_flow_id: str) -> list[tuple[str, bytes | None, str | None]]:
        """The (status, result, error) of a child flow, as a list: empty if it does not exist."""
        raise NotImplementedError

    # --- hooks, also for commands: no-ops unless the dialect reports changes (PostgreSQL) ---

    def on_ready(self) -> None:
        """A WAITING flow became PENDING."""

    def on_wakeup(self, flow_id: str, lease_token: int, key: str) -> None:
        """A wait of a RUNNING flow was satisfied and its lease holder must hear of it."""

    def on_ended(self, flow_id: str) -> None:
        """A flow ended."""

    def on_cancel_requested(self, flow_id: str, lease_token: int) -> None:
        """A RUNNING flow was asked to stop."""

    def on_timer(self) -> None:
        """A TIMER wait was opened."""

    # --- what `flush` writes, as statement parameters ---

    def update_groups(self) -> dict[tuple[str, ...], list[tuple[object, ...]]]:
        """The pending flow updates grouped by column names; each row ends with its flow_id.

        Flows updated by the same code path set the same columns in the same order, so each
        group is one `executemany` of one UPDATE statement.
        """
        groups: dict[tuple[str, ...], list[tuple[object, ...]]] = {}
        for flow_id, columns in self.updates.items():
            groups.setdefault(tuple(columns), []).append((*columns.values(), flow_id))
        return groups

    def entry_rows(self) -> list[tuple[object, ...]]:
        """The pending journal entries, as rows of the dialect's entry INSERT."""
        return [
            (
                flow_id,
                record.key,
                record.sequence,
                record.kind.value,
                record.status.value,
                record.result,
                failure_to_json(record.error),
                record.attempts,
                record.args_hash,
                record.recorded_at,
            )
            for (flow_id, _), record in self.records.items()
        ]

    def wait_rows(self) -> list[tuple[object, ...]]:
        """The waits the stage changed, as rows of the dialect's wait upsert."""
        rows: list[tuple[object, ...]] = []
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
        return rows

    # --- the simulation ---

    def forget(self, flow_ids: Iterable[str]) -> None:
        """Drop cached absences of flows that a command has just created."""
        for flow_id in flow_ids:
            if flow_id in self.states and self.states[flow_id] is None:
                del self.states[flow_id]

    def state(self, flow_id: str) -> FlowState:
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

    def cache_wait(self, row: _Row) -> WaitRow:
        """The stage's view of a wait read from the database (its own changes win)."""
        pair = (row[0], row[1])
        wait = self.waits.get(pair)
        if wait is None:
            wait = WaitRow(EntryKind(row[2]), row[3], row[4], row[5], row[6], row[7], bool(row[8]))
            self.waits[pair] = wait
        return wait

    def put_wait(self, flow_id: str, key: str, wait: WaitRow) -> None:
        self.waits[(flow_id, key)] = wait
        self.dirty[(flow_id, key)] = None
        if wait.status == OPEN:
            state = self.states.get(flow_id)
            if state is not None:
                state.open_waits = True

    def set_wait(self, flow_id: str, key: str, wait: WaitRow, status: str) -> None:
        wait.status = status
        self.put_wait(flow_id, key, wait)

    def satisfy(
        self,
        flow_id: str,
        key: str,
        wait: WaitRow,
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
        was_open = wait.status == OPEN
        self.set_wait(flow_id, key, wait, SATISFIED)
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
            self.on_ready()
        elif state.status == "RUNNING" and wake:
            self.on_wakeup(flow_id, state.lease_token, key)
        return Satisfied(
            flow_id,
            record,
            FlowStatus(state.status),
            state.lease_token,
            state.lease_owner,
            fire_at=wait.fire_at,
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
            error=failure_to_json(error),
            completed_at=now_ms,
            updated_at=now_ms,
            lease_owner=None,
            lease_expires_at=None,
            parks=state.parks,
        )
        self.on_ended(flow_id)
        if state.open_waits:
            state.open_waits = False
            self.ended.append(flow_id)
            for (owner, _), wait in self.waits.items():
                if owner == flow_id and wait.status == OPEN:
                    wait.status = CANCELLED
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
            if wait.status == SATISFIED or parent is None or parent.status in TERMINAL:
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


# --- commands and their planner ----------------------------------------------------------


class Command(Generic[_T]):
    """One write verb waiting in the group-commit queue.

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
    # Whether its caller is told first when its batch commits: a claim's flows go to their
    # worker before, say, the schedule call that woke the claim hears back.
    urgent: ClassVar[bool] = False
    # Whether it may write rows of the flows it names that exist before it runs (a dialect
    # with row locks takes those first, in one order for every writer).
    writes_named_flows: ClassVar[bool] = True

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
    async def apply_all(cls, conn: Any, commands: Sequence[Self]) -> None:
        """Apply a stage of commands of this class in order.

        Args:
            conn: The dialect's handle on the batch's transaction.
            commands: The stage, in queue order.
        """
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
            self.future.set_exception(fresh(error))


AnyCommand = Command[Any]


def _resolve_all(batch: Sequence[AnyCommand]) -> None:
    for command in batch:
        command.resolve()


# The prefix of a flow's resource name.
FLOW = "flow:"


def flow_resources(flow_ids: Iterable[str]) -> list[str]:
    """The resource names of these flows."""
    return [FLOW + flow_id for flow_id in flow_ids]


def plan_stages(
    batch: Sequence[AnyCommand], links: dict[str, set[str]] | None = None
) -> list[list[AnyCommand]]:
    """Group a batch into stages whose in-order application equals applying it in queue order.

    A mergeable command joins the earliest stage of its class that comes after every stage
    holding an earlier command with a resource in common (and after the last barrier);
    otherwise it opens a new stage at the end. Barriers and non-mergeable commands always open
    a new stage at the end. A command that may end a flow also touches the flows waiting for
    it as a child (`links`).

    Args:
        batch: Commands in queue order.
        links: For each flow the batch may end, the flows waiting for it (SQLite's
            `_child_links`, PostgreSQL's `_lock_batch`).

    Returns:
        Stages in application order; each is a non-empty list of commands of one class, in
        queue order.
    """
    stages: list[list[AnyCommand]] = []
    stages_of_class: dict[type[AnyCommand], list[int]] = {}
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
                FLOW + waiting
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


# --- commands whose logic is the same on every dialect -----------------------------------


class SimCommand(Command[_T]):
    """A command whose stage runs on a `Sim`; the dialect names its `Sim` in `new_sim`.

    Such a command's logic is the same on every dialect; only the reads and writes differ.
    """

    __slots__ = ()

    @classmethod
    def new_sim(cls, conn: Any) -> Sim:
        """The dialect's `Sim` on the stage's connection (or transaction)."""
        raise NotImplementedError


class FinishFlows(SimCommand[tuple[list[WriteOutcome], list[Satisfied]]]):
    """`finish_flows`: end flows or re-queue them for a retry, fenced by their leases."""

    __slots__ = ("finishes", "now_ms")
    mergeable = True
    # A flow's end reaches the clients waiting on it (RunFlow, WaitFlow) before the batch's
    # other callers (the acks of step records) take the loop.
    urgent = True

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
        return flow_resources(finish.flow_id for finish in self.finishes)

    def ending_flows(self) -> Iterable[str]:
        return [finish.flow_id for finish in self.finishes]

    @classmethod
    async def apply_all(cls, conn: Any, commands: Sequence[Self]) -> None:
        """Read the flows once, simulate the transitions in order, write them at once.

        Only flows that some wait names as a child cost more: one read of those waits and
        of their flows' states for the whole stage.
        """
        sim = cls.new_sim(conn)
        await sim.load(finish.flow_id for command in commands for finish in command.finishes)
        await sim.load_links(
            flow_id
            for flow_id, state in sim.states.items()
            if state is not None and state.waited_on
        )
        required = [
            (finish.flow_id, key)
            for command in commands
            for finish in command.finishes
            for key in finish.requires_keys
        ]
        # Step records come before a finish of the same flow in a batch, so this sees them.
        final = await sim.final_entries(required) if required else set()
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
                elif state.status == "RUNNING" and not all(
                    (finish.flow_id, key) in final for key in finish.requires_keys
                ):
                    outcomes.append(WriteOutcome.NOT_RECORDED)
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
                            error=failure_to_json(finish.error),
                            attempt=state.attempt,
                            ready_at=now_ms + finish.retry_delay_ms,
                            updated_at=now_ms,
                            lease_owner=None,
                            lease_expires_at=None,
                        )
                        sim.trims.append((finish.flow_id, state.journal_seq))
                        sim.on_ready()
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


class ParkFlows(SimCommand[list[WriteOutcome]]):
    """`park_flows`: send leased flows back to PENDING after a growing delay, fenced."""

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
        return flow_resources(park.flow_id for park in self.parks)

    @classmethod
    async def apply_all(cls, conn: Any, commands: Sequence[Self]) -> None:
        """Fence with one read, then park every accepted flow at once."""
        for command in commands:
            sim = cls.new_sim(conn)
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
                    error=failure_to_json(park.error),
                    ready_at=command.now_ms + delay,
                    updated_at=command.now_ms,
                    lease_owner=None,
                    lease_expires_at=None,
                    parks=state.parks,
                )
                sim.on_ready()
            command.result = outcomes
            await sim.flush()


class RenewLeases(Command[int]):
    """`renew_leases`: extend a session's leases, all of them or those on the named flows."""

    __slots__ = ("flow_ids", "lease_expires_at", "session_id")
    barrier = True

    def __init__(
        self,
        future: asyncio.Future[int],
        session_id: str,
        lease_expires_at: int,
        flow_ids: tuple[str, ...] | None,
    ) -> None:
        super().__init__(future)
        self.session_id = session_id
        self.lease_expires_at = lease_expires_at
        self.flow_ids = flow_ids

    def resources(self) -> Iterable[str]:
        # A dialect with row locks takes the named flows up front with the rest of the batch's,
        # in flow_id order, so a heartbeat cannot deadlock with another writer's batch.
        return () if self.flow_ids is None else flow_resources(self.flow_ids)


class CancelFlow(SimCommand[tuple[CancelOutcome, list[Satisfied]]]):
    """`cancel_flow`: cancel a flow, or ask its lease holder to stop it."""

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
        return flow_resources([self.flow_id])

    def ending_flows(self) -> Iterable[str]:
        return [self.flow_id]

    @classmethod
    async def apply_all(cls, conn: Any, commands: Sequence[Self]) -> None:
        """Cancel each flow, or ask it to stop if it runs."""
        for command in commands:
            sim = cls.new_sim(conn)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: Sim) -> tuple[CancelOutcome, list[Satisfied]]:
        await sim.load([self.flow_id])
        state = sim.states.get(self.flow_id)
        if state is None:
            return CancelOutcome.NOT_FOUND, []
        if state.status in TERMINAL:
            return CancelOutcome.CLOSED, []
        errors = await sim.cancel_errors(self.flow_id)
        if errors:
            error = failure_from_json(errors[0]) or cancellation_failure(self.reason)
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
                state.cancel_error = failure_to_json(error)
                sim.update(self.flow_id, cancel_requested=True, updated_at=self.now_ms)
            sim.on_cancel_requested(self.flow_id, state.lease_token)
            return CancelOutcome.CANCEL_REQUESTED, []
        satisfied = await sim.end(self.flow_id, FlowStatus.CANCELLED, None, error, self.now_ms)
        return CancelOutcome.CANCELLED, satisfied


class SuspendFlows(SimCommand[tuple[list[SuspendResult], list[Satisfied]]]):
    """`suspend_flows`: let flows whose every branch waits give their slot back, fenced."""

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
        return flow_resources(request.flow_id for request in self.requests)

    def ending_flows(self) -> Iterable[str]:
        return [request.flow_id for request in self.requests]

    @classmethod
    async def apply_all(cls, conn: Any, commands: Sequence[Self]) -> None:
        """Suspend each command's flows in order."""
        for command in commands:
            sim = cls.new_sim(conn)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: Sim) -> tuple[list[SuspendResult], list[Satisfied]]:
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
            keys = unique(request.open_keys)
            await sim.load_open_waits(flow_id)
            abandoned = set(request.abandoned_keys) - set(keys)
            for (owner, key), wait in list(sim.waits.items()):
                if owner == flow_id and wait.status == OPEN and key in abandoned:
                    sim.set_wait(flow_id, key, wait, CANCELLED)
            found = await sim.journal_entries([(flow_id, key) for key in keys])
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


class RegisterWaits(SimCommand[list[WaitResult]]):
    """`register_waits`: open waits (TIMER, SIGNAL, CHILD), fenced; satisfy them if due."""

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
        names = flow_resources(wait.flow_id for wait in self.waits)
        children = [wait.child.flow_id for wait in self.waits if wait.child is not None]
        if children:
            # Children are scheduled: keep scheduling order with the other schedules.
            names += ["schedule-order", *flow_resources(children)]
        return names

    def child_links(self) -> Iterable[tuple[str, str]]:
        return [(wait.child.flow_id, wait.flow_id) for wait in self.waits if wait.child is not None]

    @classmethod
    async def apply_all(cls, conn: Any, commands: Sequence[Self]) -> None:
        """Register each command's waits, reading their flows, entries and rows at once."""
        for command in commands:
            sim = cls.new_sim(conn)
            command.result = await command._apply(sim)
            await sim.flush()

    async def _apply(self, sim: Sim) -> list[WaitResult]:
        await sim.load(wait.flow_id for wait in self.waits)
        pairs = [(wait.flow_id, wait.key) for wait in self.waits if sim.states.get(wait.flow_id)]
        stored = await sim.journal_entries(pairs)
        await sim.load_waits(pairs)
        results: list[WaitResult] = []
        for request in self.waits:
            if request.flow_id not in sim.states:
                # A child an earlier wait of this call created (`_new_wait` forgets it).
                await sim.load([request.flow_id])
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
                    sim.set_wait(request.flow_id, request.key, wait, OPEN)
                await self._check_now(sim, request.flow_id, request.key, wait)
                entry = sim.entry(*pair)
                if wait.kind is EntryKind.TIMER and wait.status == OPEN:
                    # A timer loop (another replica's) may be sleeping past this fire time.
                    sim.on_timer()
            fire_at = wait.fire_at if wait is not None else None
            results.append(WaitResult(WriteOutcome.OK, entry, fire_at))
        return results

    async def _new_wait(self, sim: Sim, request: WaitRequest) -> WaitRow:
        child_flow_id: str | None = None
        if request.kind is EntryKind.CHILD and request.child is not None:
            child = dataclasses.replace(
                request.child, parent_flow_id=request.flow_id, parent_key=request.key
            )
            (scheduled,) = await sim.schedule([(child, self.now_ms)])
            child_flow_id = scheduled.flow_id
            sim.forget([child_flow_id])
            links = sim.links.get(child_flow_id)
            if links is not None:
                links.append((request.flow_id, request.key))
                links.sort()
        wait = WaitRow(
            request.kind,
            OPEN,
            request.fire_at if request.kind is EntryKind.TIMER else None,
            request.signal_name if request.kind is EntryKind.SIGNAL else None,
            child_flow_id,
            self.now_ms,
            False,
        )
        sim.put_wait(request.flow_id, request.key, wait)
        return wait

    async def _check_now(self, sim: Sim, flow_id: str, key: str, wait: WaitRow) -> None:
        """Satisfy a just (re)opened wait if it can be satisfied now.

        The caller holds the lease and gets the entry in its answer: no WAKEUP is sent
        (`wake=False`).
        """
        now_ms = self.now_ms
        if wait.kind is EntryKind.TIMER:
            if wait.fire_at is not None and wait.fire_at <= now_ms:
                sim.satisfy(
                    flow_id, key, wait, EntryStatus.COMPLETED, None, None, now_ms, wake=False
                )
        elif wait.kind is EntryKind.SIGNAL:
            payload = await sim.consume_signal(flow_id, wait.signal_name or "", key, now_ms)
            if payload is not None:
                sim.satisfy(
                    flow_id, key, wait, EntryStatus.COMPLETED, payload, None, now_ms, wake=False
                )
        elif wait.child_flow_id is not None:
            rows = await sim.child_outcome(wait.child_flow_id)
            if rows and rows[0][0] in TERMINAL:
                status, result, error = rows[0]
                entry = child_entry(FlowStatus(status), result, failure_from_json(error))
                sim.satisfy(flow_id, key, wait, *entry, now_ms, wake=False)


# --- the facade and its committer --------------------------------------------------------

# Short for the `CommandSet` signatures.
_Future = asyncio.Future


class ScheduleFlowsCommand(Command[list[ScheduleResult]]):
    """Schedule flows: the queue-order bookkeeping both dialects share.

    A dialect subclass implements `apply_all` with its reads and inserts, running one
    `plan_schedule` over `items(commands)` and handing the answers back with `hand_out`.
    """

    __slots__ = ("flows", "now_ms")
    mergeable = True
    # It only inserts: what it reads of a flow that exists (type, input) never changes, and a
    # flow it creates is its own.
    writes_named_flows = False

    def __init__(
        self, future: asyncio.Future[list[ScheduleResult]], flows: Sequence[NewFlow], now_ms: int
    ) -> None:
        super().__init__(future)
        self.flows = flows
        self.now_ms = now_ms

    def resources(self) -> Iterable[str]:
        # All schedules stay in queue order among themselves, so `seq` (scheduling order)
        # follows the queue; request ids are then ordered too.
        return ["schedule-order", *flow_resources(flow.flow_id for flow in self.flows)]

    @staticmethod
    def items(commands: Sequence[ScheduleFlowsCommand]) -> list[tuple[NewFlow, int]]:
        """Every command's flows, in queue order, with their command's time."""
        return [(flow, command.now_ms) for command in commands for flow in command.flows]

    @staticmethod
    def hand_out(commands: Sequence[ScheduleFlowsCommand], results: list[ScheduleResult]) -> None:
        """Give each command its slice of the stage's answers."""
        start = 0
        for command in commands:
            command.result = results[start : start + len(command.flows)]
            start += len(command.flows)


async def satisfy_signal_waits(
    sim: Sim,
    flow_id: str,
    waits: Sequence[Any],
    sequence: int,
    consume: Callable[[str], Awaitable[bytes | None]],
    now_ms: int,
) -> SignalResult:
    """Hand a just-appended signal's mailbox to the flow's open waits for it, oldest first.

    `waits` are the open SIGNAL wait rows of that name in order; `consume(key)` takes the
    oldest unconsumed signal for a wait key, or None when the mailbox is empty.
    """
    if waits:
        await sim.load([flow_id])
    for row in waits:
        wait = sim.cache_wait(row)
        key = row[1]
        if wait.status != OPEN:
            continue
        if wait.has_entry or sim.entry(flow_id, key) is not None:
            sim.set_wait(flow_id, key, wait, SATISFIED)
            continue
        consumed = await consume(key)
        if consumed is None:
            break
        done = sim.satisfy(flow_id, key, wait, EntryStatus.COMPLETED, consumed, None, now_ms)
        return SignalResult(SignalOutcome.DELIVERED, sequence, done)
    return SignalResult(SignalOutcome.DELIVERED, sequence)


@dataclasses.dataclass(frozen=True, slots=True)
class CommandSet:
    """A dialect's command classes, one per write verb, as `BatchedStore` builds them.

    Each field is called with a fresh future and the verb's (checked) arguments.
    """

    register_flow_types: Callable[[_Future[None], list[str], int], Command[None]]
    schedule_flows: Callable[
        [_Future[list[ScheduleResult]], list[NewFlow], int], Command[list[ScheduleResult]]
    ]
    claim_flows: Callable[
        [_Future[list[ClaimedFlow]], str, list[str], int, int, int], Command[list[ClaimedFlow]]
    ]
    record_steps: Callable[
        [_Future[list[WriteOutcome]], list[StepRecord], int], Command[list[WriteOutcome]]
    ]
    finish_flows: Callable[
        [_Future[tuple[list[WriteOutcome], list[Satisfied]]], list[FlowFinish], int],
        Command[tuple[list[WriteOutcome], list[Satisfied]]],
    ]
    release_flows: Callable[
        [_Future[list[WriteOutcome]], list[Lease], int], Command[list[WriteOutcome]]
    ]
    renew_leases: Callable[[_Future[int], str, int, tuple[str, ...] | None], Command[int]]
    reattach_leases: Callable[[_Future[list[str]], str, list[Lease], int, int], Command[list[str]]]
    expire_leases: Callable[[_Future[list[Lease]], int, int], Command[list[Lease]]]
    cancel_flow: Callable[
        [_Future[tuple[CancelOutcome, list[Satisfied]]], str, str, int],
        Command[tuple[CancelOutcome, list[Satisfied]]],
    ]
    send_signal: Callable[[_Future[SignalResult], str, str, bytes, str, int], Command[SignalResult]]
    signal_with_schedule: Callable[
        [_Future[tuple[ScheduleResult, SignalResult]], NewFlow, str, bytes, int],
        Command[tuple[ScheduleResult, SignalResult]],
    ]
    # Waits whose CHILD is known only by request_id have an unknown footprint: a barrier.
    register_waits: Callable[
        [_Future[list[WaitResult]], list[WaitRequest], int], Command[list[WaitResult]]
    ]
    register_waits_barrier: Callable[
        [_Future[list[WaitResult]], list[WaitRequest], int], Command[list[WaitResult]]
    ]
    suspend_flows: Callable[
        [_Future[tuple[list[SuspendResult], list[Satisfied]]], list[SuspendRequest], int],
        Command[tuple[list[SuspendResult], list[Satisfied]]],
    ]
    fire_timers: Callable[[_Future[list[Satisfied]], int, int], Command[list[Satisfied]]]
    park_flows: Callable[
        [_Future[list[WriteOutcome]], list[Park], int, int, int], Command[list[WriteOutcome]]
    ]


class BatchedStore:
    """The write half of a group-commit store: the queue, its committer and the write verbs.

    Every write verb checks its arguments, builds the dialect's command (`_commands`) and
    awaits it. One committer task takes everything queued (up to `max_batch` commands) and
    hands it to `_run`, which the dialect implements as one transaction; if that fails, the
    batch is re-run one command per transaction (unless the store is unavailable), so one bad
    command cannot fail its neighbours. Futures resolve only after the commit.

    A subclass sets the class attributes, calls `__init__`, starts the committer with
    `_start_committer` once connected and stops it with `_stop_committer` before
    disconnecting.
    """

    # The dialect's command classes.
    _commands: ClassVar[CommandSet]
    # "sqlite" or "postgres", for messages.
    _dialect: ClassVar[str]
    # What the dialect's documentation calls the committer ("committer", "lane"), for messages.
    _committer_noun: ClassVar[str]
    # The dialect module's logger, so that its messages keep their origin.
    _log: ClassVar[logging.Logger]

    def __init__(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._queue: collections.deque[AnyCommand] = collections.deque()
        self._wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._accepting = False
        self._lifecycle = asyncio.Lock()
        self._commit_observer: Callable[[float, int], None] | None = None

    def observe_commits(self, observer: Callable[[float, int], None]) -> None:
        """Report each group commit: its duration in seconds and how many writes it held."""
        self._commit_observer = observer

    # --- life cycle ---

    def _start_committer(self, name: str) -> None:
        """Accept writes from now on and start the committer task."""
        self._queue.clear()
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._committer = asyncio.get_running_loop().create_task(self._run_committer(), name=name)

    async def _stop_committer(self) -> None:
        """Refuse new writes and wait until the committer has committed the queued ones."""
        self._accepting = False
        committer, self._committer = self._committer, None
        if committer is not None:
            self._wakeup.set()
            # The committer drains the queue before it returns. A committer that died has
            # failed its commands already; closing must still release connections.
            await asyncio.wait([committer])
            if not committer.cancelled() and committer.exception() is not None:
                self._log.error(
                    "the %s %s had stopped",
                    self._dialect,
                    self._committer_noun,
                    exc_info=committer.exception(),
                )

    def _not_open(self) -> StoreUnavailableError:
        return StoreUnavailableError(f"the {self._dialect} store is not open")

    def _check_open(self) -> None:
        """Raise `StoreUnavailableError` unless the store serves calls."""
        if not self._accepting:
            raise self._not_open()

    # --- the group commit ---

    def _submit(self, command: Command[_T]) -> asyncio.Future[_T]:
        if not self._accepting:
            raise self._not_open()
        self._queue.append(command)
        self._wakeup.set()
        return command.future

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _run_committer(self) -> None:
        batch: list[AnyCommand] = []
        try:
            while True:
                if not self._queue:
                    if not self._accepting:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                # One turn of the loop first: tasks woken together with this one (a dispatcher
                # woken by a schedule, the next stream message) queue their writes into this
                # commit rather than waiting a whole commit for the next.
                await asyncio.sleep(0)
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                await self._commit(batch)
                batch = []
        except BaseException as exc:
            # Never leave a caller waiting, whatever stopped the committer.
            error = StoreUnavailableError(
                f"the {self._dialect} store's {self._committer_noun} stopped: {exc!r}"
            )
            for command in [*batch, *self._queue]:
                command.fail(error)
            self._queue.clear()
            self._accepting = False
            raise

    async def _commit(self, batch: list[AnyCommand]) -> None:
        started = time.perf_counter()
        try:
            await self._run(batch)
        except ErgonError as error:
            if len(batch) == 1 or isinstance(error, StoreUnavailableError):
                for command in batch:
                    command.fail(error)
                return
            self._log.warning(
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
        if self._commit_observer is not None:
            # The batch is committed whatever the observer does: it must neither re-run it
            # nor stop the committer.
            try:
                self._commit_observer(time.perf_counter() - started, len(batch))
            except Exception:
                self._log.exception("the commit observer failed")
        if any(command.urgent for command in batch):
            for command in batch:
                if command.urgent:
                    command.resolve()
            # The rest a loop turn later, once the urgent callers have acted on their answers.
            asyncio.get_running_loop().call_soon(_resolve_all, batch)
        else:
            _resolve_all(batch)

    async def _run(self, batch: Sequence[AnyCommand]) -> None:
        """Apply a batch in one transaction, or raise an `ErgonError` having applied nothing."""
        raise NotImplementedError

    # --- writes ---

    async def register_flow_types(self, flow_types: Sequence[str], now_ms: int) -> None:
        """Remember that workers run these flow types (kept across restarts)."""
        check_texts(flow_types, "a flow_type")
        types = unique(flow_types)
        await self._submit(self._commands.register_flow_types(self._future(), types, now_ms))

    async def schedule_flows(self, flows: Sequence[NewFlow], now_ms: int) -> list[ScheduleResult]:
        """Create flows as PENDING, one result per input in order, all in one transaction."""
        for flow in flows:
            check_new_flow(flow)
        return await self._submit(
            self._commands.schedule_flows(self._future(), list(flows), now_ms)
        )

    async def claim_flows(
        self,
        session_id: str,
        flow_types: Sequence[str],
        limit: int,
        lease_expires_at: int,
        now_ms: int,
    ) -> list[ClaimedFlow]:
        """Lease up to `limit` PENDING flows of these types whose ready_at <= now_ms.

        On PostgreSQL, rows another replica holds locked at that moment are skipped (SKIP
        LOCKED), so two replicas never claim one flow and never wait for each other.
        """
        check_text(session_id, "a session_id")
        check_texts(flow_types, "a flow_type")
        command = self._commands.claim_flows(
            self._future(), session_id, unique(flow_types), limit, lease_expires_at, now_ms
        )
        return await self._submit(command)

    async def record_steps(self, records: Sequence[StepRecord], now_ms: int) -> list[WriteOutcome]:
        """Apply step outcomes, fenced, one outcome per record in order."""
        for record in records:
            check_step_record(record)
        return await self._submit(
            self._commands.record_steps(self._future(), list(records), now_ms)
        )

    async def finish_flows(
        self, finishes: Sequence[FlowFinish], now_ms: int
    ) -> tuple[list[WriteOutcome], list[Satisfied]]:
        """End flows (or re-queue them for a retry), fenced; see `FlowFinish`.

        A retried finish of a flow that a cancel request ended (CANCELLED, same token)
        answers OK, whatever it asks.
        """
        for finish in finishes:
            check_finish(finish)
        return await self._submit(
            self._commands.finish_flows(self._future(), list(finishes), now_ms)
        )

    async def release_flows(self, leases: Sequence[Lease], now_ms: int) -> list[WriteOutcome]:
        """Give flows back unfinished: RUNNING -> PENDING, ready now, lease cleared, fenced."""
        check_leases(leases)
        return await self._submit(
            self._commands.release_flows(self._future(), list(leases), now_ms)
        )

    async def renew_leases(
        self, session_id: str, lease_expires_at: int, flow_ids: Sequence[str] | None = None
    ) -> int:
        """Extend the session's RUNNING leases (only on `flow_ids` if given); how many."""
        check_text(session_id, "a session_id")
        check_texts(flow_ids or (), "a flow_id")
        only = None if flow_ids is None else tuple(unique(flow_ids))
        return await self._submit(
            self._commands.renew_leases(self._future(), session_id, lease_expires_at, only)
        )

    async def reattach_leases(
        self, session_id: str, leases: Sequence[Lease], lease_expires_at: int, now_ms: int
    ) -> list[str]:
        """Move leases a reconnecting worker still holds to its new session.

        A lease is live while `now_ms <= lease_expires_at` (`expire_leases` takes it only
        once `lease_expires_at < now_ms`).
        """
        check_text(session_id, "a session_id")
        check_leases(leases)
        command = self._commands.reattach_leases(
            self._future(), session_id, list(leases), lease_expires_at, now_ms
        )
        return await self._submit(command)

    async def expire_leases(self, now_ms: int, limit: int) -> list[Lease]:
        """Re-queue up to `limit` RUNNING flows whose lease expired before now_ms.

        The soonest expired first (ties in scheduling order); the leases, in that order.
        """
        if limit <= 0:
            self._check_open()
            return []
        return await self._submit(self._commands.expire_leases(self._future(), now_ms, limit))

    async def cancel_flow(
        self, flow_id: str, reason: str, now_ms: int
    ) -> tuple[CancelOutcome, list[Satisfied]]:
        """Cancel a flow that has not ended, recording a CANCEL entry under `CANCEL_KEY`.

        The cancellation (`cancellation_failure(reason)`) is the entry's error and, once the
        flow is CANCELLED, the flow's error; a flow cancelled twice keeps the first.
        """
        check_text(flow_id, "a flow_id")
        return await self._submit(
            self._commands.cancel_flow(self._future(), flow_id, reason, now_ms)
        )

    async def send_signal(
        self, flow_id: str, name: str, payload: bytes, request_id: str, now_ms: int
    ) -> SignalResult:
        """Append a signal to the flow's (flow, name) mailbox; an open wait consumes it."""
        check_text(flow_id, "a flow_id")
        check_text(name, "a signal name")
        check_text(request_id, "a request_id")
        command = self._commands.send_signal(
            self._future(), flow_id, name, payload, request_id, now_ms
        )
        return await self._submit(command)

    async def signal_with_schedule(
        self, flow: NewFlow, name: str, payload: bytes, now_ms: int
    ) -> tuple[ScheduleResult, SignalResult]:
        """Schedule the flow as `schedule_flows` would and deliver a signal to it, atomically.

        The flow's `request_id` also deduplicates the signal, so a retried call appends
        nothing. On CONFLICT no signal is delivered and the signal answer is NOT_FOUND.
        """
        check_new_flow(flow)
        check_text(name, "a signal name")
        command = self._commands.signal_with_schedule(self._future(), flow, name, payload, now_ms)
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
        kind = self._commands.register_waits_barrier if unknown else self._commands.register_waits
        return await self._submit(kind(self._future(), list(waits), now_ms))

    async def suspend_flows(
        self, requests: Sequence[SuspendRequest], now_ms: int
    ) -> tuple[list[SuspendResult], list[Satisfied]]:
        """Let flows whose every branch waits give their slot back, fenced.

        The open waits in `abandoned_keys` (not in `open_keys`) are cancelled whatever the
        answer; other open waits are left alone. RESUME carries the entries of `open_keys` in
        journal order.
        """
        for request in requests:
            check_suspend(request)
        return await self._submit(
            self._commands.suspend_flows(self._future(), list(requests), now_ms)
        )

    async def fire_timers(self, now_ms: int, limit: int) -> list[Satisfied]:
        """Fire up to `limit` open TIMER waits with fire_at <= now_ms, oldest first.

        Ties are broken by (flow_id, key). Timers of ended flows are cancelled on the way and
        do not count toward `limit`; a limit below 1 fires nothing. On PostgreSQL, a timer of
        a flow that another replica is writing at that moment is left for a later scan.
        """
        if limit <= 0:
            self._check_open()
            return []
        return await self._submit(self._commands.fire_timers(self._future(), now_ms, limit))

    async def park_flows(
        self, parks: Sequence[Park], now_ms: int, initial_delay_ms: int, max_delay_ms: int
    ) -> list[WriteOutcome]:
        """Park flows whose code no longer matches their journal, fenced."""
        check_park_delays(initial_delay_ms, max_delay_ms)
        for park in parks:
            check_park(park)
        command = self._commands.park_flows(
            self._future(), list(parks), now_ms, initial_delay_ms, max_delay_ms
        )
        return await self._submit(command)
