"""Ergon for users' own tests: a real server in-process, and an environment that skips time.

    async with ErgonTestServer() as server:          # a real server on 127.0.0.1:0
        async with server.client() as client:
            ...

    async with ErgonTestEnvironment(OrderFlow) as env:   # server + worker, time skipping
        outcome = await env.run(OrderFlow("A"))      # a 1-hour timer fires at once

Needs the `ergon_server` package (installed with the `ergon` distribution).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from ergon_worker_sdk._client import Client, FlowOutcome
from ergon_worker_sdk._worker import Worker, WorkerHandle


class ErgonTestServer:
    """A real Ergon server in this process, on a free port, with its own store.

    Args:
        db: a store URL; by default a SQLite file in a fresh temporary folder. `memory://`
            keeps nothing.
        tokens: require bearer tokens, as `ROLE:TOKEN,ROLE:TOKEN` (roles worker, client,
            admin); None accepts every call.
        tls_cert: serve TLS with this PEM certificate chain (and `tls_key`).
        tls_key: the PEM private key of `tls_cert`.
        tls_client_ca: require client certificates signed by this PEM CA (mutual TLS).
        max_message_bytes: the largest gRPC message the server sends or takes (default 16 MiB).
        engine_options: `EngineConfig` fields to override (lease_ttl_ms, ...).
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        tokens: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        clock: Any = None,
        max_message_bytes: int | None = None,
        **engine_options: Any,
    ) -> None:
        self._db = db
        self._max_message_bytes = max_message_bytes
        self._clock = clock
        self._tokens = tokens
        self._tls = (tls_cert, tls_key, tls_client_ca)
        self._engine_options = engine_options
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: Any = None
        self.address = ""

    async def start(self) -> None:
        """Start serving."""
        from ergon_server.auth import Tokens
        from ergon_server.config import ServerConfig
        from ergon_server.engine import EngineConfig
        from ergon_server.server import ErgonServer

        db = self._db
        if db is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ergon-test-")
            db = f"sqlite:///{Path(self._tmp.name) / 'ergon.db'}"
        config = ServerConfig(
            listen="127.0.0.1:0",
            db=db,
            shutdown_grace_s=0.5,
            tls_cert=self._tls[0],
            tls_key=self._tls[1],
            tls_client_ca=self._tls[2],
            tokens=Tokens.parse([self._tokens], "tokens") if self._tokens else None,
            engine=EngineConfig(**self._engine_options),
        )
        if self._max_message_bytes is not None:
            config = dataclasses.replace(config, max_message_bytes=self._max_message_bytes)
        self._server = ErgonServer(config, clock=self._clock)
        await self._server.start()
        self.address = self._server.address

    def client(self, **options: Any) -> Client:
        """A client connected to this server."""
        return Client(self.address, **options)

    async def shutdown(self) -> None:
        """Stop the server and remove its files. Idempotent."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            tmp.cleanup()

    async def __aenter__(self) -> ErgonTestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()


class SkippingClock:
    """The wall clock plus an offset that only grows: time jumps forward, never back."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        """The skipped time."""
        return time.time_ns() // 1_000_000 + self.offset_ms

    def skip(self, milliseconds: int) -> None:
        """Jump forward."""
        self.offset_ms += max(0, milliseconds)


class ErgonTestEnvironment:
    """A server and a worker in this process, for unit tests of flow types, with time skipping.

    With `time_skipping` (the default), whenever nothing has happened for a moment (no step
    recorded, no flow dispatched) and a durable timer is pending, the server's clock jumps to
    that timer's fire time, so a flow that sleeps an hour finishes at once. Leases are renewed
    across the jump, so nothing is re-queued by it.

    Args:
        flow_types: the `@flow_type` classes the environment's worker runs.
        time_skipping: jump over idle waits on timers.
        db: a store URL; `memory://` by default.
        max_concurrency: the worker's capacity.
    """

    IDLE_S = 0.02

    def __init__(
        self,
        *flow_types: type[Any],
        time_skipping: bool = True,
        db: str = "memory://",
        max_concurrency: int = 100,
    ) -> None:
        self.flow_types = flow_types
        self.time_skipping = time_skipping
        self.clock = SkippingClock()
        self.server = ErgonTestServer(db, clock=self.clock, allow_unregistered_flow_types=True)
        self._max_concurrency = max_concurrency
        self.client: Client = Client("unset")
        self._worker: WorkerHandle | None = None
        self._skipper: asyncio.Task[None] | None = None
        self.skipped_ms = 0

    async def start(self) -> None:
        """Start the server, the worker and the time skipper."""
        await self.server.start()
        self.client = self.server.client()
        if self.flow_types:
            worker = Worker(self.client, "test-environment", max_concurrency=self._max_concurrency)
            await worker.register(*self.flow_types)
            self._worker = await worker.start()
        if self.time_skipping:
            self._skipper = asyncio.create_task(self._skip_when_idle())

    async def run(self, flow: Any, *, timeout: float = 30.0, **options: Any) -> FlowOutcome:  # noqa: ASYNC109 - as Client.wait
        """Schedule a flow and wait for its outcome."""
        flow_id = await self.client.schedule(flow, **options)
        return await self.client.wait(flow_id, timeout=timeout)

    async def sleep(self, seconds: float) -> None:
        """Move the server's clock forward by hand (firing what falls due)."""
        await self._jump(self.clock.now_ms() + round(seconds * 1000))

    async def _jump(self, target_ms: int) -> None:
        engine = self.server._server.engine
        ttl = engine.config.lease_ttl_ms
        # Leases first, computed for the new time, so the jump cannot expire them; and the
        # sessions count as just heard from, so the dispatcher does not take them for dead.
        for session in engine.dispatcher.sessions:
            await engine.store.renew_leases(session.session_id, target_ms + ttl)
            session.last_heard_ms = target_ms
        jump = target_ms - self.clock.now_ms()
        if jump > 0:
            self.clock.skip(jump)
            self.skipped_ms += jump
        await engine.fire_due_timers()

    async def _skip_when_idle(self) -> None:
        engine = self.server._server.engine
        loop = asyncio.get_running_loop()
        last, since = -1, loop.time()
        while True:
            await asyncio.sleep(0.005)
            seen = engine.activity + engine.dispatcher.dispatched_total + engine.timers_fired
            if seen != last:
                last, since = seen, loop.time()
                continue
            if loop.time() - since < self.IDLE_S:
                continue
            next_at = await engine.store.next_timer_at()
            if next_at is not None and next_at > self.clock.now_ms():
                await self._jump(next_at)
                last = -1

    async def shutdown(self) -> None:
        """Stop everything. Idempotent."""
        if self._skipper is not None:
            self._skipper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._skipper
            self._skipper = None
        if self._worker is not None:
            await self._worker.shutdown(grace=1)
            self._worker = None
        await self.client.close()
        await self.server.shutdown()

    async def __aenter__(self) -> ErgonTestEnvironment:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
