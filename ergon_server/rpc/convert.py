"""Protobuf <-> domain translation, with the validation that belongs at the wire."""

from __future__ import annotations

import json
import math

from google.protobuf import json_format, timestamp_pb2

from ergon_server.errors import InvalidArgumentError, ResourceExhaustedError
from ergon_server.model import (
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    Failure,
    FlowRecord,
    FlowStatus,
    JournalRecord,
    NewFlow,
    RetryPolicy,
)
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, scheduler_pb2, worker_pb2

ENCODINGS = frozenset({"", "json/plain", "binary/plain", "binary/null", "python/pickle"})
JSON_ENCODINGS = frozenset({"", "json/plain"})
# The last instant a protobuf Timestamp can hold (9999-12-31T23:59:59.999Z), in epoch ms:
# the latest time the server stores (start times, timers, retries).
MAX_TIME_MS = 253_402_300_799_999


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


FLOW_STATUS_TO_PROTO = {
    FlowStatus.PENDING: common_pb2.FLOW_STATUS_PENDING,
    FlowStatus.RUNNING: common_pb2.FLOW_STATUS_RUNNING,
    FlowStatus.WAITING: common_pb2.FLOW_STATUS_WAITING,
    FlowStatus.COMPLETED: common_pb2.FLOW_STATUS_COMPLETED,
    FlowStatus.FAILED: common_pb2.FLOW_STATUS_FAILED,
    FlowStatus.CANCELLED: common_pb2.FLOW_STATUS_CANCELLED,
}
FLOW_STATUS_FROM_PROTO = {v: k for k, v in FLOW_STATUS_TO_PROTO.items()}
ENTRY_KIND_TO_PROTO = {
    EntryKind.STEP: common_pb2.ENTRY_KIND_STEP,
    EntryKind.TIMER: common_pb2.ENTRY_KIND_TIMER,
    EntryKind.SIGNAL: common_pb2.ENTRY_KIND_SIGNAL,
    EntryKind.CHILD: common_pb2.ENTRY_KIND_CHILD,
    EntryKind.CANCEL: common_pb2.ENTRY_KIND_CANCEL,
}
ENTRY_KIND_FROM_PROTO = {v: k for k, v in ENTRY_KIND_TO_PROTO.items()}
ENTRY_STATUS_TO_PROTO = {
    EntryStatus.RETRYING: common_pb2.ENTRY_STATUS_RETRYING,
    EntryStatus.COMPLETED: common_pb2.ENTRY_STATUS_COMPLETED,
    EntryStatus.FAILED: common_pb2.ENTRY_STATUS_FAILED,
}


def payload_bytes(
    payload: common_pb2.Payload, max_bytes: int, what: str, *, check_json: bool = True
) -> bytes:
    """Validate a payload from the wire and serialize it for the store.

    Raises:
        ResourceExhaustedError: PAYLOAD_TOO_LARGE when it is over the limit.
        InvalidArgumentError: an unknown encoding, or JSON that does not parse.
    """
    size = payload.ByteSize()
    if size > max_bytes:
        raise ResourceExhaustedError(
            f"{what} is {size} bytes; the limit is {max_bytes} bytes", "PAYLOAD_TOO_LARGE"
        )
    if payload.encoding not in ENCODINGS:
        raise InvalidArgumentError(
            f"{what} has unknown encoding {payload.encoding!r}; "
            f"use one of {', '.join(sorted(e for e in ENCODINGS if e))}",
            "UNKNOWN_ENCODING",
        )
    body = payload.WhichOneof("body")
    if body == "json" and payload.encoding not in JSON_ENCODINGS:
        raise InvalidArgumentError(
            f"{what} carries inline json but says encoding {payload.encoding!r}",
            "MALFORMED_PAYLOAD",
        )
    if check_json and body == "data" and payload.encoding in JSON_ENCODINGS:
        try:
            json.loads(payload.data, parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidArgumentError(
                f"{what} is not valid JSON: {error}", "MALFORMED_PAYLOAD"
            ) from None
    if body == "json":
        try:
            # Refuses what JSON cannot carry: NaN and infinite numbers, a Value of no kind.
            json_format.MessageToJson(payload.json)
        except (ValueError, json_format.Error) as error:
            raise InvalidArgumentError(
                f"{what} is not valid inline JSON: {error}", "MALFORMED_PAYLOAD"
            ) from None
    return payload.SerializeToString()


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    """A protobuf timestamp from epoch milliseconds."""
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def retry_policy_from_proto(policy: common_pb2.RetryPolicy) -> RetryPolicy:
    """A domain retry policy, validated."""
    if policy.max_attempts < 0 or policy.initial_delay_ms < 0 or policy.max_delay_ms < 0:
        raise InvalidArgumentError("retry policy values must not be negative", "INVALID_RETRY")
    if not math.isfinite(policy.backoff_multiplier):
        raise InvalidArgumentError("backoff_multiplier must be a finite number", "INVALID_RETRY")
    if policy.backoff_multiplier and policy.backoff_multiplier < 1.0:
        raise InvalidArgumentError("backoff_multiplier must be at least 1.0", "INVALID_RETRY")
    return RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_delay_ms=policy.initial_delay_ms,
        max_delay_ms=policy.max_delay_ms,
        backoff_multiplier=policy.backoff_multiplier or 1.0,
        non_retryable_error_types=tuple(policy.non_retryable_error_types),
    )


def retry_policy_to_proto(policy: RetryPolicy) -> common_pb2.RetryPolicy:
    """The wire form of a retry policy."""
    return common_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_delay_ms=policy.initial_delay_ms,
        max_delay_ms=policy.max_delay_ms,
        backoff_multiplier=policy.backoff_multiplier,
        non_retryable_error_types=list(policy.non_retryable_error_types),
    )


def failure_from_proto(failure: common_pb2.Failure) -> Failure:
    """A domain failure."""
    return Failure(
        type=failure.type,
        message=failure.message,
        non_retryable=failure.non_retryable,
        stack_trace=failure.stack_trace,
        reason=failure.reason,
    )


def failure_to_proto(failure: Failure) -> common_pb2.Failure:
    """The wire form of a failure."""
    return common_pb2.Failure(
        type=failure.type,
        message=failure.message,
        non_retryable=failure.non_retryable,
        stack_trace=failure.stack_trace,
        reason=failure.reason,
    )


def _start_at(request: scheduler_pb2.ScheduleFlowRequest) -> int | None:
    if not request.HasField("start_at"):
        return None
    try:
        return request.start_at.ToMilliseconds()
    except ValueError as error:
        raise InvalidArgumentError(
            f"start_at is not a valid timestamp: {error}", "INVALID_TIMESTAMP"
        ) from None


def new_flow_from_proto(request: scheduler_pb2.ScheduleFlowRequest, max_bytes: int) -> NewFlow:
    """A flow to schedule, validated."""
    labels = dict(request.labels)
    for key, value in labels.items():
        if len(key) > 256 or len(value) > 1024:
            raise InvalidArgumentError("labels are limited to 256-char keys, 1024-char values")
    return NewFlow(
        flow_id=request.flow_id,
        flow_type=request.flow_type,
        input=payload_bytes(request.input, max_bytes, "the flow input"),
        request_id=request.request_id,
        start_at=_start_at(request),
        retry_policy=(
            retry_policy_from_proto(request.retry_policy)
            if request.HasField("retry_policy")
            else None
        ),
        labels=labels,
    )


def flow_to_proto(flow: FlowRecord) -> common_pb2.FlowInfo:
    """The wire form of a stored flow."""
    info = common_pb2.FlowInfo(
        flow_id=flow.flow_id,
        flow_type=flow.flow_type,
        status=FLOW_STATUS_TO_PROTO[flow.status],
        attempt=flow.attempt,
        labels=flow.labels,
        created_at=timestamp(flow.created_at),
        updated_at=timestamp(flow.updated_at),
        ready_at=timestamp(flow.ready_at),
        parent_flow_id=flow.parent_flow_id or "",
        cancel_requested=flow.cancel_requested,
    )
    info.input.MergeFromString(flow.input)
    if flow.result is not None:
        info.result.MergeFromString(flow.result)
    if flow.error is not None:
        info.error.CopyFrom(failure_to_proto(flow.error))
    if flow.completed_at is not None:
        info.completed_at.CopyFrom(timestamp(flow.completed_at))
    if flow.retry_policy is not None:
        info.retry_policy.CopyFrom(retry_policy_to_proto(flow.retry_policy))
    return info


def entry_to_proto(entry: JournalRecord) -> common_pb2.JournalEntry:
    """The wire form of a journal entry."""
    message = common_pb2.JournalEntry(
        sequence=entry.sequence,
        key=entry.key,
        kind=ENTRY_KIND_TO_PROTO[entry.kind],
        status=ENTRY_STATUS_TO_PROTO[entry.status],
        attempts=entry.attempts,
        args_hash=entry.args_hash,
        recorded_at=timestamp(entry.recorded_at),
    )
    if entry.result is not None:
        message.result.MergeFromString(entry.result)
    if entry.error is not None:
        message.error.CopyFrom(failure_to_proto(entry.error))
    if entry.due_at is not None:
        message.due_at.CopyFrom(timestamp(entry.due_at))
    return message


def assignment_to_proto(flow: ClaimedFlow) -> worker_pb2.Assignment:
    """The wire form of a flow handed to a worker."""
    assignment = worker_pb2.Assignment(
        flow_id=flow.flow_id,
        flow_type=flow.flow_type,
        lease_token=flow.lease_token,
        attempt=flow.attempt,
        journal=[entry_to_proto(e) for e in flow.journal],
    )
    assignment.input.MergeFromString(flow.input)
    if flow.retry_policy is not None:
        assignment.retry_policy.CopyFrom(retry_policy_to_proto(flow.retry_policy))
    return assignment
