"""Durable waits for flows and steps: timers, external signals, child flows, and `dag()`."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from ergon_worker_sdk._context import FlowContext, current_context
from ergon_worker_sdk._definitions import StepDefinition, flow_type_definition
from ergon_worker_sdk.errors import (
    DagExecutionError,
    FlowCancelledError,
    HistoryMismatchError,
    LeaseLostError,
)
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, worker_pb2

R = TypeVar("R")


def _name(value: str, what: str) -> str:
    if not value or "#" in value or "/" in value:
        raise ValueError(f"{what} must be non-empty, without '#' or '/': {value!r}")
    return value


def _timer(seconds: float) -> Any:
    if seconds < 0:
        raise ValueError("a timer cannot fire in the past")

    def fill(request: worker_pb2.WaitRequest) -> None:
        request.timer.fire_in_ms = round(seconds * 1000)

    return fill


async def schedule_timer(seconds: float) -> None:
    """Sleep durably: the fire time is stored once and survives any restart.

    In a flow, the flow gives its worker slot back while it sleeps. In a step, the step sleeps
    (keeping its slot); a retry of the step does not sleep again for a timer that has fired.
    Outside a flow it is a plain sleep.
    """
    context = current_context()
    if context is None:
        await asyncio.sleep(seconds)
        return
    await context.wait("timer", _timer(seconds), common_pb2.ENTRY_KIND_TIMER, timer=True)


async def schedule_timer_named(seconds: float, name: str) -> None:
    """`schedule_timer` with a name, shown in the flow's history (`timer:NAME#n`)."""
    context = current_context()
    if context is None:
        await asyncio.sleep(seconds)
        return
    await context.wait(
        f"timer:{_name(name, 'a timer name')}",
        _timer(seconds),
        common_pb2.ENTRY_KIND_TIMER,
        timer=True,
    )


async def await_external_signal(name: str, hint: Any = None) -> Any:
    """Wait for the next signal called `name` sent to this flow; returns its decoded payload.

    Signals are durable FIFO mailboxes: one sent before the flow waits is buffered, and each is
    consumed by exactly one wait. `hint` shapes the decoded value (a dataclass type, say).
    """
    context = current_context()
    if context is None:
        raise RuntimeError("await_external_signal is only meaningful inside a flow")

    def fill(request: worker_pb2.WaitRequest) -> None:
        request.signal.name = name

    entry = await context.wait(
        f"signal:{_name(name, 'a signal name')}", fill, common_pb2.ENTRY_KIND_SIGNAL
    )
    return context.converter.from_payload(entry.result, hint)


class PendingChild(Generic[R]):
    """A child flow invoked by a flow; `await pending.result()` runs it to its end."""

    def __init__(self, context: FlowContext, child: Any) -> None:
        definition = flow_type_definition(type(child))
        self._context = context
        self._child = child
        self._definition = definition
        # Keyed when invoked, so children invoked in order get keys in order; inside a step,
        # under the step's key (the step's replay does not count flow-level keys).
        self.key, self._in_step = context.wait_key_for(f"child:{definition.type_id}")
        self.flow_id = f"{context.flow_id}/{self.key}"

    async def result(self) -> R:
        """The child's result; raises ChildFlowError if it failed or was cancelled."""
        value: R = await self._context.child_result(
            self.key,
            self._child,
            self._definition.type_id,
            self._definition.result_hint,
            in_step=self._in_step,
        )
        return value


def invoke(child: Any) -> PendingChild[Any]:
    """Invoke a child flow from the running flow (also `self.invoke(child)` on flow types).

    The child's id is deterministic (the parent's id and the call's key), so replays find the
    same child; the parent holds no worker slot while it waits for the child.
    """
    context = current_context()
    if context is None:
        raise RuntimeError("child flows can only be invoked from inside a flow")
    return PendingChild(context, child)


async def dag(flow: Any, final_step: str | None = None) -> Any:
    """Run a flow's `@step(depends_on=..., inputs=...)` steps as a DAG, level by level.

    Independent steps run in parallel (`asyncio.gather`, in name order, so keys are stable);
    `inputs` wires a parameter to another step's result. Returns `final_step`'s result, or the
    last step's.
    """
    steps = flow_type_definition(type(flow)).steps
    if not steps:
        raise DagExecutionError(f"{type(flow).__name__} has no @step methods")
    for name, step in steps.items():
        for dependency in step.depends_on:
            if dependency not in steps:
                raise DagExecutionError(f"step {name!r} depends on unknown step {dependency!r}")
    needed = _ancestors(steps, final_step) if final_step else set(steps)
    if final_step and final_step not in steps:
        raise DagExecutionError(f"final step {final_step!r} is not a @step")
    results: dict[str, Any] = {}
    remaining = set(needed)
    last: str | None = None
    while remaining:
        level = sorted(n for n in remaining if set(steps[n].depends_on) <= results.keys())
        if not level:
            raise DagExecutionError(f"steps {sorted(remaining)} form a dependency cycle")
        calls = []
        for name in level:
            kwargs = {param: results[source] for param, source in steps[name].inputs.items()}
            calls.append(getattr(flow, _method_name(flow, steps[name]))(**kwargs))
        try:
            values = await asyncio.gather(*calls)
        except (HistoryMismatchError, FlowCancelledError, LeaseLostError):
            # The runtime's own signals, not a step's failure: the worker parks, cancels or
            # drops the flow on them, which it could not do through a DagExecutionError.
            raise
        except Exception as error:
            raise DagExecutionError(f"a step of {level} failed: {error}") from error
        results.update(zip(level, values, strict=True))
        remaining -= set(level)
        last = level[-1]
    return results[final_step] if final_step else results[last] if last else None


def _ancestors(steps: dict[str, StepDefinition], final: str) -> set[str]:
    found: set[str] = set()
    stack = [final]
    while stack:
        name = stack.pop()
        if name in found or name not in steps:
            continue
        found.add(name)
        stack.extend(steps[name].depends_on)
    return found


def _method_name(flow: Any, step: StepDefinition) -> str:
    return step.function.__name__
