"""`Worker`: runs registered flow types for the server, `handle.shutdown()` to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from ergon_worker_sdk._client import Client
from ergon_worker_sdk._context import FlowContext, failure_from_exception, ignore_refusal
from ergon_worker_sdk._definitions import FlowTypeDefinition, RetryPolicy, flow_type_definition
from ergon_worker_sdk._session import WorkerStream
from ergon_worker_sdk.converter import construct_dataclass
from ergon_worker_sdk.errors import (
    ConverterError,
    FlowCancelledError,
    HistoryMismatchError,
    LeaseLostError,
    RpcError,
)
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, worker_pb2
from ergon_worker_sdk.tracing import Tracer

log = logging.getLogger("ergon_worker_sdk.worker")
# How long a stopping worker waits for the server to take back the flows it still runs.
RELEASE_TIMEOUT_S = 5.0


@dataclass
class _Running:
    lease_token: int
    task: asyncio.Task[None]
    # Made with the task, so a cancel or wakeup read before the task starts reaches it.
    context: FlowContext


class Worker:
    """Runs flows of the registered types, at most `max_concurrency` at once.

    Args:
        client: the connection to the server.
        worker_id: a name for this worker in logs and listings (host:pid by default).
        max_concurrency: most flows held at once (the session's capacity).
    """

    def __init__(
        self, client: Client, worker_id: str | None = None, *, max_concurrency: int = 100
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.client = client
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.max_concurrency = max_concurrency
        self._types: dict[str, FlowTypeDefinition] = {}
        self._running: dict[str, _Running] = {}
        self._stream: WorkerStream | None = None
        self._stream_task: asyncio.Task[None] | None = None
        # Shutting down: an assignment that still arrives is given back, not run.
        self._draining = False
        self._tracer = Tracer("ergon_worker_sdk")
        self.flows_completed = 0
        self.flows_failed = 0
        self.max_running = 0

    async def register(self, *flow_classes: type[Any]) -> None:
        """Run flows of these `@flow_type` classes. Call before `start()`."""
        if self._stream is not None:
            raise RuntimeError("register flow types before starting the worker")
        for cls in flow_classes:
            definition = flow_type_definition(cls)
            existing = self._types.get(definition.type_id)
            if existing is not None and existing.cls is not cls:
                raise ValueError(f"flow type {definition.type_id!r} is registered twice")
            self._types[definition.type_id] = definition

    async def start(self) -> WorkerHandle:
        """Connect and start taking flows; returns once the first session is registered."""
        if not self._types:
            raise RuntimeError("register at least one @flow_type before starting the worker")
        if self._stream is not None:
            raise RuntimeError("the worker is already started")
        self._draining = False
        self._stream = WorkerStream(
            lambda: self.client.channel,
            self.worker_id,
            sorted(self._types),
            self.max_concurrency,
            self,
            metadata=self.client.call_metadata,
            max_batch_bytes=self.client.batch_bytes,
        )
        self._stream_task = asyncio.create_task(self._stream.run(), name="ergon-worker-stream")
        connected = asyncio.create_task(self._stream.connected.wait())
        await asyncio.wait([connected, self._stream_task], return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if self._stream_task.done():
            self._stream_task.result()
            failure, self._stream, self._stream_task = self._stream.failure, None, None
            if failure is not None:
                raise failure
            raise RuntimeError("the worker's stream ended before it registered")
        return WorkerHandle(self)

    # ---- StreamHandler

    def held_leases(self) -> list[worker_pb2.HeldLease]:
        """Leases of the flows running here."""
        return [
            worker_pb2.HeldLease(flow_id=flow_id, lease_token=running.lease_token)
            for flow_id, running in self._running.items()
        ]

    def on_registered(self, reattached: set[str]) -> None:
        """Stop flows whose leases did not survive the reconnect: someone else runs them now."""
        for flow_id in [f for f in self._running if f not in reattached]:
            log.info("lease on flow %s was not re-attached; dropping it here", flow_id)
            self._drop(flow_id)
        for running in self._running.values():
            running.context.resync()

    def on_assignment(self, assignment: worker_pb2.Assignment) -> None:
        """Start running an assigned flow (or, while shutting down, give it back)."""
        if self._draining:
            self._give_back(assignment.flow_id, assignment.lease_token)
            return
        existing = self._running.get(assignment.flow_id)
        if existing is not None:
            if existing.lease_token == assignment.lease_token:
                return
            self._drop(assignment.flow_id)
        context = self._context(assignment)
        task = asyncio.create_task(
            self._execute(assignment, context), name=f"flow-{assignment.flow_id}"
        )
        self._running[assignment.flow_id] = _Running(assignment.lease_token, task, context)
        self.max_running = max(self.max_running, len(self._running))

    def on_revoke(self, revoke: worker_pb2.Revoke) -> None:
        """Stop a flow whose lease is gone."""
        running = self._running.get(revoke.flow_id)
        if running is not None and running.lease_token == revoke.lease_token:
            log.info("flow %s revoked (%s)", revoke.flow_id, revoke.reason)
            self._drop(revoke.flow_id)

    def on_wakeup(self, wakeup: worker_pb2.Wakeup) -> None:
        """Hand a satisfied wait to the flow waiting for it."""
        running = self._running.get(wakeup.flow_id)
        if running is not None and running.lease_token == wakeup.lease_token:
            running.context.on_wakeup(wakeup.entry)

    def on_lease_ended(self, flow_id: str, lease_token: int) -> None:
        """The server has the flow back: its slot is free here too."""
        running = self._running.get(flow_id)
        if running is not None and running.lease_token == lease_token:
            del self._running[flow_id]

    def on_cancel_requested(self, cancel: worker_pb2.CancelRequested) -> None:
        """Tell a running flow it was cancelled: it stops at its next step or wait."""
        running = self._running.get(cancel.flow_id)
        if running is not None and running.lease_token == cancel.lease_token:
            log.info("flow %s: cancel requested (%s)", cancel.flow_id, cancel.reason)
            running.context.request_cancel()

    def _drop(self, flow_id: str) -> None:
        running = self._running.pop(flow_id, None)
        if running is not None:
            running.task.cancel()

    # ---- running flows

    async def _request(self, event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        return await self._stream_or_fail().request(event)

    def _request_soon(self, event: worker_pb2.WorkerEvent) -> asyncio.Task[worker_pb2.Ack]:
        # Flows record through this: their events leave in the order the flow made them.
        return self._stream_or_fail().request_soon(event)

    def _stream_or_fail(self) -> WorkerStream:
        if self._stream is None:
            raise RuntimeError("the worker is not running")
        return self._stream

    async def _execute(self, assignment: worker_pb2.Assignment, context: FlowContext) -> None:
        flow_id, token = assignment.flow_id, assignment.lease_token
        context.task = asyncio.current_task()
        try:
            with self._tracer.span(
                "ergon.flow",
                **{
                    "ergon.flow_id": flow_id,
                    "ergon.flow_type": assignment.flow_type,
                    "ergon.attempt": assignment.attempt,
                },
            ):
                await self._run_flow(assignment, context)
        except LeaseLostError:
            if not context.suspended:
                log.info("flow %s: lease lost; another worker has it", flow_id)
        except asyncio.CancelledError:
            if context.suspended:
                log.debug("flow %s suspended until a wait is satisfied", flow_id)
        except RpcError as error:
            log.error("flow %s: the server refused its outcome; parking it: %s", flow_id, error)
            self._park_soon(flow_id, token, error)
        except Exception as error:
            log.exception("flow %s: the worker failed running it; parking it", flow_id)
            self._park_soon(flow_id, token, error)
        finally:
            running = self._running.get(flow_id)
            if running is not None and running.lease_token == token:
                del self._running[flow_id]

    def _park_soon(self, flow_id: str, lease_token: int, error: BaseException) -> None:
        # Not given back: it would come straight back to fail the same way, in a loop. Parked,
        # the server retries it with a growing delay (and `ergon flows show` gives the error).
        failure = failure_from_exception(error)
        failure.reason = "WORKER_ERROR"
        park = worker_pb2.Park(flow_id=flow_id, lease_token=lease_token, failure=failure)
        self._end_lease_soon(worker_pb2.WorkerEvent(park=park))

    def _give_back(self, flow_id: str, lease_token: int) -> None:
        # The flow stopped here without an end the server took: its lease would otherwise be
        # renewed by this session's heartbeats forever. Released, it runs again elsewhere.
        self._end_lease_soon(_release_event(flow_id, lease_token))

    def _end_lease_soon(self, event: worker_pb2.WorkerEvent) -> None:
        if self._stream is None:
            return
        # Refused when the lease moved on meanwhile: what was wanted, or nothing left to do.
        self._stream.request_soon(event).add_done_callback(ignore_refusal)

    def _context(self, assignment: worker_pb2.Assignment) -> FlowContext:
        return FlowContext(
            flow_id=assignment.flow_id,
            flow_type=assignment.flow_type,
            lease_token=assignment.lease_token,
            attempt=max(1, assignment.attempt),
            journal=list(assignment.journal),
            converter=self.client.converter,
            recorder=self._request_soon,
            max_payload_bytes=self.client.max_payload_bytes,
        )

    async def _run_flow(self, assignment: worker_pb2.Assignment, context: FlowContext) -> None:
        definition = self._types[assignment.flow_type]
        converter = self.client.converter
        token = context.activate()
        try:
            try:
                fields = converter.from_payload(assignment.input)
                instance = construct_dataclass(definition.cls, fields or {})
            except (ConverterError, TypeError) as error:
                await self._fail(assignment, error, "MALFORMED_INPUT", retry_delay_ms=0)
                return
            try:
                try:
                    result = await getattr(instance, definition.method_name)()
                finally:
                    await context.stop_branches()
                if context.refusal is not None:
                    # The flow caught it, but a step it ran is not recorded: it cannot end so.
                    raise context.refusal
                payload = self.client.payload(result)
                unreplayed = context.unreplayed_steps()
                if unreplayed:
                    raise HistoryMismatchError(
                        f"flow {assignment.flow_id} ended without calling the recorded steps "
                        f"{', '.join(unreplayed)}; the flow's code changed"
                    )
            except (asyncio.CancelledError, LeaseLostError):
                raise
            except HistoryMismatchError as error:
                await _settle(context)
                await self._park(assignment, error)
                return
            except Exception as error:
                policy = self._flow_policy(assignment, definition)
                delay = 0
                if policy.should_retry(error, context.attempt) and not isinstance(
                    error, FlowCancelledError
                ):
                    delay = max(1, policy.delay_ms(context.attempt))
                # The end of the flow comes after every step result it saw, as always.
                await _settle(context)
                refusal = context.refusal
                if refusal is not None:
                    # A step result the server will not take (over its payload limit, say):
                    # run again, the step would only make it again.
                    error, delay = refusal, 0
                await self._fail(assignment, error, "", retry_delay_ms=delay)
                return
        finally:
            FlowContext.deactivate(token)
        try:
            await self._complete(assignment, context, payload)
        except LeaseLostError:
            raise
        except RpcError as error:
            # The server will not take this end (a result over its payload limit, say): the
            # flow fails with that error rather than run again and again.
            log.error("flow %s: the server refused its result: %s", assignment.flow_id, error)
            await self._fail(assignment, error, error.reason, retry_delay_ms=0)
            return
        self.flows_completed += 1

    async def _complete(
        self, assignment: worker_pb2.Assignment, context: FlowContext, result: common_pb2.Payload
    ) -> None:
        # Sent right behind the last step's result, naming the results not yet acknowledged:
        # the server ends the flow only once they are recorded, in the same commit if it can.
        completed = worker_pb2.FlowCompleted(
            flow_id=assignment.flow_id,
            lease_token=assignment.lease_token,
            result=result,
            requires_keys=context.unacked_keys(),
        )
        try:
            await self._request(worker_pb2.WorkerEvent(flow_completed=completed))
        except RpcError as error:
            if error.reason != "STEP_NOT_RECORDED":
                raise
            # The results went into a later commit than the end: wait for them, end again.
            await context.settle()
            del completed.requires_keys[:]
            await self._request(worker_pb2.WorkerEvent(flow_completed=completed))
        finally:
            context.abandon_acks()

    @staticmethod
    def _flow_policy(
        assignment: worker_pb2.Assignment, definition: FlowTypeDefinition
    ) -> RetryPolicy:
        if assignment.HasField("retry_policy"):
            return RetryPolicy.from_proto(assignment.retry_policy)
        return definition.flow.retry_policy or RetryPolicy.NONE

    async def _park(self, assignment: worker_pb2.Assignment, error: HistoryMismatchError) -> None:
        failure = failure_from_exception(error)
        failure.reason = error.reason
        log.warning("flow %s parked: %s", assignment.flow_id, error)
        park = worker_pb2.Park(
            flow_id=assignment.flow_id, lease_token=assignment.lease_token, failure=failure
        )
        await self._request(worker_pb2.WorkerEvent(park=park))

    async def _fail(
        self,
        assignment: worker_pb2.Assignment,
        error: BaseException,
        reason: str,
        *,
        retry_delay_ms: int,
    ) -> None:
        failure = failure_from_exception(error, non_retryable=retry_delay_ms == 0)
        if reason:
            failure.reason = reason
        if retry_delay_ms:
            log.info(
                "flow %s attempt %d failed (%s); retrying in %d ms",
                assignment.flow_id,
                assignment.attempt,
                failure.type,
                retry_delay_ms,
            )
        else:
            log.info("flow %s failed: %s: %s", assignment.flow_id, failure.type, failure.message)
            self.flows_failed += 1
        failed = worker_pb2.FlowFailed(
            flow_id=assignment.flow_id,
            lease_token=assignment.lease_token,
            failure=failure,
            retry_delay_ms=retry_delay_ms,
        )
        await self._request(worker_pb2.WorkerEvent(flow_failed=failed))

    @property
    def running(self) -> int:
        """Flows running now."""
        return len(self._running)

    async def _shutdown(self, grace_s: float) -> None:
        stream, task = self._stream, self._stream_task
        if stream is None or task is None:
            return
        self._draining = True
        # Once the server has taken capacity 0 in, every assignment it sent before is here
        # (its ack comes after them on the stream), so the flows running now are all there
        # will be. One that arrives later (a server slower than this wait) is given back on
        # arrival (`on_assignment`) until the stream closes, which waits for that ack too.
        stopped = stream.stop_assignments()
        if stopped is not None:
            stopped.add_done_callback(ignore_refusal)
            await asyncio.wait([stopped], timeout=2)
        if self._running:
            tasks = [r.task for r in self._running.values()]
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            if late:
                log.info("%d flows still running after the grace period; releasing them", len(late))
            leases = [(flow_id, running.lease_token) for flow_id, running in self._running.items()]
            dropped = [running.task for running in self._running.values()]
            for flow_id, _ in leases:
                self._drop(flow_id)
            # Stopped first (their step bodies with them): given back while a body still ran,
            # a flow could run on another worker beside it.
            if dropped:
                await asyncio.wait(dropped, timeout=RELEASE_TIMEOUT_S)
            # Given back together if the server answers soon; if not (or with no stream up),
            # their leases lapse anyway.
            if leases and stream.connected.is_set():
                releases = [stream.request_soon(_release_event(*lease)) for lease in leases]
                for release in releases:
                    release.add_done_callback(ignore_refusal)
                await asyncio.wait(releases, timeout=RELEASE_TIMEOUT_S)
        await stream.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._stream = None
        self._stream_task = None


async def _settle(context: FlowContext) -> None:
    """Wait for the flow's step results to be stored, before its end.

    A refused one is kept in `context.refusal` for the end to act on (an unavailable server
    is retried by the stream, so a refusal is for good); a lost lease ends the run here.
    """
    try:
        await context.settle()
    except LeaseLostError:
        raise
    except RpcError:
        pass


def _release_event(flow_id: str, lease_token: int) -> worker_pb2.WorkerEvent:
    """The event giving a flow's lease back to the server."""
    return worker_pb2.WorkerEvent(
        release=worker_pb2.Release(flow_id=flow_id, lease_token=lease_token)
    )


class WorkerHandle:
    """A started worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop taking flows, let running ones finish for up to `grace` seconds, release the rest.

        Idempotent.
        """
        await self.worker._shutdown(grace)
