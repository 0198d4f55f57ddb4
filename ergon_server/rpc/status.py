"""Domain errors to gRPC statuses with `google.rpc.ErrorInfo`, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, message, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ergon_server.errors import (
    ErgonError,
    InvalidArgumentError,
)

log = logging.getLogger(__name__)

DOMAIN = "ergon"
MAX_MESSAGE_CHARS = 1024


def code_for(error: ErgonError) -> grpc.StatusCode:
    """The gRPC code of a domain error (INTERNAL for anything unexpected)."""
    for code in grpc.StatusCode:
        if code.value[0] == error.grpc_code:
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(code: grpc.StatusCode, message: str, reason: str) -> grpc.Status:
    """A status whose details carry `ErrorInfo(domain="ergon", reason=...)`.

    The message travels twice in trailing metadata (grpc-message and the details), which
    clients cap at 16 KiB in all: a longer one (one echoing a huge input) is cut, or the client
    would see RESOURCE_EXHAUSTED instead of this status.
    """
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "... (cut)"
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


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request whose bytes do not parse as its message (invalid UTF-8, truncated, ...).

    gRPC answers a deserializer that raises with UNKNOWN; ours returns this instead, so the
    handler can answer INVALID_ARGUMENT with reason MALFORMED_REQUEST.
    """

    message_type: str
    error: str

    def as_error(self) -> InvalidArgumentError:
        """The refusal of this request."""
        return InvalidArgumentError(
            f"the request is not a valid {self.message_type} message: {self.error}",
            "MALFORMED_REQUEST",
        )


def _tolerant(cls: type[message.Message]) -> Callable[[bytes], message.Message | Undecodable]:
    def deserialize(data: bytes) -> message.Message | Undecodable:
        try:
            return cls.FromString(data)
        except message.DecodeError as error:
            return Undecodable(cls.DESCRIPTOR.full_name, str(error) or "does not parse")

    return deserialize


def service_handler(service: ServiceDescriptor, servicer: object) -> grpc.GenericRpcHandler:
    """The handler of a service whose undecodable requests reach the servicer as `Undecodable`.

    Used instead of the generated `add_*_to_server`, whose deserializers raise (UNKNOWN).
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour,
                request_deserializer=_tolerant(request),
                response_serializer=response.SerializeToString,
            )
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=_tolerant(request),
                response_serializer=response.SerializeToString,
            )
        else:  # pragma: no cover - ergon.v1 has no such method
            raise TypeError(f"{method.full_name}: half-streaming methods are not supported")
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


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
            if isinstance(request, Undecodable):
                raise request.as_error()
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
