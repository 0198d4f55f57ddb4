"""Worker sessions and the events that cross a worker's stream, as domain objects.

The rpc layer turns protobuf messages into the `*In` events and the `Out*` events back into
protobuf; a `Session` is the engine's side of one worker stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ergon_server.errors import (
    ErgonError,
    FailedPreconditionError,
    NotFoundError,
    error_for_code,
)
from ergon_server.model import (
    ClaimedFlow,
    FlowFinish,
    JournalRecord,
    Lease,
    Park,
    StepRecord,
    SuspendRequest,
    WaitRequest,
    WriteOutcome,
)

# The gRPC status code of an ack that accepts its event.
CODE_OK = 0


def lease_lost(flow_id: str) -> FailedPreconditionError:
    """The refusal of a write under a lease the worker no longer holds."""
    return FailedPreconditionError(
        f"the lease on flow {flow_id!r} is no longer held by this worker", "LEASE_LOST"
    )


def outcome_error(outcome: WriteOutcome, flow_id: str) -> ErgonError | None:
    """The refusal a fenced write's outcome stands for; None when it applied."""
    if outcome is WriteOutcome.OK:
        return None
    if outcome is WriteOutcome.LEASE_LOST:
        return lease_lost(flow_id)
    if outcome is WriteOutcome.NOT_RECORDED:
        return FailedPreconditionError(
            f"flow {flow_id!r} cannot end before the step results it names are recorded",
            "STEP_NOT_RECORDED",
        )
    return NotFoundError(f"flow {flow_id!r} does not exist", "FLOW_NOT_FOUND")


@dataclass(frozen=True, slots=True)
class StepResultIn:
    """A worker reports a step attempt's outcome (and how long the attempt ran)."""

    seq: int
    record: StepRecord
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class FlowFinishIn:
    """A worker reports a flow's end (or asks for a flow retry)."""

    seq: int
    finish: FlowFinish


@dataclass(frozen=True, slots=True)
class ReleaseIn:
    """A worker gives a flow back unfinished."""

    seq: int
    lease: Lease


@dataclass(frozen=True, slots=True)
class HeartbeatIn:
    """A worker is alive; its leases are renewed."""

    seq: int


@dataclass(frozen=True, slots=True)
class CapacityIn:
    """A worker changes how many flows it may hold."""

    seq: int
    capacity: int


@dataclass(frozen=True, slots=True)
class WaitIn:
    """A flow registers a wait."""

    seq: int
    wait: WaitRequest


@dataclass(frozen=True, slots=True)
class SuspendIn:
    """A flow whose branches all wait gives its slot back."""

    seq: int
    suspend: SuspendRequest


@dataclass(frozen=True, slots=True)
class ParkIn:
    """A flow whose code no longer matches its journal is parked."""

    seq: int
    park: Park


WorkerEventIn = (
    StepResultIn | FlowFinishIn | ReleaseIn | HeartbeatIn | CapacityIn | WaitIn | SuspendIn | ParkIn
)


@dataclass(frozen=True, slots=True)
class AckOut:
    """The answer to a worker event, sent once the event is durable (or refused)."""

    seq: int
    code: int = CODE_OK
    reason: str = ""
    message: str = ""
    entries: tuple[JournalRecord, ...] = ()
    fire_at_ms: int = 0
    server_time_ms: int = 0
    suspended: bool = False
    # The flow whose suspend met satisfied waits (RESUME): `entries` are its, and may go to
    # the worker as wakeups when they are too large together for one message.
    resumed: Lease | None = None

    @classmethod
    def for_outcome(cls, seq: int, outcome: WriteOutcome, flow_id: str) -> AckOut:
        """The ack for a fenced write's outcome."""
        error = outcome_error(outcome, flow_id)
        return cls(seq) if error is None else cls.refusing(seq, error)

    @classmethod
    def refusing(cls, seq: int, error: ErgonError) -> AckOut:
        """The ack that refuses an event with this error's status."""
        return cls(seq, error.grpc_code, error.reason, error.message)

    def error(self) -> ErgonError | None:
        """The error this ack refuses its event with; None when it accepts it."""
        if self.code == CODE_OK:
            return None
        return error_for_code(self.code, self.message, self.reason)


@dataclass(frozen=True, slots=True)
class AssignmentOut:
    """A flow to run under a lease."""

    flow: ClaimedFlow


@dataclass(frozen=True, slots=True)
class RevokeOut:
    """The worker must stop running a flow."""

    flow_id: str
    lease_token: int
    reason: str


@dataclass(frozen=True, slots=True)
class WakeupOut:
    """A wait of a flow the worker holds is satisfied."""

    flow_id: str
    lease_token: int
    entry: JournalRecord


@dataclass(frozen=True, slots=True)
class CancelRequestedOut:
    """The flow the worker holds was cancelled: stop at the next step boundary."""

    flow_id: str
    lease_token: int
    reason: str


@dataclass(frozen=True, slots=True)
class PingOut:
    """Liveness from the server."""


@dataclass(frozen=True, slots=True)
class DrainOut:
    """The server is going away."""


ServerEventOut = (
    AckOut | AssignmentOut | RevokeOut | PingOut | DrainOut | WakeupOut | CancelRequestedOut
)


class Session:
    """The engine's side of one worker stream: its capacity, its leases, its outbox.

    Events for the worker are appended to an outbox and taken as one batch by the stream's
    writer, so whatever is ready when the writer runs goes out in one message.
    """

    def __init__(
        self,
        session_id: str,
        worker_id: str,
        flow_types: tuple[str, ...],
        capacity: int,
        *,
        connected_at: int = 0,
        peer: str = "",
    ) -> None:
        self.session_id = session_id
        self.connected_at = connected_at
        self.peer = peer
        self.worker_id = worker_id
        self.flow_types = flow_types
        self.capacity = capacity
        # flow_id -> lease token of every flow this session runs.
        self.held: dict[str, int] = {}
        self.assigned_total = 0
        self.closed = False
        # When the worker was last heard from (engine clock, ms); set by the engine.
        self.last_heard_ms: int | None = None
        self._outbox: list[ServerEventOut] = []
        self._ready = asyncio.Event()

    @property
    def free(self) -> int:
        """How many more flows the session may take now."""
        return 0 if self.closed else max(0, self.capacity - len(self.held))

    @property
    def load(self) -> float:
        """Fraction of capacity in use (1.0 when it can take nothing)."""
        return 1.0 if self.capacity <= 0 else len(self.held) / self.capacity

    def send(self, event: ServerEventOut) -> None:
        """Queue an event for the worker."""
        if not self.closed:
            self._outbox.append(event)
            self._ready.set()

    async def next_batch(self) -> list[ServerEventOut]:
        """Wait for events and take all that are queued; empty once the session is closed."""
        while not self._outbox:
            if self.closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        batch, self._outbox = self._outbox, []
        return batch

    def put_back(self, assignments: list[AssignmentOut]) -> None:
        """Return assignments taken but never written to the outbox's head.

        Even once closed: `take_undelivered` then finds them and gives their flows back.
        """
        if assignments:
            self._outbox[:0] = assignments

    def take_undelivered(self) -> list[ClaimedFlow]:
        """Remove the assignments still queued (never written) and return their flows."""
        flows = [e.flow for e in self._outbox if isinstance(e, AssignmentOut)]
        self._outbox = [e for e in self._outbox if not isinstance(e, AssignmentOut)]
        return flows

    def close(self) -> None:
        """Stop the session; the writer's pending `next_batch` returns."""
        self.closed = True
        self._ready.set()
