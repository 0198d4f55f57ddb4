"""The SDK's error tree. gRPC errors are translated into it once, where they enter.

ErgonError
├── RpcError                      the server refused a call (code, reason, message)
│   ├── InvalidArgumentError
│   │   └── MalformedPayloadError
│   ├── FlowNotFoundError
│   ├── UnknownFlowTypeError
│   ├── FlowAlreadyScheduledError
│   ├── FlowClosedError
│   ├── LeaseLostError
│   ├── PayloadTooLargeError
│   ├── ServerUnavailableError
│   ├── PermissionDeniedError
│   └── UnauthenticatedError
├── StepFailedError               a step failed for good (replayed as the same error)
├── HistoryMismatchError          the flow's code no longer matches its journal
├── NonRetryableError             raise it (or a subclass) to stop retries
└── ConverterError                a value cannot be encoded or decoded
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


class ErgonError(Exception):
    """Root of every error the SDK raises."""


class RpcError(ErgonError):
    """The server refused a call.

    Attributes:
        code: the gRPC status code.
        reason: the stable `ErrorInfo.reason` (e.g. FLOW_NOT_FOUND), or "" when none.
        message: the server's readable explanation.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(
            f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}"
        )
        self.code = code
        self.reason = reason
        self.message = message


class InvalidArgumentError(RpcError):
    """The request was malformed."""


class MalformedPayloadError(InvalidArgumentError):
    """A payload's encoding is unknown or its bytes do not parse."""


class FlowNotFoundError(RpcError):
    """No flow has that id."""


class UnknownFlowTypeError(RpcError):
    """No worker has registered that flow type."""


class FlowAlreadyScheduledError(RpcError):
    """The flow id is taken by a flow with another type or input."""


class FlowClosedError(RpcError):
    """The flow has already ended."""


class LeaseLostError(RpcError):
    """This worker no longer holds the flow's lease: another worker has it, or it was cancelled."""


class PayloadTooLargeError(RpcError):
    """A payload is over the size limit; retrying cannot help."""


class ServerUnavailableError(RpcError):
    """The server cannot be reached or cannot serve now (retried before this is raised)."""


class PermissionDeniedError(RpcError):
    """The credentials do not allow this call."""


class UnauthenticatedError(RpcError):
    """No valid credentials were given."""


_BY_REASON: dict[str, type[RpcError]] = {
    "FLOW_NOT_FOUND": FlowNotFoundError,
    "UNKNOWN_FLOW_TYPE": UnknownFlowTypeError,
    "FLOW_ALREADY_SCHEDULED": FlowAlreadyScheduledError,
    "FLOW_CLOSED": FlowClosedError,
    "LEASE_LOST": LeaseLostError,
    "PAYLOAD_TOO_LARGE": PayloadTooLargeError,
    "MALFORMED_PAYLOAD": MalformedPayloadError,
    "UNKNOWN_ENCODING": MalformedPayloadError,
}
_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: FlowNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: FlowAlreadyScheduledError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: PayloadTooLargeError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def rpc_error(code: grpc.StatusCode, reason: str, message: str) -> RpcError:
    """The most specific error for a status code and reason."""
    kind = _BY_REASON.get(reason) or _BY_CODE.get(code, RpcError)
    return kind(code, reason, message)


class StepFailedError(ErgonError):
    """A step failed for good; raised into the flow, the same on first run and on replay.

    Attributes:
        step_key: the step's journal key ("name#occurrence").
        error_type: the type name of the step's exception.
        message: the exception's message.
        non_retryable: whether the step's error was one its retry policy never retries (a
            `NonRetryableError`, a listed type): a flow retry would fail the same way, so
            the flow's own retry policy does not retry it either.
    """

    def __init__(
        self, step_key: str, error_type: str, message: str, *, non_retryable: bool = False
    ) -> None:
        super().__init__(f"step {step_key} failed: {error_type}: {message}")
        self.step_key = step_key
        self.error_type = error_type
        self.message = message
        self.non_retryable = non_retryable


class ChildFlowError(ErgonError):
    """A child flow failed (or was cancelled); raised where the parent awaits its result.

    Attributes:
        type_name: the type name of the child's error.
        message: the child's error message.
        retryable: whether the child's error was retryable (the parent's retry policy
            does not retry the parent for a child's non-retryable error).
    """

    def __init__(self, type_name: str, message: str, retryable: bool) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.retryable = retryable


class FlowCancelledError(ErgonError):
    """The flow was cancelled. Raised once, at the flow's next step or wait.

    The flow may catch it to run clean-up steps; whatever it returns, it ends CANCELLED.
    """

    reason = "CANCELLED"


class DagExecutionError(ErgonError):
    """A `dag()` is malformed (unknown dependency, cycle) or one of its steps failed."""


class HistoryMismatchError(ErgonError):
    """The flow's code no longer matches what its journal recorded."""

    reason = "HISTORY_MISMATCH"


class NonRetryableError(ErgonError):
    """Raise this (or a subclass) from a step or flow to fail it without retrying."""


class ConverterError(ErgonError):
    """A value cannot be turned into a payload, or a payload into a value."""


def _error_info(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason: str = info.reason
                    return reason
    return ""


def translate(error: grpc.aio.AioRpcError) -> RpcError:
    """The SDK error for a failed call, with the server's ErrorInfo reason."""
    return rpc_error(error.code(), _error_info(error), error.details() or "")
