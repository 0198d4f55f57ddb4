"""`ergon.v1.WorkerService.Connect`: one bidirectional stream per worker session."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from ergon_server.engine import Engine
from ergon_server.engine.core import validate_id
from ergon_server.engine.sessions import (
    AckOut,
    AssignmentOut,
    CancelRequestedOut,
    CapacityIn,
    DrainOut,
    FlowFinishIn,
    HeartbeatIn,
    ParkIn,
    PingOut,
    ReleaseIn,
    RevokeOut,
    ServerEventOut,
    Session,
    StepResultIn,
    SuspendIn,
    WaitIn,
    WakeupOut,
    WorkerEventIn,
)
from ergon_server.errors import (
    ErgonError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    StoreError,
)
from ergon_server.model import (
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
    FlowStatus,
    Lease,
    NewFlow,
    Park,
    StepRecord,
    SuspendRequest,
    WaitRequest,
)
from ergon_server.rpc import convert
from ergon_server.rpc.status import Undecodable, stream, unary
from ergon_worker_sdk.proto.ergon.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
REGISTER_TIMEOUT_S = 30.0
# Lease tokens are stored as signed 64-bit integers: a larger one was never given out.
MAX_LEASE_TOKEN = 2**63 - 1
MAX_KEY_LENGTH = 512
# Keys one event may list (required step results, open or given-up waits): a flow's parallel
# branches, at most.
MAX_LISTED_KEYS = 10_000
Requests = AsyncIterator[worker_pb2.ConnectRequest | Undecodable]


def _check_lease(flow_id: str, lease_token: int) -> int:
    """Refuse a flow id no schedule accepts, and a lease token no server gives (> 2**63 - 1).

    The flow id as `validate_id` checks it (INVALID_ID): such a flow cannot exist, and text
    with control characters must not reach the store (PostgreSQL cannot hold NUL). The token
    as a lost lease.
    """
    validate_id(flow_id, "flow_id")
    if lease_token > MAX_LEASE_TOKEN:
        raise FailedPreconditionError(
            f"lease_token {lease_token} on flow {flow_id!r} is not one this server gave",
            "LEASE_LOST",
        )
    return lease_token


def _check_key(key: str, what: str) -> None:
    # Control characters too: PostgreSQL cannot store a NUL, and no backend should differ.
    if not key or key.startswith("$") or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidArgumentError(
            f"{what} needs a journal key of at most {MAX_KEY_LENGTH} printable characters, "
            "not starting with '$'",
            "INVALID_ID",
        )


def _check_args_hash(args_hash: str) -> None:
    # As keys are: it is stored with the entry, and no backend may differ on what it holds.
    if len(args_hash) > MAX_KEY_LENGTH or not args_hash.isprintable():
        raise InvalidArgumentError(
            f"a step's args_hash must be at most {MAX_KEY_LENGTH} printable characters",
            "INVALID_ID",
        )


def _held_lease(held: worker_pb2.HeldLease) -> bool:
    """Whether a held lease could be one a server gave (else it is simply lost)."""
    try:
        _check_lease(held.flow_id, held.lease_token)
    except ErgonError:
        return False
    return True


def _keys(keys: Sequence[str], what: str) -> tuple[str, ...]:
    """Checked journal keys, first occurrence of each, in order."""
    if len(keys) > MAX_LISTED_KEYS:
        raise InvalidArgumentError(f"{what} lists at most {MAX_LISTED_KEYS} keys", "INVALID_ID")
    for key in keys:
        _check_key(key, what)
    return tuple(dict.fromkeys(keys))


def _check_delay(delay_ms: int, what: str, reason: str, now_ms: int) -> None:
    if delay_ms > convert.MAX_TIME_MS - now_ms:
        raise InvalidArgumentError(f"{what} of {delay_ms} ms ends after the year 9999", reason)


# A stream message carries what is queued up to this much (or half the message limit, if
# less); one event larger goes alone.
OUTGOING_BATCH_BYTES = 4 * 1024 * 1024
# A stream's messages being handled at once. Past this, the stream is not read until one is
# done: a worker sending faster than the store writes is held back by HTTP/2's flow control
# instead of growing the server's memory (a well-behaved worker has a few in flight).
MAX_HANDLING_PER_STREAM = 32
# Room for the message's own framing around its events.
_FRAMING_BYTES = 4096


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Carries assignments to workers and their results back, in batches both ways."""

    def __init__(self, engine: Engine, max_message_bytes: int) -> None:
        self._engine = engine
        # gRPC would refuse to send a larger message and end the stream with it.
        self._max_event_bytes = max_message_bytes - _FRAMING_BYTES
        self._batch_bytes = min(OUTGOING_BATCH_BYTES, max_message_bytes // 2)
        # Open streams per client, so one client cannot exhaust the server.
        self._streams: dict[str, int] = {}

    @contextlib.contextmanager
    def _admitted(self, context: Context) -> Iterator[None]:
        client = _client_of(context)
        limit = self._engine.config.max_streams_per_client
        if self._streams.get(client, 0) >= limit:
            raise ResourceExhaustedError(
                f"this client already holds {limit} worker streams, the most allowed "
                "(--max-streams-per-client)",
                "TOO_MANY_STREAMS",
            )
        self._streams[client] = self._streams.get(client, 0) + 1
        try:
            yield
        finally:
            self._streams[client] -= 1
            if not self._streams[client]:
                del self._streams[client]

    @stream
    async def Connect(
        self, request_iterator: Requests, context: Context
    ) -> AsyncIterator[worker_pb2.ConnectResponse]:
        """Register, then exchange events until either side closes."""
        with self._admitted(context):
            async for response in self._connect(request_iterator, context):
                yield response

    async def _connect(
        self, request_iterator: Requests, context: Context
    ) -> AsyncIterator[worker_pb2.ConnectResponse]:
        requests = request_iterator.__aiter__()
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT_S):
                first = await anext(requests)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgumentError(
                "a worker stream must start with a register event", "REGISTER_FIRST"
            ) from None
        if isinstance(first, Undecodable):
            raise first.as_error()
        if not first.events or first.events[0].WhichOneof("event") != "register":
            raise InvalidArgumentError(
                "a worker stream must start with a register event", "REGISTER_FIRST"
            )
        register = first.events[0].register
        session, reattached = await self._engine.open_session(
            register.worker_id,
            list(register.flow_types),
            register.capacity,
            register.protocol_version,
            # A flow id or token no server gave cannot be re-attached: that lease is lost.
            [Lease(h.flow_id, h.lease_token) for h in register.held_leases if _held_lease(h)],
            peer=context.peer() or "",
        )
        try:
            registered = worker_pb2.Registered(
                session_id=session.session_id,
                heartbeat_interval_ms=self._engine.config.heartbeat_interval_ms,
                lease_ttl_ms=self._engine.config.lease_ttl_ms,
                reattached_flow_ids=reattached,
                protocol_version=register.protocol_version,
            )
            yield worker_pb2.ConnectResponse(events=[worker_pb2.ServerEvent(registered=registered)])
            if len(first.events) > 1:
                await self._handle(session, list(first.events[1:]))
            reader = asyncio.create_task(self._read(session, requests))
            try:
                while batch := await session.next_batch():
                    try:
                        messages = await self._messages(session, batch)
                    except BaseException:
                        # Cancelled while parking one: none of the batch was written.
                        session.put_back([e for e in batch if isinstance(e, AssignmentOut)])
                        raise
                    written = 0
                    try:
                        for message, _ in messages:
                            yield message
                            written += 1
                    finally:
                        # The stream broke while a message was being written: that one may
                        # have reached the worker; the ones after it never left, so their
                        # flows go back with the undelivered (`close_session`) instead of
                        # waiting out their leases.
                        if written < len(messages):
                            session.put_back(
                                [a for _, sent in messages[written + 1 :] for a in sent]
                            )
                if reader.done() and (refusal := reader.result()) is not None:
                    raise refusal
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        finally:
            self._engine.close_session(session)

    async def _messages(
        self, session: Session, batch: list[ServerEventOut]
    ) -> list[tuple[worker_pb2.ConnectResponse, list[AssignmentOut]]]:
        """The batch as messages, each with the assignments it carries.

        A message holds at most `_batch_bytes` of events, or one event alone if it is larger.
        """
        messages: list[tuple[worker_pb2.ConnectResponse, list[AssignmentOut]]] = []
        events: list[worker_pb2.ServerEvent] = []
        assignments: list[AssignmentOut] = []
        size = 0
        for event in batch:
            sending = [_sized(event)]
            if (length := sending[0][2]) > self._max_event_bytes:
                sending = await self._undeliverable(session, event, length)
            for sent, proto, length in sending:
                if events and size + length > self._batch_bytes:
                    messages.append((worker_pb2.ConnectResponse(events=events), assignments))
                    events, assignments, size = [], [], 0
                events.append(proto)
                if isinstance(sent, AssignmentOut):
                    assignments.append(sent)
                size += length
        if events:
            messages.append((worker_pb2.ConnectResponse(events=events), assignments))
        return messages

    async def _undeliverable(
        self, session: Session, event: ServerEventOut, length: int
    ) -> list[tuple[ServerEventOut, worker_pb2.ServerEvent, int]]:
        """What to send instead of an event over the message limit, each with proto and size.

        Sending it would end the stream, and the same event would come back after the
        reconnect: a flow too large to assign is parked instead (held and retried with
        backoff, so a server with a larger limit runs it); a suspend's RESUME answer sends
        its entries as wakeups, one event each, then itself without them; another answer
        too large to send refuses its event.
        """
        limit = self._max_event_bytes
        if isinstance(event, AssignmentOut):
            await self._engine.park_undeliverable(event.flow, length, limit)
            return []
        if isinstance(event, AckOut) and event.resumed is not None:
            lease = event.resumed
            parts: list[ServerEventOut] = [
                WakeupOut(lease.flow_id, lease.lease_token, entry) for entry in event.entries
            ]
            parts.append(dataclasses.replace(event, entries=()))
            split = [_sized(part) for part in parts]
            if all(size <= limit for _, _, size in split):
                return split
        error = ResourceExhaustedError(
            f"the server's answer is {length} bytes, over the {limit}-byte message limit "
            "(--max-message-bytes)",
            "MESSAGE_TOO_LARGE",
        )
        log.error("worker %s: %s", session.worker_id, error.message)
        if isinstance(event, AckOut):
            return [_sized(AckOut.refusing(event.seq, error))]
        return []

    # --- worker-poll: unary calls on the same engine path ---

    @unary
    async def PollTask(
        self, request: worker_pb2.PollTaskRequest, context: Context
    ) -> worker_pb2.PollTaskResponse:
        """Wait (bounded) for one flow and lease it to the caller."""
        flow = await self._engine.poll_flow(
            request.worker_id,
            list(request.flow_types),
            request.protocol_version,
            request.timeout_ms,
            peer=context.peer() or "",
        )
        response = worker_pb2.PollTaskResponse(lease_ttl_ms=self._engine.config.lease_ttl_ms)
        if flow is not None:
            assignment = convert.assignment_to_proto(flow)
            length = assignment.ByteSize()
            if length > self._max_event_bytes:
                await self._engine.park_undeliverable(flow, length, self._max_event_bytes)
            else:
                response.assignment.CopyFrom(assignment)
        return response

    @unary
    async def RecordStep(
        self, request: worker_pb2.RecordStepRequest, context: Context
    ) -> worker_pb2.RecordStepResponse:
        """Record one step attempt, fenced; answers once it is durable."""
        await self._apply_one(worker_pb2.WorkerEvent(seq=1, step_result=request.step))
        return worker_pb2.RecordStepResponse()

    @unary
    async def CompleteTask(
        self, request: worker_pb2.CompleteTaskRequest, context: Context
    ) -> worker_pb2.CompleteTaskResponse:
        """End a flow or give it back, fenced; answers once it is durable."""
        outcome = request.WhichOneof("outcome")
        if outcome == "completed":
            event = worker_pb2.WorkerEvent(seq=1, flow_completed=request.completed)
        elif outcome == "failed":
            event = worker_pb2.WorkerEvent(seq=1, flow_failed=request.failed)
        elif outcome == "release":
            event = worker_pb2.WorkerEvent(seq=1, release=request.release)
        else:
            raise InvalidArgumentError(
                "CompleteTask needs one of completed, failed or release", "UNKNOWN_EVENT"
            )
        await self._apply_one(event)
        return worker_pb2.CompleteTaskResponse()

    @unary
    async def ExtendLease(
        self, request: worker_pb2.ExtendLeaseRequest, context: Context
    ) -> worker_pb2.ExtendLeaseResponse:
        """Renew a held lease for another lease TTL."""
        _check_lease(request.flow_id, request.lease_token)
        expires_at = await self._engine.extend_lease(request.flow_id, request.lease_token)
        return worker_pb2.ExtendLeaseResponse(lease_expires_at_ms=expires_at)

    async def _apply_one(self, event: worker_pb2.WorkerEvent) -> None:
        """Apply one event as the stream would; a refusing ack becomes the call's status."""
        ack = await self._engine.apply_worker_event("poll-worker", self._parse(event))
        error = ack.error()
        if error is not None:
            raise error

    async def _read(self, session: Session, requests: Requests) -> ErgonError | None:
        """Handle the worker's messages; returns the refusal that ends the stream, if any."""
        handlers: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                if isinstance(request, Undecodable):
                    # No seq to answer: the stream ends with the refusal (leases stay until
                    # the worker reconnects or they expire).
                    log.info("worker %s sent an undecodable message", session.worker_id)
                    return request.as_error()
                # Handled concurrently, so the next message's events join the same group commit.
                task = asyncio.create_task(self._handle(session, list(request.events)))
                handlers.add(task)
                task.add_done_callback(handlers.discard)
                if len(handlers) >= MAX_HANDLING_PER_STREAM:
                    await asyncio.wait(set(handlers), return_when=asyncio.FIRST_COMPLETED)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
            session.close()
        return None

    async def _handle(self, session: Session, events: list[worker_pb2.WorkerEvent]) -> None:
        parsed: list[WorkerEventIn] = []
        for event in events:
            try:
                parsed.append(self._parse(event))
            except ErgonError as error:
                log.info("worker %s sent a bad event: %s", session.worker_id, error.message)
                if event.seq:
                    session.send(AckOut.refusing(event.seq, error))
        try:
            await self._engine.handle_worker_events(session, parsed)
        except Exception:
            log.exception("handling events of worker %s failed", session.worker_id)
            for item in parsed:
                if item.seq:
                    internal = StoreError("internal error; see server log", "INTERNAL")
                    session.send(AckOut.refusing(item.seq, internal))

    def _parse(self, event: worker_pb2.WorkerEvent) -> WorkerEventIn:
        kind = event.WhichOneof("event")
        limit = self._engine.config.max_payload_bytes
        if kind == "step_result":
            step = event.step_result
            return StepResultIn(event.seq, _step_record(step, limit), max(0, step.duration_ms))
        if kind == "flow_completed":
            done = event.flow_completed
            _check_lease(done.flow_id, done.lease_token)
            result = convert.payload_bytes(done.result, limit, "the flow result", check_json=False)
            finish = FlowFinish(
                done.flow_id,
                done.lease_token,
                FlowStatus.COMPLETED,
                result=result,
                requires_keys=_keys(done.requires_keys, "a flow end's required keys"),
            )
            return FlowFinishIn(event.seq, finish)
        if kind == "flow_failed":
            failed = event.flow_failed
            _check_lease(failed.flow_id, failed.lease_token)
            _check_delay(
                failed.retry_delay_ms, "a retry delay", "INVALID_RETRY", self._engine.clock.now_ms()
            )
            finish = FlowFinish(
                failed.flow_id,
                failed.lease_token,
                FlowStatus.FAILED,
                error=convert.failure_from_proto(failed.failure),
                retry_delay_ms=max(0, failed.retry_delay_ms),
            )
            return FlowFinishIn(event.seq, finish)
        if kind == "release":
            _check_lease(event.release.flow_id, event.release.lease_token)
            return ReleaseIn(event.seq, Lease(event.release.flow_id, event.release.lease_token))
        if kind == "heartbeat":
            return HeartbeatIn(event.seq)
        if kind == "capacity_update":
            return CapacityIn(event.seq, event.capacity_update.capacity)
        if kind == "wait":
            return WaitIn(event.seq, self._wait_request(event.wait))
        if kind == "suspend":
            suspend = event.suspend
            _check_lease(suspend.flow_id, suspend.lease_token)
            if not suspend.open_keys:
                raise InvalidArgumentError("a suspend names the waits it waits for", "NO_WAITS")
            request = SuspendRequest(
                suspend.flow_id,
                suspend.lease_token,
                _keys(suspend.open_keys, "a suspend's open keys"),
                _keys(suspend.abandoned_keys, "a suspend's given-up keys"),
            )
            return SuspendIn(event.seq, request)
        if kind == "park":
            park = event.park
            _check_lease(park.flow_id, park.lease_token)
            failure = convert.failure_from_proto(park.failure)
            return ParkIn(event.seq, Park(park.flow_id, park.lease_token, failure))
        if kind == "register":
            raise InvalidArgumentError(
                "register is only valid as the first event of a stream", "REGISTER_TWICE"
            )
        raise InvalidArgumentError("an empty or unknown worker event", "UNKNOWN_EVENT")

    def _wait_request(self, wait: worker_pb2.WaitRequest) -> WaitRequest:
        _check_lease(wait.flow_id, wait.lease_token)
        _check_key(wait.key, "a wait")
        base = functools.partial(WaitRequest, wait.flow_id, wait.lease_token, wait.key)
        kind = wait.WhichOneof("wait")
        if kind == "timer":
            if wait.timer.fire_in_ms < 0:
                raise InvalidArgumentError("a timer cannot fire in the past", "INVALID_TIMER")
            now = self._engine.clock.now_ms()
            _check_delay(wait.timer.fire_in_ms, "a timer", "INVALID_TIMER", now)
            fire_at = now + wait.timer.fire_in_ms
            return base(kind=EntryKind.TIMER, fire_at=fire_at)
        if kind == "signal":
            # As SendSignal checks the names it delivers to.
            validate_id(wait.signal.name, "a signal wait's name")
            return base(kind=EntryKind.SIGNAL, signal_name=wait.signal.name)
        if kind == "child":
            child = wait.child
            validate_id(child.flow_type, "a child flow's flow_type")
            data = convert.payload_bytes(
                child.input, self._engine.config.max_payload_bytes, "the child flow input"
            )
            new_flow = NewFlow(
                flow_id=child.child_flow_id,
                flow_type=child.flow_type,
                input=data,
                parent_flow_id=wait.flow_id,
                parent_key=wait.key,
            )
            return base(kind=EntryKind.CHILD, child=new_flow)
        raise InvalidArgumentError("a wait needs a timer, a signal or a child", "MISSING_WAIT")


def _client_of(context: Context) -> str:
    """Who a call comes from: its bearer token when it has one, else its connection."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return "token:" + hashlib.sha256(value.encode()).hexdigest()
    return "peer:" + (context.peer() or "")


def _step_record(result: worker_pb2.StepResult, limit: int) -> StepRecord:
    outcome = result.WhichOneof("outcome")
    if result.kind and result.kind not in convert.ENTRY_KIND_FROM_PROTO:
        raise InvalidArgumentError(f"unknown entry kind {result.kind}", "INVALID_KIND")
    kind = convert.ENTRY_KIND_FROM_PROTO.get(result.kind, EntryKind.STEP)
    _check_lease(result.flow_id, result.lease_token)
    _check_key(result.key, "a step result")
    _check_args_hash(result.args_hash)
    status: EntryStatus
    data: bytes | None = None
    failure: Failure | None = None
    if outcome == "result":
        status = EntryStatus.COMPLETED
        data = convert.payload_bytes(result.result, limit, "the step result", check_json=False)
    elif outcome == "failure":
        status, failure = EntryStatus.FAILED, convert.failure_from_proto(result.failure)
    elif outcome == "retrying":
        status, failure = EntryStatus.RETRYING, convert.failure_from_proto(result.retrying)
    else:
        raise InvalidArgumentError("a step result needs an outcome", "MISSING_OUTCOME")
    return StepRecord(
        flow_id=result.flow_id,
        lease_token=result.lease_token,
        key=result.key,
        kind=kind,
        args_hash=result.args_hash,
        attempts=max(1, result.attempts),
        status=status,
        result=data,
        error=failure,
    )


def _sized(event: ServerEventOut) -> tuple[ServerEventOut, worker_pb2.ServerEvent, int]:
    """The event with its proto and the proto's size."""
    proto = _server_event(event)
    return event, proto, proto.ByteSize()


def _server_event(event: ServerEventOut) -> worker_pb2.ServerEvent:
    if isinstance(event, AckOut):
        return worker_pb2.ServerEvent(
            ack=worker_pb2.Ack(
                seq=event.seq,
                code=event.code,
                reason=event.reason,
                message=event.message,
                entries=[convert.entry_to_proto(e) for e in event.entries],
                fire_at_ms=event.fire_at_ms,
                server_time_ms=event.server_time_ms,
                suspended=event.suspended,
            )
        )
    if isinstance(event, WakeupOut):
        return worker_pb2.ServerEvent(
            wakeup=worker_pb2.Wakeup(
                flow_id=event.flow_id,
                lease_token=event.lease_token,
                entry=convert.entry_to_proto(event.entry),
            )
        )
    if isinstance(event, CancelRequestedOut):
        return worker_pb2.ServerEvent(
            cancel_requested=worker_pb2.CancelRequested(
                flow_id=event.flow_id, lease_token=event.lease_token, reason=event.reason
            )
        )
    if isinstance(event, AssignmentOut):
        return worker_pb2.ServerEvent(assignment=convert.assignment_to_proto(event.flow))
    if isinstance(event, RevokeOut):
        return worker_pb2.ServerEvent(
            revoke=worker_pb2.Revoke(
                flow_id=event.flow_id, lease_token=event.lease_token, reason=event.reason
            )
        )
    if isinstance(event, PingOut):
        return worker_pb2.ServerEvent(ping=worker_pb2.Ping())
    if isinstance(event, DrainOut):
        return worker_pb2.ServerEvent(drain=worker_pb2.Drain())
    raise TypeError(f"unknown server event {event!r}")
