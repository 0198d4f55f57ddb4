"""The worker's stream to the server: register, batch events both ways, reconnect.

The stream knows nothing of flows or decorators: it carries events. Every event that wants an
ack stays pending until the server acknowledges it, and is sent again after a reconnect (the
server makes that idempotent), so no completion is ever lost to a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Protocol

import grpc

from ergon_worker_sdk._client import MAX_BATCH_BYTES
from ergon_worker_sdk.errors import rpc_error, translate
from ergon_worker_sdk.proto.ergon.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("ergon_worker_sdk.worker")

PROTOCOL_VERSION = 1
_FATAL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
REGISTER_TIMEOUT_S = 10.0


class StreamHandler(Protocol):
    """What the stream asks of the worker that owns it."""

    def held_leases(self) -> list[worker_pb2.HeldLease]:
        """Leases of flows running here, offered back on every (re)connect."""
        ...

    def on_registered(self, reattached: set[str]) -> None:
        """A session began; leases not re-attached are lost."""
        ...

    def on_assignment(self, assignment: worker_pb2.Assignment) -> None:
        """Run a flow."""
        ...

    def on_revoke(self, revoke: worker_pb2.Revoke) -> None:
        """Stop a flow."""
        ...

    def on_wakeup(self, wakeup: worker_pb2.Wakeup) -> None:
        """A wait of a flow running here is satisfied."""
        ...

    def on_lease_ended(self, flow_id: str, lease_token: int) -> None:
        """The server acknowledged the end of a lease (finish, release, park, suspend)."""
        ...

    def on_cancel_requested(self, cancel: worker_pb2.CancelRequested) -> None:
        """A flow running here was cancelled."""
        ...


class _StreamEnded(Exception):
    """The server closed the stream or stopped answering."""


class WorkerStream:
    """One logical worker session that survives reconnects."""

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        worker_id: str,
        flow_types: list[str],
        capacity: int,
        handler: StreamHandler,
        *,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        metadata: tuple[tuple[str, str], ...] = (),
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._channel = channel
        self._max_batch_bytes = max_batch_bytes
        self._metadata = metadata
        self.worker_id = worker_id
        self.flow_types = flow_types
        self.capacity = capacity
        self._handler = handler
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._next_seq = 0
        # seq -> (event, future of its ack): sent or not yet, not acknowledged.
        self._pending: dict[int, tuple[worker_pb2.WorkerEvent, asyncio.Future[worker_pb2.Ack]]] = {}
        self._queue: list[worker_pb2.WorkerEvent] = []
        self._queue_ready = asyncio.Event()
        self.connected = asyncio.Event()
        self._closing = False
        self.session_id = ""
        self.heartbeat_interval_s = 5.0
        # The server's lease TTL, once registered: reconnect attempts stay well inside it.
        self.lease_ttl_s: float | None = None
        self.connects = 0
        self.failure: Exception | None = None
        self._was_healthy = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def request(self, event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        """Send an event and return the server's ack once it has stored it.

        Raises:
            RpcError: the server refused it (LeaseLostError, PayloadTooLargeError, ...).
        """
        return await self._acked(event, self._submit(event))

    def request_soon(self, event: worker_pb2.WorkerEvent) -> asyncio.Task[worker_pb2.Ack]:
        """Queue an event at once, ahead of anything queued after it; a task awaits its ack.

        The task gives the ack, or raises, as `request` does.
        """
        return asyncio.ensure_future(self._acked(event, self._submit(event)))

    def _submit(self, event: worker_pb2.WorkerEvent) -> asyncio.Future[worker_pb2.Ack]:
        self._next_seq += 1
        event.seq = self._next_seq
        future: asyncio.Future[worker_pb2.Ack] = asyncio.get_running_loop().create_future()
        self._pending[event.seq] = (event, future)
        self._idle.clear()
        self._enqueue(event)
        return future

    async def _acked(
        self, event: worker_pb2.WorkerEvent, future: asyncio.Future[worker_pb2.Ack]
    ) -> worker_pb2.Ack:
        backoff = self._initial_backoff_s
        while True:
            try:
                ack = await future
            finally:
                self._pending.pop(event.seq, None)
                if not self._pending:
                    self._idle.set()
            if ack.code == grpc.StatusCode.OK.value[0]:
                return ack
            code = _status_code(ack.code)
            if code is not grpc.StatusCode.UNAVAILABLE:
                raise rpc_error(code, ack.reason, ack.message)
            # The server's store is down for a moment: send the same event again later.
            log.warning("server unavailable (%s); resending in %.1fs", ack.message, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
            future = self._submit(event)

    def send(self, event: worker_pb2.WorkerEvent) -> None:
        """Send an event that needs no ack (heartbeats); dropped if the stream is down."""
        if self.connected.is_set():
            self._enqueue(event)

    def _enqueue(self, event: worker_pb2.WorkerEvent) -> None:
        self._queue.append(event)
        self._queue_ready.set()

    def set_capacity(self, capacity: int) -> None:
        """Change how many flows the server may give this worker (0: none)."""
        self.capacity = capacity
        self.send(_capacity_event(capacity))

    def stop_assignments(self) -> asyncio.Task[worker_pb2.Ack] | None:
        """Set the capacity to 0; the task gives the server's ack (None: no session is open).

        The server sends that ack after every assignment it sent before taking the change
        in, and sends none after it. A new session registers with capacity 0.
        """
        self.capacity = 0
        if not self.connected.is_set():
            return None
        return self.request_soon(_capacity_event(0))

    @property
    def pending(self) -> int:
        """Events not yet acknowledged."""
        return len(self._pending)

    async def run(self) -> None:
        """Hold a session until `close()`, reconnecting with backoff and jitter."""
        backoff = self._initial_backoff_s
        while not self._closing:
            try:
                await self._session_once()
            except (grpc.aio.AioRpcError, _StreamEnded, grpc.aio.UsageError) as error:
                if self._closing:
                    break
                if isinstance(error, grpc.aio.AioRpcError) and error.code() in _FATAL:
                    # Retrying cannot fix a refused token or a bad registration: say so, stop.
                    self.failure = translate(error)
                    log.error("worker %s: the server refused it: %s", self.worker_id, self.failure)
                    break
                detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                log.warning("worker %s: stream lost (%s); reconnecting", self.worker_id, detail)
            except Exception as error:
                # Whatever else a dying connection raises (a write racing the end of the call
                # raises InvalidStateError), the worker must not lose its stream for good.
                if self._closing:
                    break
                log.warning(
                    "worker %s: stream failed (%s: %s); reconnecting",
                    self.worker_id,
                    type(error).__name__,
                    error,
                )
            finally:
                self.connected.clear()
            if self._closing:
                break
            if self._was_healthy:
                backoff = self._initial_backoff_s
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._reconnect_cap_s())

    def _reconnect_cap_s(self) -> float:
        # A worker re-attaches its running flows only if it is back within their lease: with
        # jitter, the longest wait is 1.5 x the cap, so at most a quarter of the TTL keeps
        # several attempts inside it (after a network drop, or a server restart).
        if self.lease_ttl_s is None:
            return self._max_backoff_s
        return min(self._max_backoff_s, max(self._initial_backoff_s, self.lease_ttl_s / 4))

    async def _session_once(self) -> None:
        self._was_healthy = False
        stub = worker_pb2_grpc.WorkerServiceStub(self._channel())
        call = stub.Connect(metadata=self._metadata)
        register = worker_pb2.Register(
            worker_id=self.worker_id,
            flow_types=self.flow_types,
            capacity=self.capacity,
            protocol_version=PROTOCOL_VERSION,
            held_leases=self._handler.held_leases(),
        )
        try:
            try:
                # Bounded: over a black-holed connection neither the write nor the read ever
                # completes, and the worker must give up on it and dial again.
                async with asyncio.timeout(REGISTER_TIMEOUT_S):
                    await call.write(
                        worker_pb2.ConnectRequest(
                            events=[worker_pb2.WorkerEvent(register=register)]
                        )
                    )
                    first = await call.read()
            except TimeoutError:
                raise _StreamEnded(
                    f"the server did not answer the registration within {REGISTER_TIMEOUT_S} s"
                ) from None
            if (
                not isinstance(first, worker_pb2.ConnectResponse)
                or not first.events
                or not first.events[0].HasField("registered")
            ):
                raise _StreamEnded("the server did not answer the registration")
            registered = first.events[0].registered
            self.session_id = registered.session_id
            self.heartbeat_interval_s = max(0.05, registered.heartbeat_interval_ms / 1000)
            if registered.lease_ttl_ms > 0:
                self.lease_ttl_s = registered.lease_ttl_ms / 1000
            self.connects += 1
            self._handler.on_registered(set(registered.reattached_flow_ids))
            # Everything not yet acknowledged goes again, in order, on the new stream.
            self._queue = [event for _, (event, _) in sorted(self._pending.items())]
            if self.capacity != register.capacity:
                # Changed while registering (`stop_assignments` during a reconnect): `send`
                # would drop it, the stream not being marked connected yet.
                self._enqueue(_capacity_event(self.capacity))
            self._queue_ready.set()
            self.connected.set()
            log.info(
                "worker %s registered: session %s, %d leases re-attached",
                self.worker_id,
                self.session_id,
                len(registered.reattached_flow_ids),
            )
            self._was_healthy = True
            await self._exchange(call)
        finally:
            call.cancel()

    async def _exchange(
        self, call: grpc.aio.StreamStreamCall[worker_pb2.ConnectRequest, worker_pb2.ConnectResponse]
    ) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()

        async def reader() -> None:
            nonlocal last_heard
            while True:
                response = await call.read()
                if not isinstance(response, worker_pb2.ConnectResponse):
                    raise _StreamEnded("the server closed the stream")
                last_heard = loop.time()
                self._dispatch(response)

        async def writer() -> None:
            while True:
                while not self._queue:
                    self._queue_ready.clear()
                    await self._queue_ready.wait()
                batch: list[worker_pb2.WorkerEvent] = []
                size = 0
                while self._queue:
                    length = self._queue[0].ByteSize()
                    # One event alone goes whatever its size (the server judges it).
                    if batch and size + length > self._max_batch_bytes:
                        break
                    batch.append(self._queue.pop(0))
                    size += length
                await call.write(worker_pb2.ConnectRequest(events=batch))

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_interval_s)
                self._enqueue(worker_pb2.WorkerEvent(heartbeat=worker_pb2.Heartbeat()))
                if loop.time() - last_heard > 3 * self.heartbeat_interval_s:
                    raise _StreamEnded("the server stopped answering")

        tasks = [asyncio.create_task(job()) for job in (reader, writer, heartbeat)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _dispatch(self, response: worker_pb2.ConnectResponse) -> None:
        for event in response.events:
            kind = event.WhichOneof("event")
            if kind == "ack":
                entry = self._pending.get(event.ack.seq)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(event.ack)
                    # Free the slot before any assignment later in this message is handled.
                    lease = _ended_lease(entry[0], event.ack)
                    if lease is not None:
                        self._handler.on_lease_ended(*lease)
            elif kind == "assignment":
                self._handler.on_assignment(event.assignment)
            elif kind == "revoke":
                self._handler.on_revoke(event.revoke)
            elif kind == "wakeup":
                self._handler.on_wakeup(event.wakeup)
            elif kind == "cancel_requested":
                self._handler.on_cancel_requested(event.cancel_requested)
            elif kind == "drain":
                raise _StreamEnded("the server is draining")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for pending events to be acknowledged, then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        self._closing = True
        self._queue_ready.set()


def _capacity_event(capacity: int) -> worker_pb2.WorkerEvent:
    return worker_pb2.WorkerEvent(capacity_update=worker_pb2.CapacityUpdate(capacity=capacity))


def _ended_lease(event: worker_pb2.WorkerEvent, ack: worker_pb2.Ack) -> tuple[str, int] | None:
    """The lease an acknowledged event gave back, if it did."""
    if ack.code != 0:
        return None
    kind = event.WhichOneof("event")
    if kind in ("flow_completed", "flow_failed", "release", "park") or (
        kind == "suspend" and ack.suspended
    ):
        ended = getattr(event, kind)
        return ended.flow_id, ended.lease_token
    return None


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
