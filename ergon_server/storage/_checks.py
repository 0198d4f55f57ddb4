"""Argument checks and shared values every backend applies the same way.

Text: PostgreSQL cannot hold a NUL character in a TEXT value (nor take one as a parameter),
while SQLite and memory keep it. So every store refuses, before anything runs, a NUL in any
text it stores or looks up (`check_text`): the same answer everywhere, and on PostgreSQL no
failing statement that would roll back a whole group commit. Failures, labels and retry
policies are stored as JSON, which escapes NUL, so they may hold any text.
"""

from __future__ import annotations

from collections.abc import Iterable

from ergon_server.errors import InvalidArgumentError
from ergon_server.model import (
    CANCEL_KEY,
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
    FlowStatus,
    Lease,
    NewFlow,
    Park,
    StepRecord,
    SuspendRequest,
    WaitRequest,
)

# How much of a refused value an error message quotes.
_SHOWN = 60


def check_text(value: str, what: str) -> None:
    """Refuse text holding a NUL character, which PostgreSQL cannot store.

    Args:
        value: The text to store or look up.
        what: What it is, for the message.

    Raises:
        InvalidArgumentError: `value` holds a NUL character.
    """
    if "\x00" in value:
        shown = repr(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")
        raise InvalidArgumentError(f"{what} must not hold a NUL character: {shown}")


def check_texts(values: Iterable[str], what: str) -> None:
    """`check_text` on each of `values`."""
    for value in values:
        check_text(value, what)


def check_new_flow(flow: NewFlow) -> None:
    """Refuse a flow to schedule that has no id or no type, or text with a NUL.

    Args:
        flow: The flow to schedule.

    Raises:
        InvalidArgumentError: `flow_id` or `flow_type` is empty, or a field holds a NUL.
    """
    if not flow.flow_id:
        raise InvalidArgumentError("a flow needs a non-empty flow_id")
    if not flow.flow_type:
        raise InvalidArgumentError(f"flow {flow.flow_id!r} needs a non-empty flow_type")
    check_text(flow.flow_id, "a flow_id")
    check_text(flow.flow_type, "a flow_type")
    check_text(flow.request_id, "a request_id")
    check_text(flow.parent_flow_id, "a parent flow_id")
    check_text(flow.parent_key, "a parent key")


def check_step_record(record: StepRecord) -> None:
    """Refuse a step record whose flow_id, key or args_hash holds a NUL.

    Raises:
        InvalidArgumentError: A field holds a NUL.
    """
    check_text(record.flow_id, "a step's flow_id")
    check_text(record.key, "a step's key")
    check_text(record.args_hash, "a step's args_hash")


def check_leases(leases: Iterable[Lease]) -> None:
    """Refuse leases whose flow_id holds a NUL.

    Raises:
        InvalidArgumentError: A flow_id holds a NUL.
    """
    for lease in leases:
        check_text(lease.flow_id, "a lease's flow_id")


def check_suspend(request: SuspendRequest) -> None:
    """Refuse a suspend whose flow_id or keys hold a NUL.

    Raises:
        InvalidArgumentError: A field holds a NUL.
    """
    check_text(request.flow_id, "a suspend's flow_id")
    check_texts(request.open_keys, "a suspend's open key")
    check_texts(request.abandoned_keys, "a suspend's given-up key")


def check_park(park: Park) -> None:
    """Refuse a park whose flow_id holds a NUL.

    Raises:
        InvalidArgumentError: The flow_id holds a NUL.
    """
    check_text(park.flow_id, "a park's flow_id")


def check_finish(finish: FlowFinish) -> None:
    """Refuse a flow end that is neither COMPLETED nor FAILED, or a negative retry delay.

    Args:
        finish: The flow end to apply.

    Raises:
        InvalidArgumentError: The finish cannot be applied by any store.
    """
    if finish.status not in (FlowStatus.COMPLETED, FlowStatus.FAILED):
        raise InvalidArgumentError(
            f"a flow finishes COMPLETED or FAILED, not {finish.status.value} "
            f"(flow {finish.flow_id!r})"
        )
    if finish.retry_delay_ms < 0:
        raise InvalidArgumentError(f"retry_delay_ms must not be negative (flow {finish.flow_id!r})")
    check_text(finish.flow_id, "a finish's flow_id")
    check_texts(finish.requires_keys, "a finish's required key")


def check_limit(limit: int) -> None:
    """Refuse a page size below 1.

    Args:
        limit: The most items a page may hold.

    Raises:
        InvalidArgumentError: `limit` < 1.
    """
    if limit < 1:
        raise InvalidArgumentError(f"a page limit must be at least 1, not {limit}")


def cancellation_failure(reason: str) -> Failure:
    """The error every store records on a cancelled flow.

    Args:
        reason: Why the flow was cancelled, as the caller gave it.
    """
    return Failure(type="Cancelled", message=reason, non_retryable=True, reason="CANCELLED")


def check_wait(wait: WaitRequest) -> None:
    """Refuse a wait that no store could register.

    Args:
        wait: The wait to register.

    Raises:
        InvalidArgumentError: The key is empty or reserved, the kind is not a wait, the
            kind's own field is missing (TIMER `fire_at`, SIGNAL `signal_name`, CHILD `child`,
            which must be another flow), or text holds a NUL.
    """
    check_text(wait.flow_id, "a wait's flow_id")
    check_text(wait.key, "a wait's key")
    where = f"(flow {wait.flow_id!r}, key {wait.key!r})"
    if not wait.key:
        raise InvalidArgumentError(f"a wait needs a non-empty key {where}")
    if wait.key == CANCEL_KEY:
        raise InvalidArgumentError(f"the key {CANCEL_KEY!r} is reserved for cancellation {where}")
    if wait.kind is EntryKind.TIMER:
        if wait.fire_at is None:
            raise InvalidArgumentError(f"a TIMER wait needs fire_at {where}")
    elif wait.kind is EntryKind.SIGNAL:
        if not wait.signal_name:
            raise InvalidArgumentError(f"a SIGNAL wait needs a signal_name {where}")
        check_text(wait.signal_name, "a wait's signal_name")
    elif wait.kind is EntryKind.CHILD:
        if wait.child is None:
            raise InvalidArgumentError(f"a CHILD wait needs a child flow {where}")
        check_new_flow(wait.child)
        if wait.child.flow_id == wait.flow_id:
            raise InvalidArgumentError(f"a flow cannot wait for itself as its child {where}")
    else:
        raise InvalidArgumentError(f"{wait.kind.value} is not a kind of wait {where}")


def check_park_delays(initial_delay_ms: int, max_delay_ms: int) -> None:
    """Refuse negative park delays.

    Raises:
        InvalidArgumentError: A delay is negative.
    """
    if initial_delay_ms < 0 or max_delay_ms < 0:
        raise InvalidArgumentError("park delays must not be negative")


def park_delay_ms(initial_delay_ms: int, max_delay_ms: int, parks: int) -> int:
    """How long a flow parked `parks` times before waits: min(max, initial * 2 ** parks).

    Args:
        initial_delay_ms: The delay of the first park.
        max_delay_ms: The cap.
        parks: How many times the flow was parked before.
    """
    delay = initial_delay_ms
    for _ in range(parks):
        if delay >= max_delay_ms:
            break
        delay *= 2
    return min(delay, max_delay_ms)


def child_entry(
    status: FlowStatus, result: bytes | None, error: Failure | None
) -> tuple[EntryStatus, bytes | None, Failure | None]:
    """The parent's CHILD entry (status, result, error) for a child that ended so.

    COMPLETED gives a COMPLETED entry with the child's result; FAILED and CANCELLED give a
    FAILED entry with the child's error (for CANCELLED, its cancellation).
    """
    if status is FlowStatus.COMPLETED:
        return EntryStatus.COMPLETED, result, None
    return EntryStatus.FAILED, None, error
