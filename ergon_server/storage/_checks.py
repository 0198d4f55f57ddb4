"""Argument checks and shared values every backend applies the same way."""

from __future__ import annotations

from ergon_server.errors import InvalidArgumentError
from ergon_server.model import Failure, FlowFinish, FlowStatus, NewFlow


def check_new_flow(flow: NewFlow) -> None:
    """Refuse a flow to schedule that has no id or no type.

    Args:
        flow: The flow to schedule.

    Raises:
        InvalidArgumentError: `flow_id` or `flow_type` is empty.
    """
    if not flow.flow_id:
        raise InvalidArgumentError("a flow needs a non-empty flow_id")
    if not flow.flow_type:
        raise InvalidArgumentError(f"flow {flow.flow_id!r} needs a non-empty flow_type")


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
