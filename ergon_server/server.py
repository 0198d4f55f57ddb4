"""The gRPC server: the engine, its store, the servicers, health and reflection."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ergon_server import metrics
from ergon_server.auth import AuthInterceptor
from ergon_server.clock import Clock, SystemClock
from ergon_server.config import ServerConfig
from ergon_server.engine import Engine
from ergon_server.rpc.scheduler import SchedulerServicer, SignalServicer
from ergon_server.rpc.status import service_handler
from ergon_server.rpc.worker import WorkerServicer
from ergon_server.storage import create_store
from ergon_server.storage.base import Store
from ergon_worker_sdk.proto.ergon.v1 import scheduler_pb2, signal_pb2, worker_pb2

log = logging.getLogger(__name__)

_SERVICES = {
    service.full_name: service
    for service in (
        scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
        signal_pb2.DESCRIPTOR.services_by_name["SignalService"],
        worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    )
}
SERVICE_NAMES = tuple(_SERVICES)


def _redacted(url: str) -> str:
    """A store URL with any password hidden, for logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def _bind_problem(listen: str, error: Exception) -> str:
    """Why `listen` could not be bound, as the OS tells a plain bind; else gRPC's `error`.

    gRPC only says that binding failed; the reason (the port is taken, the host is not this
    machine's) is what the operator needs.
    """
    host, _, port = listen.rpartition(":")
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, protocol, _, address in addresses:
            with socket.socket(family, kind, protocol) as probe:
                # As gRPC binds: a port left in TIME_WAIT by an earlier server is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as problem:
        if problem.errno == errno.EADDRINUSE:
            return "the port is in use by another process (another ergon-server?)"
        return problem.strerror or str(problem)
    except ValueError:
        pass  # not host:port (a unix: target, say): gRPC's words are all there is
    return str(error)


class ErgonServer:
    """An Ergon server: `start()`, then `wait()` or `shutdown()`; also `async with`."""

    def __init__(
        self, config: ServerConfig, *, clock: Clock | None = None, store: Store | None = None
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.store = store or create_store(config.db, sqlite_synchronous=config.sqlite_synchronous)
        self.engine = Engine(self.store, self.clock, config.engine)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._metrics_server: asyncio.Server | None = None
        self._counted_at = float("-inf")
        self.port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        """host:port the server listens on (the real port when 0 was asked for)."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Open the store, bind the port and start serving."""
        await self.store.open()
        limit = self.config.max_message_bytes
        interceptors = [] if self.config.tokens is None else [AuthInterceptor(self.config.tokens)]
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Workers ping on their stream; allow transport keepalives too.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                # gRPC sets SO_REUSEPORT by default: a second server on a port in use would
                # bind too, and the kernel would split connections between the two.
                ("grpc.so_reuseport", 0),
            ],
        )
        # Our own handlers, not the generated add_*_to_server: a request that does not parse
        # gets INVALID_ARGUMENT (MALFORMED_REQUEST), not the UNKNOWN gRPC gives a raising
        # deserializer.
        servicers = (
            SchedulerServicer(self.engine),
            SignalServicer(self.engine),
            WorkerServicer(self.engine, self.config.max_message_bytes),
        )
        server.add_generic_rpc_handlers(
            tuple(
                service_handler(_SERVICES[name], servicer)
                for name, servicer in zip(SERVICE_NAMES, servicers, strict=True)
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            credentials = self._credentials()
            if credentials is None:
                self.port = server.add_insecure_port(self.config.listen)
            else:
                self.port = server.add_secure_port(self.config.listen, credentials)
        except (RuntimeError, OSError) as error:
            await self.store.close()
            raise OSError(
                f"cannot listen on {self.config.listen}: {_bind_problem(self.config.listen, error)}"
            ) from error
        # The engine first: a worker that reconnects the moment the port opens must find its
        # leases already renewed after a restart (see `Engine.start`).
        await self.engine.start()
        try:
            await server.start()
        except BaseException:
            await self.engine.shutdown()
            await self.store.close()
            raise
        self._server = server
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            self._metrics_server = await metrics.serve(
                self.engine.metrics, host or "127.0.0.1", int(port), self._count_flows
            )
            self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "ergon-server ready on %s (store %s, %s%s)",
            self.address,
            _redacted(self.config.db),
            "TLS" if self.config.tls_cert else "plaintext",
            ", tokens required" if self.config.tokens else "",
        )

    def _credentials(self) -> grpc.ServerCredentials | None:
        config = self.config
        if config.tls_cert is None or config.tls_key is None:
            return None
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def _count_flows(self) -> None:
        """Refresh the flow counts for a scrape, at most every 5 s (it may scan the store)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._counted_at >= 5:
            self._counted_at = loop.time()
            self.engine.metrics.flow_counts = await self.store.count_flows()

    async def wait(self) -> None:
        """Return once the server has shut down."""
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Graceful stop: NOT_SERVING, drain workers, stop the engine and gRPC, close the store.

        Idempotent and safe before `start()`.
        """
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._server is not None:
            server, self._server = self._server, None
            await self._health.enter_graceful_shutdown()
            await self.engine.drain()
            await server.stop(self.config.shutdown_grace_s)
            await self.engine.shutdown()
            log.info("ergon-server on %s stopped", self.address)
        await self.store.close()
        self._stopped.set()

    async def __aenter__(self) -> ErgonServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
