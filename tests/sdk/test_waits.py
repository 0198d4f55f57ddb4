"""Durable waits through the SDK against a real in-process server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from ergon_worker_sdk import (
    ChildFlowError,
    Client,
    FlowCancelledError,
    FlowClosedError,
    FlowNotFoundError,
    FlowStatus,
    RetryPolicy,
    await_external_signal,
    dag,
    flow,
    flow_type,
    invoke,
    schedule_timer,
    schedule_timer_named,
    step,
)
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, scheduler_pb2, signal_pb2, signal_pb2_grpc
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.processes import eventually
from tests.support.sdk import start

RUNS: dict[str, int] = {}
WAITED: list[float] = []
GATE: dict[str, asyncio.Event] = {}


def ran(name: str) -> None:
    RUNS[name] = RUNS.get(name, 0) + 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    RUNS.clear()
    WAITED.clear()
    GATE.clear()


@pytest.fixture(params=["sqlite", "memory"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ErgonTestServer]:
    db = "memory://" if request.param == "memory" else None  # None: SQLite in a temp folder
    async with ErgonTestServer(db=db, park_initial_delay_ms=50, park_max_delay_ms=200) as server:
        yield server


@pytest.fixture
async def client(server: ErgonTestServer) -> AsyncIterator[Client]:
    async with server.client() as client:
        yield client


@dataclass
@flow_type
class Nap:
    seconds: float

    @step
    async def before(self) -> str:
        ran("before")
        return "b"

    @flow
    async def run(self) -> str:
        await self.before()
        await schedule_timer_named(self.seconds, "nap")
        return "rested"


async def test_a_flow_sleeping_on_a_timer_holds_no_slot(client: Client) -> None:
    worker, handle = await start(client, Nap)
    flow_id = await client.schedule(Nap(0.6))
    await eventually(lambda: _status(client, flow_id, FlowStatus.WAITING), what="flow waiting")
    assert worker.running == 0
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.result == "rested"
    history = await client.history(flow_id)
    assert [(e.key, e.kind) for e in history] == [("before#1", "STEP"), ("timer:nap#1", "TIMER")]
    assert RUNS == {"before": 1}  # replayed, not re-run, after the timer


async def _status(client: Client, flow_id: str, status: FlowStatus) -> bool:
    return (await client.get(flow_id)).status is status


@dataclass
@flow_type
class FraudCheck:
    order_id: str

    @step(retry_policy=RetryPolicy(max_attempts=2, initial_delay_ms=1))
    async def wait_for_fraud_check(self) -> str:
        ran("check")
        started = time.monotonic()
        await schedule_timer_named(0.5, f"fraud-{self.order_id}")
        WAITED.append(time.monotonic() - started)
        if RUNS["check"] == 1:
            raise ConnectionError("fraud service hiccup")
        return "clear"

    @flow
    async def process(self) -> str:
        return await self.wait_for_fraud_check()


async def test_a_timer_inside_a_step_is_not_waited_again_by_its_retry(client: Client) -> None:
    _, handle = await start(client, FraudCheck)
    outcome = await client.wait(await client.schedule(FraudCheck("o1")), timeout=10)
    await handle.shutdown()
    assert outcome.result == "clear"
    assert RUNS == {"check": 2}
    assert WAITED[0] >= 0.45 and WAITED[1] < WAITED[0] / 2, WAITED


@dataclass
class Decision:
    by: str
    approved: bool


@dataclass
@flow_type
class Approval:
    request: str

    @step
    async def pay(self, by: str) -> str:
        # Held until the test has sent its extra signal, which must find the flow still open.
        await GATE.setdefault("pay", asyncio.Event()).wait()
        return f"paid, approved by {by}"

    @flow
    async def run(self) -> str:
        first = await await_external_signal("approved", Decision)
        second = await await_external_signal("approved", Decision)
        return await self.pay(f"{first.by}+{second.by}")


async def test_signals_are_buffered_and_consumed_in_order_each_once(client: Client) -> None:
    await start(client, Approval)  # registers the type; flows wait for signals
    flow_id = await client.schedule(Approval("r1"), flow_id="approval-1")
    await client.signal(flow_id, "approved", Decision("ann", True))
    await eventually(lambda: _status(client, flow_id, FlowStatus.WAITING), what="waits for 2nd")
    await client.signal(flow_id, "approved", {"by": "bob", "approved": True})
    await client.signal(flow_id, "approved", {"by": "extra", "approved": True})
    GATE.setdefault("pay", asyncio.Event()).set()
    outcome = await client.wait(flow_id, timeout=10)
    assert outcome.result == "paid, approved by ann+bob"
    history = await client.history(flow_id)
    assert [(e.key, e.result) for e in history[:2]] == [
        ("signal:approved#1", {"by": "ann", "approved": True}),
        ("signal:approved#2", {"by": "bob", "approved": True}),
    ]
    with pytest.raises(FlowClosedError):
        await client.signal(flow_id, "approved", {})
    with pytest.raises(FlowNotFoundError):
        await client.signal("no-such-flow", "approved", {})


async def test_signal_with_schedule_starts_the_flow_and_delivers(
    server: ErgonTestServer, client: Client
) -> None:
    GATE.setdefault("pay", asyncio.Event()).set()
    await start(client, Approval)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = signal_pb2_grpc.SignalServiceStub(channel)
        request = signal_pb2.SignalWithScheduleRequest(
            schedule=scheduler_pb2.ScheduleFlowRequest(
                flow_id="sws-1",
                flow_type="Approval",
                input=common_pb2.Payload(encoding="json/plain", data=b'{"request":"x"}'),
            ),
            name="approved",
            payload=common_pb2.Payload(encoding="json/plain", data=b'{"by":"cy","approved":true}'),
        )
        first = await stub.SignalWithSchedule(request)
        again = await stub.SignalWithSchedule(request)
    assert (first.flow_id, first.existing, again.existing) == ("sws-1", False, True)
    assert (first.sequence, again.sequence) == (1, 2)
    outcome = await client.wait("sws-1", timeout=10)
    assert outcome.result == "paid, approved by cy+cy"


@dataclass
@flow_type
class Pack:
    item: str

    @step
    async def pack(self) -> str:
        if self.item == "broken":
            raise ValueError("cannot pack a broken item")
        return f"packed:{self.item}"

    @flow
    async def run(self) -> str:
        return await self.pack()


@dataclass
@flow_type
class Order:
    items: list[str]

    @step
    async def summarize(self, packed: list[str]) -> str:
        return ",".join(packed)

    @flow
    async def run(self) -> str:
        children = [self.invoke(Pack(item)) for item in self.items]  # type: ignore[attr-defined]
        try:
            packed = await asyncio.gather(*(c.result() for c in children))
        except ChildFlowError as error:
            return f"failed: {error.type_name}: {error.message}"
        return await self.summarize(list(packed))


async def test_children_in_parallel_and_a_child_failure_the_parent_can_catch(
    client: Client,
) -> None:
    worker, handle = await start(client, Order, Pack, capacity=2)
    good = await client.schedule(Order(["a", "b", "c"]))
    bad = await client.schedule(Order(["a", "broken"]))
    good_outcome = await client.wait(good, timeout=10)
    bad_outcome = await client.wait(bad, timeout=10)
    await handle.shutdown()
    assert good_outcome.result == "packed:a,packed:b,packed:c"
    assert (
        bad_outcome.result
        == "failed: ValueError: step pack#1 failed: ValueError: cannot pack a broken item"
        or bad_outcome.result.startswith("failed: ValueError")
    )
    child = await client.get(f"{good}/child:Pack#2")
    assert child.status is FlowStatus.COMPLETED and child.result == "packed:b"
    history = await client.history(good)
    assert [e.key for e in history][:3] == [
        "child:Pack#1",
        "child:Pack#2",
        "child:Pack#3",
    ] or sorted(e.key for e in history) == [
        "child:Pack#1",
        "child:Pack#2",
        "child:Pack#3",
        "summarize#1",
    ]
    assert worker.max_running <= 2


@dataclass
@flow_type
class Report:
    user: str

    @step
    async def fetch_user(self) -> dict[str, str]:
        return {"name": self.user}

    @step
    async def fetch_orders(self) -> list[int]:
        return [3, 4]

    @step(inputs={"user": "fetch_user", "orders": "fetch_orders"})
    async def build(self, user: dict[str, str], orders: list[int]) -> str:
        return f"{user['name']}:{sum(orders)}"

    @flow
    async def run(self) -> str:
        result: str = await dag(self, final_step="build")
        return result


async def test_dag_runs_independent_steps_then_their_dependants(client: Client) -> None:
    _, handle = await start(client, Report)
    outcome = await client.wait(await client.schedule(Report("ann")), timeout=10)
    await handle.shutdown()
    assert outcome.result == "ann:7"


@dataclass
@flow_type
class Cancellable:
    name: str

    @step
    async def work(self) -> str:
        ran("work")
        await GATE.setdefault("go", asyncio.Event()).wait()
        return "worked"

    @step
    async def more(self) -> str:
        ran("more")
        return "more"

    @step
    async def clean_up(self) -> str:
        ran("clean_up")
        return "cleaned"

    @flow
    async def run(self) -> str:
        try:
            await self.work()
            await self.more()
        except FlowCancelledError:
            return await self.clean_up()
        return "done"


async def test_cancel_a_running_flow_stops_it_at_the_next_step_with_clean_up(
    client: Client,
) -> None:
    _, handle = await start(client, Cancellable)
    flow_id = await client.schedule(Cancellable("c"))
    await eventually(lambda: RUNS.get("work") == 1, what="the step runs")
    requested = await client.cancel(flow_id, reason="customer changed mind")
    assert requested.status is FlowStatus.RUNNING
    GATE["go"].set()
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.status is FlowStatus.CANCELLED
    assert RUNS == {"work": 1, "clean_up": 1}
    history = await client.history(flow_id)
    assert [e.key for e in history] == ["work#1", "$cancel", "clean_up#1"] or [
        e.key for e in history
    ] == ["$cancel", "work#1", "clean_up#1"]
    assert any(e.kind == "CANCEL" for e in history)


async def test_cancel_a_waiting_flow_at_once(client: Client) -> None:
    _, handle = await start(client, Approval)
    flow_id = await client.schedule(Approval("r"))
    await eventually(lambda: _status(client, flow_id, FlowStatus.WAITING), what="flow waiting")
    cancelled = await client.cancel(flow_id, reason="no longer needed")
    await handle.shutdown()
    assert cancelled.status is FlowStatus.CANCELLED
    assert cancelled.error is not None and "no longer needed" in cancelled.error.message
    history = await client.history(flow_id)
    assert [(e.key, e.kind) for e in history] == [("$cancel", "CANCEL")]
    # Cancelling again (a retry whose answer was lost) changes nothing and is no error.
    again = await client.cancel(flow_id, reason="twice")
    assert again.status is FlowStatus.CANCELLED and "no longer needed" in again.error.message
    assert len(await client.history(flow_id)) == 1


@dataclass
@flow_type(type_id="Reservation")
class ReservationV1:
    qty: int

    @step
    async def reserve(self, qty: int) -> int:
        ran("reserve-v1")
        return qty

    @flow
    async def run(self) -> str:
        reserved = await self.reserve(self.qty)
        decision = await await_external_signal("go")
        return f"reserved {reserved}, {decision}"


@dataclass
@flow_type(type_id="Reservation")
class ReservationV2:
    qty: int

    @step
    async def reserve(self, qty: int) -> int:
        ran("reserve-v2")
        return qty

    @flow
    async def run(self) -> str:
        reserved = await self.reserve(self.qty * 10)  # changed: other arguments than recorded
        return f"reserved {reserved}"


async def test_changed_code_parks_the_flow_until_the_old_code_returns(client: Client) -> None:
    _, old = await start(client, ReservationV1, name="v1")
    flow_id = await client.schedule(ReservationV1(2))
    await eventually(lambda: _status(client, flow_id, FlowStatus.WAITING), what="waits for go")
    await old.shutdown()
    _, new = await start(client, ReservationV2, name="v2")
    await client.signal(flow_id, "go", "go!")

    async def parked() -> bool:
        flow = await client.get(flow_id)
        return flow.error is not None and flow.error.reason == "HISTORY_MISMATCH"

    await eventually(parked, what="parked with HISTORY_MISMATCH")
    await asyncio.sleep(0.5)  # retried with backoff, still mismatching
    parked_flow = await client.get(flow_id)
    assert parked_flow.status in (FlowStatus.PENDING, FlowStatus.RUNNING)
    await new.shutdown()
    _, fixed = await start(client, ReservationV1, name="v1-again")
    outcome = await client.wait(flow_id, timeout=10)
    await fixed.shutdown()
    assert (outcome.status, outcome.result, outcome.error) == (
        FlowStatus.COMPLETED,
        "reserved 2, go!",
        None,
    )
    assert RUNS.get("reserve-v1") == 1 and "reserve-v2" not in RUNS


@dataclass
@flow_type
class Mixed:
    n: int

    @step
    async def square(self, x: int) -> int:
        return x * x

    @flow
    async def run(self) -> list[int]:
        values = await asyncio.gather(
            self.square(self.n),
            invoke(Pack(str(self.n))).result(),
            schedule_timer(0.05),
            self.square(self.n + 1),
        )
        return [values[0], values[3]]


async def test_gather_over_steps_children_and_timers_replays_deterministically(
    client: Client,
) -> None:
    _, handle = await start(client, Mixed, Pack)
    flow_id = await client.schedule(Mixed(3))
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.result == [9, 16]
    keys = sorted(e.key for e in await client.history(flow_id))
    assert keys == ["child:Pack#1", "square#1", "square#2", "timer#1"]


@dataclass
@flow_type
class Race:
    """A signal raced against a timer; the loser is given up, then the flow waits again."""

    timer_s: float

    @flow
    async def run(self) -> str:
        ran("run")
        signal = asyncio.ensure_future(await_external_signal("first"))
        timer = asyncio.ensure_future(schedule_timer(self.timer_s))
        done, pending = await asyncio.wait({signal, timer}, return_when=asyncio.FIRST_COMPLETED)
        for loser in pending:
            loser.cancel()
        winner = "signal" if signal in done else "timer"
        second = await await_external_signal("second")
        return f"{winner}:{second}"


async def test_a_given_up_wait_does_not_wake_the_suspended_flow(client: Client) -> None:
    _, handle = await start(client, Race)
    flow_id = await client.schedule(Race(0.5))
    await client.signal(flow_id, "first", "a")
    await eventually(lambda: _status(client, flow_id, FlowStatus.WAITING), what="waits again")
    runs = RUNS["run"]
    # The lost timer's time passes: named as given up in the suspend, it was cancelled, so it
    # does not wake (and replay) the sleeping flow.
    await asyncio.sleep(1.0)
    assert RUNS["run"] == runs and await _status(client, flow_id, FlowStatus.WAITING)
    await client.signal(flow_id, "second", "b")
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.result == "signal:b"
