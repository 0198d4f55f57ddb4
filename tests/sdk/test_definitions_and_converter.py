"""Decorators validate eagerly; the JSON converter round-trips what flows use."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import pytest

from ergon_worker_sdk import (
    JsonConverter,
    NonRetryableError,
    PickleConverter,
    RetryPolicy,
    flow,
    flow_type,
    step,
)
from ergon_worker_sdk._definitions import flow_type_definition
from ergon_worker_sdk.errors import ConverterError
from ergon_worker_sdk.proto.ergon.v1 import common_pb2


class Color(enum.Enum):
    RED = "red"


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    lines: list[Line]
    tags: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    color: Color = Color.RED
    pair: tuple[int, str] = (1, "a")


def test_json_round_trip_shapes_values_by_hint() -> None:
    converter = JsonConverter()
    order = Order([Line("a", 2)], {"x": 1}, None, Color.RED, (3, "b"))
    payload = converter.to_payload(order)
    assert payload.encoding == "json/plain"
    assert converter.from_payload(payload, Order) == order
    assert converter.from_payload(payload) == {
        "lines": [{"sku": "a", "qty": 2}],
        "tags": {"x": 1},
        "note": None,
        "color": "red",
        "pair": [3, "b"],
    }
    assert converter.from_payload(converter.to_payload(None)) is None
    assert converter.from_payload(converter.to_payload(b"\x00raw")) == b"\x00raw"
    assert converter.from_payload(converter.to_payload([1.5, "x"]), list[float]) == [1.5, "x"]


def test_json_refuses_what_it_cannot_carry() -> None:
    converter = JsonConverter()
    with pytest.raises(ConverterError):
        converter.to_payload(object())
    with pytest.raises(ConverterError):
        converter.to_payload({1: "non-string key"})
    with pytest.raises(ConverterError):
        converter.to_payload(float("nan"))
    with pytest.raises(ConverterError):
        converter.from_payload(common_pb2.Payload(encoding="json/plain", data=b"{nope"))
    with pytest.raises(ConverterError):
        converter.from_payload(common_pb2.Payload(encoding="python/pickle", data=b"x"))


def test_inline_json_numbers_come_back_as_ints_when_hinted() -> None:
    payload = common_pb2.Payload()
    payload.json.struct_value.update({"sku": "a", "qty": 2})
    assert JsonConverter().from_payload(payload, Line) == Line("a", 2)


def test_pickle_is_opt_in() -> None:
    converter = PickleConverter()
    payload = converter.to_payload({1, 2})
    assert payload.encoding == "python/pickle"
    assert converter.from_payload(payload) == {1, 2}


def test_retry_policy() -> None:
    policy = RetryPolicy(
        max_attempts=3,
        initial_delay_ms=100,
        max_delay_ms=250,
        backoff_multiplier=2.0,
        non_retryable_errors=(KeyError, "ValueError"),
    )
    assert policy.should_retry(RuntimeError(), 1) and policy.should_retry(RuntimeError(), 2)
    assert not policy.should_retry(RuntimeError(), 3)
    assert not policy.should_retry(KeyError(), 1)
    assert not policy.should_retry(ValueError(), 1)
    assert not policy.should_retry(NonRetryableError(), 1)
    assert 100 <= policy.delay_ms(1) <= 110
    # Jitter never takes a delay over its cap.
    assert all(policy.delay_ms(5) == 250 for _ in range(50))
    # A policy retrying for ever: past float range, delays stay at the cap (a day without one).
    assert policy.delay_ms(5_000) == 250
    assert RetryPolicy(max_delay_ms=0).delay_ms(5_000) == 24 * 3600 * 1000
    assert RetryPolicy(backoff_multiplier=2, max_delay_ms=250).delay_ms(5_000) == 250
    assert RetryPolicy.STANDARD.max_attempts == 3 and RetryPolicy.AGGRESSIVE.max_attempts == 10
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(backoff_multiplier=0.5)


def test_decorators_validate_eagerly() -> None:
    with pytest.raises(TypeError, match="exactly one @flow"):

        @flow_type
        class NoEntry:
            pass

    with pytest.raises(TypeError, match="must be async"):

        class Sync:
            @step
            def sync_step(self) -> None:  # type: ignore[arg-type]
                pass

    @flow_type(type_id="custom-name")
    class NotADataclass:
        @flow
        async def run(self) -> None:
            pass

    with pytest.raises(TypeError, match="must be a @dataclass"):
        flow_type_definition(NotADataclass)

    @dataclass
    @flow_type(type_id="orders.v2")
    class Named:
        x: int

        @step(name="charge", retry_policy=RetryPolicy.STANDARD)
        async def pay(self) -> int:
            return self.x

        @flow
        async def run(self) -> int:
            return await self.pay()

    definition = flow_type_definition(Named)
    assert definition.type_id == "orders.v2"
    assert definition.method_name == "run"
    assert definition.steps["charge"].retry_policy is RetryPolicy.STANDARD
    assert definition.steps["charge"].return_hint is int


async def test_steps_outside_a_flow_just_run() -> None:
    @dataclass
    @flow_type
    class Plain:
        x: int

        @step
        async def double(self) -> int:
            return self.x * 2

        @flow
        async def run(self) -> int:
            return await self.double()

    assert await Plain(4).run() == 8
