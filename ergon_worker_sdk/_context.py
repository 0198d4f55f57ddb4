"""The running flow's context: journal replay, step recording and durable waits.

Each `@step` call gets a deterministic key (step name + occurrence counter; in a task of the flow
other than its own, such as a branch of `asyncio.gather`, counted under that task's first key:
see `_TaskKeys`). A key found in the journal returns its recorded value (or raises its
recorded failure) without running; a new step runs and its result is sent to the server. The
flow's own code goes on at once (it is deterministic and replays), but nothing with an effect
does until the server has stored the result: not another step's body, a wait, a suspension or
the flow's end (which names the results it needs, so the last result and the end share a
commit).

Waits (timers, signals, child flows) are registered with the server under keys of their own
("timer:NAME#n", "signal:NAME#n", "child:TYPE#n"; inside a step, prefixed by the step's key).
Their outcomes come back as journal entries. When every branch of a flow waits (no step is
running and nothing else happened for a moment), the flow suspends: the server takes it back,
the worker's slot is freed, and the flow is re-assigned and replayed once a wait is satisfied.
A wait inside a step keeps its step, and its slot, alive until satisfied.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ergon_worker_sdk.converter import PayloadConverter, to_jsonable
from ergon_worker_sdk.errors import (
    ChildFlowError,
    ConverterError,
    ErgonError,
    FlowCancelledError,
    HistoryMismatchError,
    LeaseLostError,
    RpcError,
    StepFailedError,
)
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, worker_pb2
from ergon_worker_sdk.tracing import Tracer

if TYPE_CHECKING:
    from ergon_worker_sdk._definitions import StepDefinition

log = logging.getLogger("ergon_worker_sdk.worker")
_TRACER = Tracer("ergon_worker_sdk")

CANCEL_KEY = "$cancel"
# How long a flow whose branches all wait stays in memory before it suspends: long enough for
# sibling branches to reach their own waits, short enough to free slots at once.
SETTLE_S = 0.005

_CURRENT: contextvars.ContextVar[FlowContext | None] = contextvars.ContextVar(
    "ergon_flow_context", default=None
)
_STEP: contextvars.ContextVar[_StepScope | None] = contextvars.ContextVar(
    "ergon_step_scope", default=None
)

# Sends a worker event and returns the server's ack once it is stored (raises if refused).
# The event should be queued by the time the call returns, so events leave in call order.
Recorder = Callable[[worker_pb2.WorkerEvent], Awaitable[worker_pb2.Ack]]


# Between a task's first key and the keys of its later calls ("fetch#2>process#1").
TASK_KEY_SEPARATOR = ">"


@dataclass
class _TaskKeys:
    """The key counters of one task of a flow.

    The flow's own task counts from the root. Another task of the flow (a branch of an
    `asyncio.gather`) takes its first key from the counters it inherited, in the order the
    tasks start, and keys its later calls under that first key: its keys then depend only on
    its own code, never on how the branches interleave (which differs on replay, where
    recorded steps return at once).
    """

    flow: FlowContext
    # None: whichever task asks (a context never activated in a task).
    task: asyncio.Task[Any] | None
    prefix: str
    counters: dict[str, int] = field(default_factory=dict)

    def take(self, name: str) -> str:
        count = self.counters.get(name, 0) + 1
        self.counters[name] = count
        return f"{self.prefix}{name}#{count}"


_TASK_KEYS: contextvars.ContextVar[_TaskKeys | None] = contextvars.ContextVar(
    "ergon_task_keys", default=None
)


@dataclass
class _StepScope:
    """The step attempt whose body is running: waits inside it are keyed under it."""

    key: str
    counters: dict[str, int] = field(default_factory=dict)


def succeeded(future: asyncio.Future[Any]) -> bool:
    """Whether a future ended with a value: not cancelled, not failed, not pending."""
    return future.done() and not future.cancelled() and future.exception() is None


def ignore_refusal(task: asyncio.Task[worker_pb2.Ack]) -> None:
    """Done-callback for an event nobody awaits: its refusal is logged, not left unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("worker event refused: %s", task.exception())


def current_context() -> FlowContext | None:
    """The context of the flow running in this task, or None outside flows."""
    return _CURRENT.get()


def failure_from_exception(
    error: BaseException, *, non_retryable: bool = False
) -> common_pb2.Failure:
    """The wire form of an exception."""
    if isinstance(error, StepFailedError):
        kind, message = error.error_type, error.message
    elif isinstance(error, ChildFlowError):
        kind, message = error.type_name, error.message
    else:
        kind, message = type(error).__name__, str(error)
    return common_pb2.Failure(
        type=kind,
        message=message,
        non_retryable=non_retryable,
        stack_trace="".join(traceback.format_exception(error))[-8_000:],
        reason=getattr(error, "reason", "") if isinstance(error, ErgonError) else "",
    )


def args_hash(converter: PayloadConverter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A short stable hash of a step's arguments, checked on replay."""
    if not args and not kwargs:
        return ""
    try:
        encoded = json.dumps([to_jsonable(list(args)), to_jsonable(kwargs)], sort_keys=True)
    except (ConverterError, TypeError, ValueError):
        # Values JSON cannot carry are hashed through the converter's own encoding.
        encoded = repr([converter.to_payload(a).SerializeToString() for a in args])
        encoded += repr(
            sorted((k, converter.to_payload(v).SerializeToString()) for k, v in kwargs.items())
        )
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


class FlowContext:
    """One run of one flow under one lease."""

    def __init__(
        self,
        flow_id: str,
        flow_type: str,
        lease_token: int,
        attempt: int,
        journal: list[common_pb2.JournalEntry],
        converter: PayloadConverter,
        recorder: Recorder,
        max_payload_bytes: int,
    ) -> None:
        self.flow_id = flow_id
        self.flow_type = flow_type
        self.lease_token = lease_token
        self.attempt = attempt
        self.converter = converter
        self.max_payload_bytes = max_payload_bytes
        self._entries = {entry.key: entry for entry in journal}
        self._replayable_steps = {
            e.key for e in journal if e.kind == common_pb2.ENTRY_KIND_STEP and "/" not in e.key
        }
        self._consumed: set[str] = set()
        self._root_keys = _TaskKeys(self, None, "")
        self._record = recorder
        self.steps_run = 0
        self.steps_replayed = 0
        # Flow-level waits not yet satisfied, and waits inside running steps.
        self._open: dict[str, asyncio.Future[common_pb2.JournalEntry]] = {}
        self._step_waits: dict[str, asyncio.Future[common_pb2.JournalEntry]] = {}
        self._wait_requests: dict[str, worker_pb2.WaitRequest] = {}
        # Flow-level waits registered and then given up, not yet reported in a suspend.
        self._abandoned: set[str] = set()
        # Step results sent whose acks have not come back, by key (see `settle`).
        self._unacked: dict[str, asyncio.Task[worker_pb2.Ack]] = {}
        self._inflight = 0
        self._activity = 0
        # The first step result the server refused (see `settle`).
        self.refusal: RpcError | None = None
        self._suspending = False
        # Set while no suspend is in flight: new waits wait for its answer, so the server sees a
        # flow's suspends and waits in the order the flow made them. (A suspend sent again
        # after a store outage once overtook a newer wait and cancelled it; the server now
        # cancels only the waits a suspend names as given up, and this keeps the order too.)
        self._no_suspend_in_flight = asyncio.Event()
        self._no_suspend_in_flight.set()
        self._background: set[asyncio.Task[None]] = set()
        # Tasks of the flow's own (gathered steps, raced waits) that called into it, besides
        # `task`: stopped with the flow, so no step body outlives the flow's end.
        self._branches: set[asyncio.Task[Any]] = set()
        # Set once the flow's own code has ended: a task it left behind may no longer call in.
        self._closed = False
        self.suspended = False
        self.cancel_requested = CANCEL_KEY in self._entries
        self._cancel_delivered = False
        self.task: asyncio.Task[Any] | None = None

    def activate(self) -> contextvars.Token[FlowContext | None]:
        """Make this the current context of the running task (the flow's own task)."""
        self._root_keys.task = asyncio.current_task()
        return _CURRENT.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token[FlowContext | None]) -> None:
        """Restore the context that was current before `activate`."""
        _CURRENT.reset(token)

    def _track_branch(self) -> None:
        task = asyncio.current_task()
        if task is None or task is self.task:
            return
        if self._closed:
            # Started by the flow, and still running after its end (it had not called in
            # before, so it was not stopped with the others): it must not act now.
            raise asyncio.CancelledError
        if task not in self._branches:
            self._branches.add(task)
            task.add_done_callback(self._branches.discard)

    async def stop_branches(self, timeout_s: float = 5.0) -> None:
        """Cancel the flow's other tasks and wait (bounded) until they have stopped.

        From then on, a call from a task of the flow is refused. The flow's end must not
        leave a step body running: its result would be refused, and a retry of the flow
        would run the same step beside it.
        """
        self._closed = True
        running = [task for task in self._branches if not task.done()]
        for task in running:
            task.cancel()
        if running:
            _, stuck = await asyncio.wait(running, timeout=timeout_s)
            if stuck:
                log.warning(
                    "flow %s: %d of its tasks ignored cancellation", self.flow_id, len(stuck)
                )

    def next_key(self, name: str) -> str:
        """The deterministic key of the next call of `name` at flow level (see `_TaskKeys`)."""
        # Taken before any await, so tasks started in order (asyncio.gather) get keys in order.
        inherited = _TASK_KEYS.get()
        keys = inherited if inherited is not None and inherited.flow is self else self._root_keys
        task = asyncio.current_task()
        key = keys.take(name)
        if keys.task is not None and keys.task is not task:
            # This task's first call: its later calls go under this key.
            _TASK_KEYS.set(_TaskKeys(self, task, f"{key}{TASK_KEY_SEPARATOR}"))
        return key

    # ------------------------------------------------------------ cancellation

    def request_cancel(self) -> None:
        """The server asked this flow to stop: raise FlowCancelledError at the next boundary."""
        self.cancel_requested = True
        if self._open and not self._cancel_delivered:
            self._cancel_delivered = True
            for future in self._open.values():
                if not future.done():
                    future.set_exception(FlowCancelledError(f"flow {self.flow_id} was cancelled"))

    def _boundary(self) -> None:
        if self.cancel_requested and not self._cancel_delivered:
            self._cancel_delivered = True
            raise FlowCancelledError(f"flow {self.flow_id} was cancelled")

    # ------------------------------------------------------------ steps

    async def run_step(
        self,
        definition: StepDefinition,
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Replay a recorded step or run it under its retry policy and record the outcome."""
        if _STEP.get() is not None:
            # A step called from inside another step is part of that step's body.
            return await definition.function(instance, *args, **kwargs)
        self._track_branch()
        key = self.next_key(definition.name)
        digest = args_hash(self.converter, args, kwargs)
        entry = self._entries.get(key)
        attempts = 0
        if entry is not None:
            self._consumed.add(key)
            if entry.kind != common_pb2.ENTRY_KIND_STEP or entry.args_hash != digest:
                raise HistoryMismatchError(
                    f"step {key} of flow {self.flow_id} was recorded with other arguments "
                    "or as another kind of entry; the flow's code changed"
                )
            if entry.status == common_pb2.ENTRY_STATUS_COMPLETED:
                self.steps_replayed += 1
                return self.converter.from_payload(entry.result, definition.return_hint)
            if entry.status == common_pb2.ENTRY_STATUS_FAILED:
                self.steps_replayed += 1
                raise StepFailedError(
                    key,
                    entry.error.type,
                    entry.error.message,
                    non_retryable=entry.error.non_retryable,
                )
            attempts = entry.attempts
        self._boundary()
        policy = definition.retry_policy
        # Counted from here, not from its body: a step waiting for the previous result keeps
        # the flow from suspending under it.
        self._inflight += 1
        self._activity += 1
        try:
            if self._unacked:
                await self.settle()
                # The server sends a cancel ahead of the acks of results sent after it: it
                # may have arrived while those were stored.
                self._boundary()
            # A suspend sent before this call: its answer says whether the flow still runs.
            await self._no_suspend_in_flight.wait()
            if self.suspended:
                raise asyncio.CancelledError
            while True:
                attempts += 1
                self.steps_run += 1
                scope = _STEP.set(_StepScope(key))
                started = time.perf_counter()
                try:
                    with _TRACER.span(
                        "ergon.step",
                        **{
                            "ergon.flow_id": self.flow_id,
                            "ergon.key": key,
                            "ergon.attempt": attempts,
                        },
                    ):
                        value = await definition.function(instance, *args, **kwargs)
                    payload = self._encode(value)
                except asyncio.CancelledError:
                    raise
                except (LeaseLostError, FlowCancelledError):
                    raise
                except Exception as error:
                    retry = policy.should_retry(error, attempts)
                    failure = failure_from_exception(
                        error, non_retryable=not policy.is_retryable(error)
                    )
                    elapsed_ms = round((time.perf_counter() - started) * 1000)
                    if retry:
                        await self._record(
                            self._step_event(key, digest, attempts, elapsed_ms, retrying=failure)
                        )
                        await asyncio.sleep(policy.delay_ms(attempts) / 1000)
                        continue
                    await self._record(
                        self._step_event(key, digest, attempts, elapsed_ms, failure=failure)
                    )
                    raise StepFailedError(
                        key, failure.type, failure.message, non_retryable=failure.non_retryable
                    ) from error
                finally:
                    _STEP.reset(scope)
                elapsed_ms = round((time.perf_counter() - started) * 1000)
                event = self._step_event(key, digest, attempts, elapsed_ms, result=payload)
                # The flow's own code may go on before the ack: it is deterministic and replays.
                # Anything with an effect (the next step's body, a wait, the flow's end) waits
                # for the ack first (`settle`), so no step ever runs on an unrecorded result.
                task = asyncio.ensure_future(self._record(event))
                task.add_done_callback(ignore_refusal)
                self._unacked[key] = task
                # The flow gets the decoded value, exactly as a replay would give it.
                return self.converter.from_payload(payload, definition.return_hint)
        finally:
            self._inflight -= 1
            self._activity += 1
            if self._open:
                self._schedule_settle_check()

    def _encode(self, value: Any) -> common_pb2.Payload:
        payload = self.converter.to_payload(value)
        size = payload.ByteSize()
        if size > self.max_payload_bytes:
            raise ConverterError(
                f"step result is {size} bytes; the payload limit is {self.max_payload_bytes}"
            )
        return payload

    def _step_event(
        self,
        key: str,
        digest: str,
        attempts: int,
        duration_ms: int,
        *,
        result: common_pb2.Payload | None = None,
        failure: common_pb2.Failure | None = None,
        retrying: common_pb2.Failure | None = None,
    ) -> worker_pb2.WorkerEvent:
        step_result = worker_pb2.StepResult(
            flow_id=self.flow_id,
            lease_token=self.lease_token,
            key=key,
            args_hash=digest,
            attempts=attempts,
            kind=common_pb2.ENTRY_KIND_STEP,
            duration_ms=duration_ms,
        )
        if result is not None:
            step_result.result.CopyFrom(result)
        elif failure is not None:
            step_result.failure.CopyFrom(failure)
        elif retrying is not None:
            step_result.retrying.CopyFrom(retrying)
        return worker_pb2.WorkerEvent(step_result=step_result)

    def unacked_keys(self) -> list[str]:
        """Keys of step results sent and not (yet) acknowledged as stored."""
        return [key for key, task in self._unacked.items() if not succeeded(task)]

    async def settle(self) -> None:
        """Wait until every step result sent is stored.

        Raises:
            RpcError: the server refused one (LeaseLostError, ...): the flow must stop.
        """
        while self._unacked:
            key, task = next(iter(self._unacked.items()))
            try:
                # Shielded: a branch cancelled while it waits here must not cancel an ack that
                # the flow's other tasks, and its end, still need.
                await asyncio.shield(task)
            except LeaseLostError:
                raise
            except RpcError as error:
                # Kept: the flow's code may catch it where it surfaces (the next step), but the
                # flow must not end as if the result were recorded.
                if self.refusal is None:
                    self.refusal = error
                raise
            finally:
                if task.done() and self._unacked.get(key) is task:
                    del self._unacked[key]

    def abandon_acks(self) -> None:
        """The flow ended: acks still due no longer matter (nor may they be sent again)."""
        for task in self._unacked.values():
            task.cancel()
        self._unacked.clear()

    def unreplayed_steps(self) -> list[str]:
        """Recorded steps the flow's code did not call this run (a history mismatch)."""
        return sorted(self._replayable_steps - self._consumed)

    # ------------------------------------------------------------ waits

    def wait_key_for(self, name: str) -> tuple[str, bool]:
        """The key of the next wait called `name` here, and whether it is inside a step.

        Inside a step, a wait belongs to the step: it is keyed under the step's key.
        """
        scope = _STEP.get()
        if scope is None:
            return self.next_key(name), False
        count = scope.counters.get(name, 0) + 1
        scope.counters[name] = count
        return f"{scope.key}/{name}#{count}", True

    async def wait(
        self,
        name: str,
        fill: Callable[[worker_pb2.WaitRequest], None],
        kind: common_pb2.EntryKind.ValueType,
        *,
        timer: bool = False,
    ) -> common_pb2.JournalEntry:
        """Wait durably under a deterministic key; returns the wait's journal entry (`kind`)."""
        key, in_step = self.wait_key_for(name)
        return await self.wait_key(key, fill, kind, timer=timer, in_step=in_step)

    async def wait_key(
        self,
        key: str,
        fill: Callable[[worker_pb2.WaitRequest], None],
        kind: common_pb2.EntryKind.ValueType,
        *,
        timer: bool = False,
        in_step: bool = False,
    ) -> common_pb2.JournalEntry:
        """Wait under a key the caller chose (see `wait`)."""
        self._track_branch()
        entry = self._entries.get(key)
        if entry is not None:
            self._consumed.add(key)
            if entry.kind != kind:
                raise HistoryMismatchError(
                    f"{key} of flow {self.flow_id} was recorded as another kind of entry; "
                    "the flow's code changed"
                )
            return entry
        if not in_step:
            self._boundary()
        if self._unacked:
            await self.settle()
        await self._no_suspend_in_flight.wait()
        request = worker_pb2.WaitRequest(
            flow_id=self.flow_id, lease_token=self.lease_token, key=key
        )
        fill(request)
        ack = await self._record(worker_pb2.WorkerEvent(wait=request))
        if ack.entries:
            return self._satisfied(ack.entries[0])
        # A wakeup read between the ack and this task's resuming found no future to resolve.
        early = self._entries.get(key)
        if early is not None:
            return self._satisfied(early)
        future: asyncio.Future[common_pb2.JournalEntry] = asyncio.get_running_loop().create_future()
        waits = self._step_waits if in_step else self._open
        waits[key] = future
        self._wait_requests[key] = request
        self._activity += 1
        if not in_step:
            self._schedule_settle_check()
        try:
            if timer and in_step:
                # The step keeps running: sleep here too, in case the server's firing is late
                # to arrive; the fire time is the server's, kept across retries.
                remaining = max(0.0, (ack.fire_at_ms - ack.server_time_ms) / 1000)
                try:
                    async with asyncio.timeout(remaining):
                        entry = await future
                except TimeoutError:
                    entry = common_pb2.JournalEntry(
                        key=key,
                        kind=common_pb2.ENTRY_KIND_TIMER,
                        status=common_pb2.ENTRY_STATUS_COMPLETED,
                    )
            else:
                entry = await future
        finally:
            waits.pop(key, None)
            self._wait_requests.pop(key, None)
            if not in_step and not succeeded(future):
                # Given up (the loser of a race): the next suspend has the server cancel it.
                self._abandoned.add(key)
        return self._satisfied(entry)

    def _satisfied(self, entry: common_pb2.JournalEntry) -> common_pb2.JournalEntry:
        self._entries[entry.key] = entry
        self._consumed.add(entry.key)
        self._activity += 1
        return entry

    def on_wakeup(self, entry: common_pb2.JournalEntry) -> None:
        """The server reports a satisfied wait of this flow."""
        future = self._open.get(entry.key) or self._step_waits.get(entry.key)
        if future is not None and not future.done():
            future.set_result(entry)
        else:
            self._entries.setdefault(entry.key, entry)

    def resync(self) -> None:
        """After a reconnect: ask again for every open wait, in case a wakeup was lost."""
        for key, request in list(self._wait_requests.items()):
            self._spawn(self._refresh(key, request))
        if self._open:
            self._schedule_settle_check()

    async def _refresh(self, key: str, request: worker_pb2.WaitRequest) -> None:
        try:
            ack = await self._record(worker_pb2.WorkerEvent(wait=request))
        except RpcError as error:
            log.info("flow %s: re-registering wait %s failed: %s", self.flow_id, key, error)
            return
        for entry in ack.entries:
            self.on_wakeup(entry)

    def _spawn(self, job: Awaitable[None]) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _schedule_settle_check(self) -> None:
        snapshot = self._activity
        asyncio.get_running_loop().call_later(SETTLE_S, self._maybe_suspend, snapshot)

    def _idle_since(self, snapshot: int) -> bool:
        return self._activity == snapshot and not self._inflight

    def _maybe_suspend(self, snapshot: int) -> None:
        if (
            not self._idle_since(snapshot)
            or self._suspending
            or self.suspended
            or not self._open
            or all(future.done() for future in self._open.values())
        ):
            return
        self._suspending = True
        self._no_suspend_in_flight.clear()
        self._spawn(self._suspend(tuple(self._open), snapshot))

    async def _suspend(self, open_keys: tuple[str, ...], snapshot: int) -> None:
        try:
            await self._send_suspend(open_keys, snapshot)
        finally:
            self._no_suspend_in_flight.set()

    async def _send_suspend(self, open_keys: tuple[str, ...], snapshot: int) -> None:
        abandoned = sorted(self._abandoned)
        suspend = worker_pb2.Suspend(
            flow_id=self.flow_id,
            lease_token=self.lease_token,
            open_keys=open_keys,
            abandoned_keys=abandoned,
        )
        try:
            # A suspended flow is no longer RUNNING: step results after it would be refused.
            await self.settle()
            if not self._idle_since(snapshot):
                # A branch moved on while the results were stored: not idle after all.
                self._suspending = False
                self._schedule_settle_check()
                return
            ack = await self._record(worker_pb2.WorkerEvent(suspend=suspend))
        except LeaseLostError:
            self.suspended = True
            if self.task is not None:
                self.task.cancel()
            return
        except RpcError as error:
            # Permanent (an unavailable server is retried by the stream): the flow could only
            # wait for ever, holding its slot. Its open waits raise it, and the flow fails.
            log.warning("flow %s: suspend refused: %s", self.flow_id, error)
            self._suspending = False
            for future in self._open.values():
                if not future.done():
                    future.set_exception(error)
            return
        self._abandoned.difference_update(abandoned)
        if ack.suspended:
            self.suspended = True
            if self.task is not None:
                self.task.cancel()
            return
        self._suspending = False
        for entry in ack.entries:
            self.on_wakeup(entry)
        if self._open:
            self._schedule_settle_check()

    async def child_result(
        self, key: str, child: Any, flow_type: str, result_hint: Any, *, in_step: bool = False
    ) -> Any:
        """Run a child flow to its end and return its result (raising ChildFlowError)."""
        payload = self.converter.to_payload(child)
        child_flow_id = f"{self.flow_id}/{key}"

        def fill(request: worker_pb2.WaitRequest) -> None:
            request.child.child_flow_id = child_flow_id
            request.child.flow_type = flow_type
            request.child.input.CopyFrom(payload)

        entry = await self.wait_key(key, fill, common_pb2.ENTRY_KIND_CHILD, in_step=in_step)
        if entry.status == common_pb2.ENTRY_STATUS_FAILED:
            raise ChildFlowError(
                entry.error.type, entry.error.message, not entry.error.non_retryable
            )
        return self.converter.from_payload(entry.result, result_hint)
