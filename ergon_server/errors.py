"""The server's error tree, translated to gRPC statuses once, in `rpc/status.py`.

ErgonError
├── InvalidArgumentError      INVALID_ARGUMENT   (bad ids, malformed payloads, ...)
├── NotFoundError             NOT_FOUND          (FLOW_NOT_FOUND, UNKNOWN_FLOW_TYPE)
├── AlreadyExistsError        ALREADY_EXISTS     (FLOW_ALREADY_SCHEDULED)
├── FailedPreconditionError   FAILED_PRECONDITION (FLOW_CLOSED, LEASE_LOST, ...)
├── ResourceExhaustedError    RESOURCE_EXHAUSTED (PAYLOAD_TOO_LARGE)
├── UnavailableError          UNAVAILABLE        (draining, store down)
│   └── StoreUnavailableError
└── StoreError                INTERNAL           (a bug or a corrupt store)
    └── SchemaVersionError    the store was migrated by newer code
"""

from __future__ import annotations


class ErgonError(Exception):
    """Root of every error the server raises on purpose.

    Args:
        message: A readable explanation for the caller.
        reason: A stable machine-readable reason (the `ErrorInfo.reason` on the wire).
    """

    default_reason = "INTERNAL"
    # The gRPC status code (its number, so the engine needs no grpc import).
    grpc_code = 13

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgumentError(ErgonError):
    """The request is malformed."""

    default_reason = "INVALID_ARGUMENT"
    grpc_code = 3


class NotFoundError(ErgonError):
    """The thing named does not exist."""

    default_reason = "FLOW_NOT_FOUND"
    grpc_code = 5


class AlreadyExistsError(ErgonError):
    """The flow id is taken by a different flow."""

    default_reason = "FLOW_ALREADY_SCHEDULED"
    grpc_code = 6


class FailedPreconditionError(ErgonError):
    """The request cannot apply in the flow's current state."""

    default_reason = "FLOW_CLOSED"
    grpc_code = 9


class ResourceExhaustedError(ErgonError):
    """A size or count limit was exceeded; retrying the same request cannot help."""

    default_reason = "PAYLOAD_TOO_LARGE"
    grpc_code = 8


class UnavailableError(ErgonError):
    """The server cannot serve right now; the caller may retry."""

    default_reason = "UNAVAILABLE"
    grpc_code = 14


class StoreUnavailableError(UnavailableError):
    """The store cannot be reached or written (disk full, database down)."""

    default_reason = "STORE_UNAVAILABLE"


class StoreError(ErgonError):
    """The store failed in a way retrying will not fix."""

    default_reason = "STORE_ERROR"
    grpc_code = 13


class SchemaVersionError(StoreError):
    """The store's schema is newer than this code knows."""

    default_reason = "SCHEMA_TOO_NEW"


def error_for_code(grpc_code: int, message: str, reason: str) -> ErgonError:
    """The error for a status code number (an ack that refused a worker event with it)."""
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
    ):
        if cls.grpc_code == grpc_code:
            return cls(message, reason)
    return StoreError(message, reason)
