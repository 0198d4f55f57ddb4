"""The running flow's context: journal replay and step recording.

Each `@step` call gets a deterministic key (step name + occurrence counter). A key found in the
journal returns its recorded value (or raises its recorded failure) without running; a new step
runs, its result is sent to the server, and the flow continues once the server has stored it.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ergon_worker_sdk.converter import PayloadConverter, to_jsonable
from ergon_worker_sdk.errors import (
    ConverterError,
    ErgonError,
    HistoryMismatchError,
    StepFailedError,
)
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, worker_pb2

if TYPE_CHECKING:
    from ergon_worker_sdk._definitions import StepDefinition

_CURRENT: contextvars.ContextVar[FlowContext | None] = contextvars.ContextVar(
    "ergon_flow_context", default=None
)

# Sends a worker event and returns once the server has stored it (raises if refused).
Recorder = Callable[[worker_pb2.WorkerEvent], Awaitable[None]]


def current_context() -> FlowContext | None:
    """The context of the flow running in this task, or None outside flows."""
    return _CURRENT.get()


def failure_from_exception(
    error: BaseException, *, non_retryable: bool = False
) -> common_pb2.Failure:
    """The wire form of an exception."""
    if isinstance(error, StepFailedError):
        kind, message = error.error_type, error.message
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
        self._journal = {entry.key: entry for entry in journal}
        self._counters: dict[str, int] = {}
        self._record = recorder
        self.steps_run = 0
        self.steps_replayed = 0

    def activate(self) -> contextvars.Token[FlowContext | None]:
        """Make this the current context of the running task."""
        return _CURRENT.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token[FlowContext | None]) -> None:
        """Restore the context that was current before `activate`."""
        _CURRENT.reset(token)

    def next_key(self, name: str) -> str:
        """The deterministic key of the next call of a step named `name`."""
        # Taken before any await, so tasks started in order (asyncio.gather) get keys in order.
        count = self._counters.get(name, 0) + 1
        self._counters[name] = count
        return f"{name}#{count}"

    async def run_step(
        self,
        definition: StepDefinition,
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Replay a recorded step or run it under its retry policy and record the outcome."""
        key = self.next_key(definition.name)
        digest = args_hash(self.converter, args, kwargs)
        entry = self._journal.get(key)
        attempts = 0
        if entry is not None:
            if entry.args_hash != digest:
                raise HistoryMismatchError(
                    f"step {key} of flow {self.flow_id} was recorded with other arguments; "
                    "the flow's code or input handling changed"
                )
            if entry.status == common_pb2.ENTRY_STATUS_COMPLETED:
                self.steps_replayed += 1
                return self.converter.from_payload(entry.result, definition.return_hint)
            if entry.status == common_pb2.ENTRY_STATUS_FAILED:
                self.steps_replayed += 1
                raise StepFailedError(key, entry.error.type, entry.error.message)
            attempts = entry.attempts
        policy = definition.retry_policy
        while True:
            attempts += 1
            self.steps_run += 1
            try:
                value = await definition.function(instance, *args, **kwargs)
                payload = self._encode(value)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                retry = policy.should_retry(error, attempts)
                failure = failure_from_exception(
                    error, non_retryable=not policy.is_retryable(error)
                )
                if retry:
                    await self._record_step(key, digest, attempts, retrying=failure)
                    await asyncio.sleep(policy.delay_ms(attempts) / 1000)
                    continue
                await self._record_step(key, digest, attempts, failure=failure)
                raise StepFailedError(key, failure.type, failure.message) from error
            await self._record_step(key, digest, attempts, result=payload)
            # The flow gets the decoded value, exactly as a replay would give it.
            return self.converter.from_payload(payload, definition.return_hint)

    def _encode(self, value: Any) -> common_pb2.Payload:
        payload = self.converter.to_payload(value)
        size = payload.ByteSize()
        if size > self.max_payload_bytes:
            raise ConverterError(
                f"step result is {size} bytes; the payload limit is {self.max_payload_bytes}"
            )
        return payload

    async def _record_step(
        self,
        key: str,
        digest: str,
        attempts: int,
        *,
        result: common_pb2.Payload | None = None,
        failure: common_pb2.Failure | None = None,
        retrying: common_pb2.Failure | None = None,
    ) -> None:
        step_result = worker_pb2.StepResult(
            flow_id=self.flow_id,
            lease_token=self.lease_token,
            key=key,
            args_hash=digest,
            attempts=attempts,
            kind=common_pb2.ENTRY_KIND_STEP,
        )
        if result is not None:
            step_result.result.CopyFrom(result)
        elif failure is not None:
            step_result.failure.CopyFrom(failure)
        elif retrying is not None:
            step_result.retrying.CopyFrom(retrying)
        await self._record(worker_pb2.WorkerEvent(step_result=step_result))
