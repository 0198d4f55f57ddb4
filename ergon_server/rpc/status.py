"""Domain errors to gRPC statuses with `google.rpc.ErrorInfo`, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ergon_server.errors import (
    ErgonError,
)

log = logging.getLogger(__name__)

DOMAIN = "ergon"


def code_for(error: ErgonError) -> grpc.StatusCode:
    """The gRPC code of a domain error (INTERNAL for anything unexpected)."""
    for code in grpc.StatusCode:
        if code.value[0] == error.grpc_code:
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(code: grpc.StatusCode, message: str, reason: str) -> grpc.Status:
    """A status whose details carry `ErrorInfo(domain="ergon", reason=...)`."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])
    )
    return status


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ErgonError) -> NoReturn:
    """End the call with the error's precise status."""
    status = rich_status(code_for(error), error.message, error.reason)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def _fail(
    method: str, context: grpc.aio.ServicerContext[Any, Any], error: Exception
) -> NoReturn:
    if isinstance(error, ErgonError):
        level = logging.ERROR if code_for(error) is grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            "%s refused (%s): %s",
            method,
            error.reason,
            error.message,
            extra={"method": method, "reason": error.reason},
        )
        await abort(context, error)
    log.exception("%s failed with a bug", method)
    await abort(context, ErgonError(f"internal error in {method}; see the server log"))


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Unary = Callable[[Servicer, Request, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Response]]


def unary(method: Unary[Servicer, Request, Response]) -> Unary[Servicer, Request, Response]:
    """Translate a unary handler's errors into statuses, logged once here."""

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _fail(method.__name__, context, error)

    return wrapper


StreamHandler = Callable[
    [Servicer, AsyncIterator[Request], "grpc.aio.ServicerContext[Any, Any]"],
    AsyncIterator[Response],
]


def stream(
    method: StreamHandler[Servicer, Request, Response],
) -> StreamHandler[Servicer, Request, Response]:
    """Translate a streaming handler's errors into statuses, logged once here."""

    @functools.wraps(method)
    async def wrapper(
        self: Servicer,
        requests: AsyncIterator[Request],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Response]:
        try:
            async for response in method(self, requests, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _fail(method.__name__, context, error)

    return wrapper
