"""Bearer tokens with roles, checked by a server interceptor before any handler runs.

Roles: `worker` may connect workers; `client` may schedule, signal and read; `admin` may do
what a client does and cancel flows. Health checks and reflection need no token, so load
balancers and grpcurl's `list` keep working. A call without a valid token gets
UNAUTHENTICATED, one whose role does not allow the method PERMISSION_DENIED; either way the
handler never runs, so nothing is touched.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ergon_server.errors import InvalidArgumentError
from ergon_server.rpc.status import rich_status

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """What a token may do."""

    WORKER = "worker"
    CLIENT = "client"
    ADMIN = "admin"


_CLIENT = frozenset({Role.CLIENT, Role.ADMIN})
_ADMIN = frozenset({Role.ADMIN})
_WORKER = frozenset({Role.WORKER})
# Methods not listed (health, reflection) are open.
_RULES: dict[str, frozenset[Role]] = {
    "/ergon.v1.WorkerService/": _WORKER,
    "/ergon.v1.SchedulerService/CancelFlow": _ADMIN,
    "/ergon.v1.SchedulerService/": _CLIENT,
    "/ergon.v1.SignalService/": _CLIENT,
}
_STREAMING = frozenset({"/ergon.v1.WorkerService/Connect"})


def allowed_roles(method: str) -> frozenset[Role] | None:
    """The roles that may call a method, or None when it is open to all."""
    for prefix, roles in _RULES.items():
        if method == prefix or (prefix.endswith("/") and method.startswith(prefix)):
            return roles
    return None


@dataclass(frozen=True)
class Tokens:
    """The accepted bearer tokens and their roles."""

    entries: tuple[tuple[bytes, Role], ...]

    def role_of(self, token: str) -> Role | None:
        """The role of a token, compared in constant time against every known token."""
        candidate = token.encode()
        found: Role | None = None
        for secret, role in self.entries:
            # No early exit: the time taken does not depend on which token matched.
            if hmac.compare_digest(candidate, secret) and found is None:
                found = role
        return found

    @classmethod
    def parse(cls, lines: Iterable[str], source: str) -> Tokens:
        """Parse `ROLE:TOKEN` entries (one per line or comma-separated; `#` comments)."""
        entries: list[tuple[bytes, Role]] = []
        for raw in lines:
            for item in raw.split(","):
                text = item.split("#", 1)[0].strip()
                if not text:
                    continue
                role, sep, token = text.partition(":")
                if not sep or not token.strip():
                    raise InvalidArgumentError(f"{source}: expected ROLE:TOKEN, got {text!r}")
                try:
                    entries.append((token.strip().encode(), Role(role.strip().lower())))
                except ValueError:
                    raise InvalidArgumentError(
                        f"{source}: unknown role {role.strip()!r}; use worker, client or admin"
                    ) from None
        if not entries:
            raise InvalidArgumentError(f"{source}: no tokens")
        if any(len(token) < 16 for token, _ in entries):
            raise InvalidArgumentError(f"{source}: tokens must be at least 16 characters")
        return cls(tuple(entries))

    @classmethod
    def from_file(cls, path: Path) -> Tokens:
        """Read tokens from a file of `ROLE:TOKEN` lines."""
        try:
            text = path.read_text()
        except OSError as error:
            raise InvalidArgumentError(f"cannot read tokens file {path}: {error}") from error
        return cls.parse(text.splitlines(), str(path))


def _bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def _refusal(
    method: str, code: grpc.StatusCode, reason: str, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    status = rich_status(code, message, reason)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    if method in _STREAMING:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call against its method's roles."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Let the call through, or answer it with UNAUTHENTICATED / PERMISSION_DENIED."""
        method = handler_call_details.method
        roles = allowed_roles(method)
        if roles is None:
            return await continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata)
        role = self._tokens.role_of(token) if token else None
        if role is None:
            log.warning("refused %s: %s bearer token", method, "invalid" if token else "no")
            return _refusal(
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "UNAUTHENTICATED",
                "this server needs a valid bearer token (metadata 'authorization: Bearer ...')",
            )
        if role not in roles:
            log.warning("refused %s: role %s may not call it", method, role)
            needed = " or ".join(sorted(roles))
            return _refusal(
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                "PERMISSION_DENIED",
                f"a {role} token may not call {method}; it needs the {needed} role",
            )
        return await continuation(handler_call_details)
