"""The decorators `@flow_type`, `@flow`, `@step` and the `RetryPolicy` they take.

Decorators validate eagerly and store a frozen definition on what they decorate.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import random
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, ParamSpec, TypeVar, overload

from ergon_worker_sdk._context import current_context
from ergon_worker_sdk.errors import ChildFlowError, NonRetryableError, StepFailedError
from ergon_worker_sdk.proto.ergon.v1 import common_pb2

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

FLOW_TYPE_ATTR = "__ergon_flow_type__"
FLOW_ATTR = "__ergon_flow__"
STEP_ATTR = "__ergon_step__"


# Where the delays of a policy without `max_delay_ms` stop growing.
UNCAPPED_DELAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed step (or flow) is retried.

    Attributes:
        max_attempts: total attempts, the first included; 1 means no retry.
        initial_delay_ms: delay before the second attempt.
        max_delay_ms: the longest delay between attempts (0: no cap, though delays stop
            growing at a day).
        backoff_multiplier: each delay is the previous one times this.
        non_retryable_errors: exception types (or their names) never retried; subclasses of
            `NonRetryableError` never are either.
    """

    max_attempts: int = 1
    initial_delay_ms: int = 100
    max_delay_ms: int = 10_000
    backoff_multiplier: float = 2.0
    non_retryable_errors: tuple[type[BaseException] | str, ...] = ()

    NONE: ClassVar[RetryPolicy]
    STANDARD: ClassVar[RetryPolicy]
    AGGRESSIVE: ClassVar[RetryPolicy]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_delay_ms < 0 or self.max_delay_ms < 0:
            raise ValueError("retry delays must not be negative")
        if self.backoff_multiplier < 1.0:
            raise ValueError("backoff_multiplier must be at least 1.0")

    @property
    def error_type_names(self) -> tuple[str, ...]:
        """The non-retryable error types, by name (as the wire carries them)."""
        return tuple(t if isinstance(t, str) else t.__name__ for t in self.non_retryable_errors)

    def is_retryable(self, error: BaseException) -> bool:
        """Whether this error may be retried at all.

        A failed step or child flow raised into a flow is judged by the error it carries: its
        own non-retryable verdict, and its error's type name against this policy's list.
        """
        if isinstance(error, NonRetryableError):
            return False
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, StepFailedError):
            if error.non_retryable:
                return False
            names.add(error.error_type)
        elif isinstance(error, ChildFlowError):
            if not error.retryable:
                return False
            names.add(error.type_name)
        for kind in self.non_retryable_errors:
            if isinstance(kind, str):
                if kind in names:
                    return False
            elif isinstance(error, kind):
                return False
        return True

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt number `attempt` (from 1), which raised `error`, gets another."""
        return attempt < self.max_attempts and self.is_retryable(error)

    def to_proto(self) -> common_pb2.RetryPolicy:
        """The wire form (non-retryable errors by name)."""
        return common_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            initial_delay_ms=self.initial_delay_ms,
            max_delay_ms=self.max_delay_ms,
            backoff_multiplier=self.backoff_multiplier,
            non_retryable_error_types=list(self.error_type_names),
        )

    @classmethod
    def from_proto(cls, wire: common_pb2.RetryPolicy) -> RetryPolicy:
        """A policy from its wire form, clamped to valid values."""
        return cls(
            max_attempts=max(1, wire.max_attempts),
            initial_delay_ms=max(0, wire.initial_delay_ms),
            max_delay_ms=max(0, wire.max_delay_ms),
            backoff_multiplier=max(1.0, wire.backoff_multiplier),
            non_retryable_errors=tuple(wire.non_retryable_error_types),
        )

    def delay_ms(self, attempt: int) -> int:
        """The delay after attempt number `attempt` failed: up to 10% jitter, never over the cap."""
        try:
            # In floats: an int multiplier's power never overflows, but the product would.
            delay = self.initial_delay_ms * float(self.backoff_multiplier) ** max(0, attempt - 1)
        except OverflowError:
            # A policy retrying for ever reaches this after about a thousand attempts.
            delay = math.inf
        delay *= 1 + random.random() * 0.1
        return int(min(delay, self.max_delay_ms or UNCAPPED_DELAY_MS))


RetryPolicy.NONE = RetryPolicy()
RetryPolicy.STANDARD = RetryPolicy(
    max_attempts=3, initial_delay_ms=1_000, max_delay_ms=30_000, backoff_multiplier=2.0
)
RetryPolicy.AGGRESSIVE = RetryPolicy(
    max_attempts=10, initial_delay_ms=100, max_delay_ms=10_000, backoff_multiplier=2.0
)


@dataclass(frozen=True)
class StepDefinition:
    """What `@step` knows of a step."""

    name: str
    retry_policy: RetryPolicy
    function: Callable[..., Awaitable[Any]]
    depends_on: tuple[str, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def return_hint(self) -> Any:
        """The step's return annotation, used to shape replayed values."""
        try:
            return typing.get_type_hints(self.function).get("return")
        except (NameError, TypeError):
            return None


@dataclass(frozen=True)
class FlowDefinition:
    """What `@flow` knows of a flow's entry point."""

    retry_policy: RetryPolicy | None


@dataclass(frozen=True)
class FlowTypeDefinition:
    """What `@flow_type` knows of a flow class."""

    type_id: str
    cls: type[Any]
    method_name: str
    flow: FlowDefinition
    steps: dict[str, StepDefinition] = field(default_factory=dict)

    @functools.cached_property
    def result_hint(self) -> Any:
        """The `@flow` method's return annotation."""
        try:
            return typing.get_type_hints(getattr(self.cls, self.method_name)).get("return")
        except (NameError, TypeError):
            return None


@overload
def flow_type(cls: type[T], /) -> type[T]: ...
@overload
def flow_type(*, type_id: str | None = None) -> Callable[[type[T]], type[T]]: ...
def flow_type(
    cls: type[T] | None = None, /, *, type_id: str | None = None
) -> type[T] | Callable[[type[T]], type[T]]:
    """Mark a class as a flow type: its (dataclass) fields are the flow's input.

    Args:
        cls: the class (when used bare, `@flow_type`).
        type_id: the name workers and clients know the type by; the class name by default.
    """

    def decorate(target: type[T]) -> type[T]:
        if not inspect.isclass(target):
            raise TypeError("@flow_type decorates a class")
        entry = [
            (name, member)
            for name, member in vars(target).items()
            if getattr(member, FLOW_ATTR, None) is not None
        ]
        if len(entry) != 1:
            found = ", ".join(n for n, _ in entry) or "none"
            raise TypeError(
                f"flow type {target.__name__} needs exactly one @flow method, found {found}"
            )
        name, method = entry[0]
        steps = {
            defn.name: defn
            for member in vars(target).values()
            if (defn := getattr(member, STEP_ATTR, None)) is not None
        }
        definition = FlowTypeDefinition(
            type_id=type_id or target.__name__,
            cls=target,
            method_name=name,
            flow=getattr(method, FLOW_ATTR),
            steps=steps,
        )
        if not definition.type_id or len(definition.type_id) > 256:
            raise ValueError("type_id must be 1 to 256 characters")
        setattr(target, FLOW_TYPE_ATTR, definition)
        if not hasattr(target, "invoke"):
            target.invoke = _invoke  # type: ignore[attr-defined]
        return target

    return decorate(cls) if cls is not None else decorate


def _invoke(self: Any, child: Any) -> Any:
    """Invoke a child flow from this flow: `await self.invoke(Child(...)).result()`."""
    # Imported here: the waits module builds on this one.
    from ergon_worker_sdk._waits import invoke

    return invoke(child)


def flow_type_definition(cls: type[Any]) -> FlowTypeDefinition:
    """The definition of a `@flow_type` class, checked to be a dataclass."""
    definition: FlowTypeDefinition | None = getattr(cls, FLOW_TYPE_ATTR, None)
    if definition is None:
        raise TypeError(f"{cls.__name__} is not a @flow_type class")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"flow type {cls.__name__} must be a @dataclass (its fields are its input)")
    return definition


Method = Callable[..., Awaitable[R]]


@overload
def flow(function: Method[R], /) -> Method[R]: ...
@overload
def flow(*, retry_policy: RetryPolicy | None = None) -> Callable[[Method[R]], Method[R]]: ...
def flow(
    function: Method[R] | None = None, /, *, retry_policy: RetryPolicy | None = None
) -> Method[R] | Callable[[Method[R]], Method[R]]:
    """Mark the async method that runs a flow from the top (replayed after any interruption).

    Args:
        function: the method (when used bare, `@flow`).
        retry_policy: how the whole flow is retried after it fails; steps already recorded
            replay, failed steps run again. No retry by default.
    """

    def decorate(target: Method[R]) -> Method[R]:
        if not inspect.iscoroutinefunction(target):
            raise TypeError(f"@flow method {target.__name__} must be async")
        setattr(target, FLOW_ATTR, FlowDefinition(retry_policy))
        return target

    return decorate(function) if function is not None else decorate


@overload
def step(function: Method[R], /) -> Method[R]: ...
@overload
def step(
    *,
    name: str | None = None,
    retry_policy: RetryPolicy | None = None,
    depends_on: str | list[str] | None = None,
    inputs: dict[str, str] | None = None,
) -> Callable[[Method[R]], Method[R]]: ...
def step(
    function: Method[R] | None = None,
    /,
    *,
    name: str | None = None,
    retry_policy: RetryPolicy | None = None,
    depends_on: str | list[str] | None = None,
    inputs: dict[str, str] | None = None,
) -> Method[R] | Callable[[Method[R]], Method[R]]:
    """Mark an async method as a durable step: its result is recorded once and replayed.

    Args:
        function: the method (when used bare, `@step`).
        name: the step's name in the journal; the method name by default.
        retry_policy: how failed attempts are retried; no retry by default.
        depends_on: for `dag()`: steps that must finish before this one.
        inputs: for `dag()`: parameter name -> the step whose result it receives (an implied
            dependency).
    """

    def decorate(target: Method[R]) -> Method[R]:
        if not inspect.iscoroutinefunction(target):
            raise TypeError(f"@step method {target.__name__} must be async")
        dependencies = [depends_on] if isinstance(depends_on, str) else list(depends_on or [])
        for source in (inputs or {}).values():
            if source not in dependencies:
                dependencies.append(source)
        definition = StepDefinition(
            name or target.__name__,
            retry_policy or RetryPolicy.NONE,
            target,
            tuple(dependencies),
            dict(inputs or {}),
        )
        if not definition.name or any(c in definition.name for c in "#/:$"):
            raise ValueError(
                f"step names must not contain '#', '/', ':' or '$': {definition.name!r}"
            )

        @functools.wraps(target)
        async def run_step(self: Any, *args: Any, **kwargs: Any) -> R:
            context = current_context()
            if context is None:
                return await target(self, *args, **kwargs)
            result: R = await context.run_step(definition, self, args, kwargs)
            return result

        setattr(run_step, STEP_ATTR, definition)
        return run_step

    return decorate(function) if function is not None else decorate
