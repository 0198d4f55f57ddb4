"""The domain model shared by the engine and the stores.

Times are integer milliseconds since the Unix epoch, always passed in from a `Clock`.
Payloads are opaque bytes (a serialized `ergon.v1.Payload`): the server stores and returns
them as given and never decodes user data on the hot path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FlowStatus(enum.StrEnum):
    """The life cycle of a flow; the values are what the stores persist."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """Whether the flow can never change again."""
        return self in (FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.CANCELLED)


class EntryKind(enum.StrEnum):
    """What a journal entry records."""

    STEP = "STEP"
    TIMER = "TIMER"
    SIGNAL = "SIGNAL"
    CHILD = "CHILD"
    # A cancellation request, recorded under the key CANCEL_KEY.
    CANCEL = "CANCEL"


CANCEL_KEY = "$cancel"


class EntryStatus(enum.StrEnum):
    """The state of a journal entry."""

    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def final(self) -> bool:
        """Whether the entry holds its step's outcome for good (not a retrying attempt)."""
        return self is not EntryStatus.RETRYING


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed step or flow is retried (mirrors `ergon.v1.RetryPolicy`)."""

    max_attempts: int = 1
    initial_delay_ms: int = 0
    max_delay_ms: int = 0
    backoff_multiplier: float = 1.0
    non_retryable_error_types: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Failure:
    """An error raised by a step or a flow (mirrors `ergon.v1.Failure`)."""

    type: str
    message: str
    non_retryable: bool = False
    stack_trace: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NewFlow:
    """A flow to schedule."""

    flow_id: str
    flow_type: str
    input: bytes
    request_id: str = ""
    start_at: int | None = None
    retry_policy: RetryPolicy | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # A child flow names its parent and the parent's journal key that waits for it.
    parent_flow_id: str = ""
    parent_key: str = ""


class ScheduleOutcome(enum.Enum):
    """What scheduling one flow did."""

    CREATED = "created"
    # The flow_id existed with the same type and input, or the request_id was seen before.
    EXISTING = "existing"
    # The flow_id exists with another type or input.
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    """The answer to scheduling one flow."""

    flow_id: str
    outcome: ScheduleOutcome


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """A flow as stored."""

    flow_id: str
    flow_type: str
    status: FlowStatus
    input: bytes
    result: bytes | None
    error: Failure | None
    attempt: int
    labels: dict[str, str]
    created_at: int
    updated_at: int
    ready_at: int
    completed_at: int | None
    retry_policy: RetryPolicy | None
    lease_token: int
    lease_owner: str | None
    lease_expires_at: int | None
    parent_flow_id: str | None = None
    # A cancel was asked while the flow ran: it ends CANCELLED whatever it returns.
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One durable fact of a flow's execution."""

    sequence: int
    key: str
    kind: EntryKind
    status: EntryStatus
    result: bytes | None
    error: Failure | None
    attempts: int
    args_hash: str
    recorded_at: int
    # When a TIMER entry was due, as a flow's history reports it (None elsewhere).
    due_at: int | None = None


@dataclass(frozen=True, slots=True)
class ClaimedFlow:
    """A flow just put under a lease, with what a worker needs to run it."""

    flow_id: str
    flow_type: str
    input: bytes
    lease_token: int
    attempt: int
    retry_policy: RetryPolicy | None
    journal: list[JournalRecord]
    # When it became ready: the dispatch latency is measured from here.
    ready_at: int = 0


@dataclass(frozen=True, slots=True)
class StepRecord:
    """The outcome of one step attempt, fenced by a lease token.

    status RETRYING records only the attempt count and the last error; COMPLETED records
    `result`; FAILED records `error` for good.
    """

    flow_id: str
    lease_token: int
    key: str
    kind: EntryKind
    args_hash: str
    attempts: int
    status: EntryStatus
    result: bytes | None = None
    error: Failure | None = None


@dataclass(frozen=True, slots=True)
class FlowFinish:
    """A flow's end, fenced by a lease token.

    COMPLETED carries `result`. FAILED carries `error`; with `retry_delay_ms` > 0 the flow is
    not failed but re-queued for attempt + 1 after that delay, its failed step entries dropped
    so that those steps run again (completed ones replay).
    """

    flow_id: str
    lease_token: int
    status: FlowStatus
    result: bytes | None = None
    error: Failure | None = None
    retry_delay_ms: int = 0
    # Journal keys that must be recorded (final) for the finish to apply: step results the
    # worker sent just before and has not seen acknowledged.
    requires_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Lease:
    """A flow's lease as a worker holds it."""

    flow_id: str
    lease_token: int


class WriteOutcome(enum.Enum):
    """The answer to one fenced write."""

    OK = "ok"
    # The flow is not RUNNING under this lease token (expired, re-assigned, cancelled, done).
    LEASE_LOST = "lease_lost"
    # No such flow.
    NOT_FOUND = "not_found"
    # A finish named journal keys that are not recorded (yet): nothing was written.
    NOT_RECORDED = "not_recorded"


class CancelOutcome(enum.Enum):
    """The answer to a cancel request."""

    CANCELLED = "cancelled"
    # The flow is RUNNING: it was asked to stop and will end CANCELLED.
    CANCEL_REQUESTED = "cancel_requested"
    NOT_FOUND = "not_found"
    # Already COMPLETED, FAILED or CANCELLED.
    CLOSED = "closed"


class SignalOutcome(enum.Enum):
    """The answer to delivering a signal."""

    DELIVERED = "delivered"
    NOT_FOUND = "not_found"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SignalResult:
    """Where a signal landed in its mailbox (sequence from 1 per flow and name)."""

    outcome: SignalOutcome
    sequence: int = 0
    # Set when the signal (or an older one of the same name) satisfied an open wait at once.
    satisfied: Satisfied | None = None


@dataclass(frozen=True, slots=True)
class FlowPage:
    """One page of a flow listing; `next_cursor` is None on the last page."""

    flows: list[FlowRecord]
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class WaitRequest:
    """A flow (or a step inside it) waits for a timer, a signal or a child flow, fenced.

    The wait's outcome is recorded in the journal under `key` once it is satisfied.
    TIMER: `fire_at` is the absolute fire time asked for; the first registration of a key
    fixes it for good (a durable sleep stores its wake time once). SIGNAL: the oldest
    unconsumed signal named `signal_name` is consumed, exactly once. CHILD: `child` is
    scheduled (an existing flow with its flow_id is the child) and its end satisfies the wait.
    """

    flow_id: str
    lease_token: int
    key: str
    kind: EntryKind
    fire_at: int | None = None
    signal_name: str = ""
    child: NewFlow | None = None


@dataclass(frozen=True, slots=True)
class WaitResult:
    """The answer to registering one wait.

    `entry` is set when the wait is already satisfied (its journal entry); `fire_at` is a
    timer's durable fire time.
    """

    outcome: WriteOutcome
    entry: JournalRecord | None = None
    fire_at: int | None = None


@dataclass(frozen=True, slots=True)
class SuspendRequest:
    """A flow whose every branch waits gives its slot back, fenced.

    `open_keys` are the waits it still waits for; `abandoned_keys` are waits it registered and
    no longer waits for, which are cancelled. Other open waits are left alone: a wait
    registered after the suspend was sent (that overtook it) must not be cancelled by it.
    """

    flow_id: str
    lease_token: int
    open_keys: tuple[str, ...]
    abandoned_keys: tuple[str, ...] = ()


class SuspendOutcome(enum.Enum):
    """The answer to a suspend."""

    # The flow is WAITING; its lease is cleared.
    SUSPENDED = "suspended"
    # One of the open waits is already satisfied: the flow keeps running (see `entries`).
    RESUME = "resume"
    # A cancel was requested: the flow is CANCELLED.
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class SuspendResult:
    """The answer to one suspend; `entries` are the satisfied waits' entries on RESUME."""

    outcome: SuspendOutcome
    entries: tuple[JournalRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Satisfied:
    """A wait that became satisfied.

    `status` is the flow's status after it: PENDING when it was WAITING (it is ready now),
    RUNNING when its worker holds it (that worker must be told: `lease_token`, `lease_owner`).
    """

    flow_id: str
    entry: JournalRecord
    status: FlowStatus
    lease_token: int
    lease_owner: str | None
    # TIMER: when it was due (its lateness is entry.recorded_at - fire_at); informational,
    # so not part of equality.
    fire_at: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Park:
    """A flow whose code no longer matches its journal is parked, fenced."""

    flow_id: str
    lease_token: int
    error: Failure


class StoreEventKind(enum.Enum):
    """What another process sharing the store changed (see `Store.subscribe`)."""

    # A flow became PENDING and ready now (scheduled, re-queued, released, woken).
    READY = "ready"
    # A timer was registered; it may fire before the next one known.
    TIMER = "timer"
    # A wait of a RUNNING flow was satisfied: its holder should be told (flow, token, key).
    WAKEUP = "wakeup"
    # A cancel was requested for a RUNNING flow (flow, token).
    CANCEL_REQUESTED = "cancel_requested"
    # A flow ended (COMPLETED, FAILED, CANCELLED).
    ENDED = "ended"
    # A RUNNING flow's lease expired and the flow was re-queued (flow, token): whoever holds
    # that lease must stop running it.
    LEASE_EXPIRED = "lease_expired"
    # Events may have been lost (the listener was away): look again at everything, including
    # the flows this process's sessions hold (a cancel, a satisfied wait, a lost lease).
    EVENTS_LOST = "events_lost"


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """A hint that the store changed; listeners must tolerate duplicates and losses."""

    kind: StoreEventKind
    flow_id: str = ""
    lease_token: int = 0
    key: str = ""
