"""The SDK's worker against a real in-process server: replay, retries, failures, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from ergon_worker_sdk import (
    Client,
    FlowStatus,
    NonRetryableError,
    RetryPolicy,
    StepFailedError,
    dag,
    flow,
    flow_type,
    schedule_timer,
    step,
)
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.processes import eventually
from tests.support.proxy import Mode, TcpProxy
from tests.support.sdk import start

if TYPE_CHECKING:
    # Imported for type checkers only: resolving the annotation at run time fails.
    from decimal import Decimal

RUNS: dict[str, int] = {}
GATE: dict[str, asyncio.Event] = {}


def ran(name: str) -> None:
    RUNS[name] = RUNS.get(name, 0) + 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    RUNS.clear()
    GATE.clear()


@dataclass
@flow_type(type_id="Pausing")
class Pausing:
    amount: int

    @step
    async def reserve(self, amount: int) -> dict[str, int]:
        ran("reserve")
        return {"reserved": amount}

    @step
    async def wait_here(self) -> str:
        ran("wait_here")
        await GATE.setdefault("go", asyncio.Event()).wait()
        return "passed"

    @flow
    async def run(self) -> str:
        reserved = await self.reserve(self.amount)
        gate = await self.wait_here()
        return f"{reserved['reserved']}:{gate}"


async def test_a_released_flow_replays_recorded_steps_on_the_next_worker(client: Client) -> None:
    _, first = await start(client, Pausing, name="first")
    flow_id = await client.schedule(Pausing(7))
    await eventually(lambda: RUNS.get("wait_here") == 1, what="flow reached the gate")
    await first.shutdown(grace=0)  # the flow is released unfinished
    assert (await client.get(flow_id)).status is FlowStatus.PENDING
    GATE["go"].set()
    _, second = await start(client, Pausing, name="second")
    outcome = await client.wait(flow_id, timeout=10)
    await second.shutdown()
    assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, "7:passed")
    assert RUNS == {"reserve": 1, "wait_here": 2}
    history = await client.history(flow_id)
    assert [(e.key, e.result) for e in history] == [
        ("reserve#1", {"reserved": 7}),
        ("wait_here#1", "passed"),
    ]


@dataclass
@flow_type(type_id="Pausing")
class PausingChanged:
    amount: int

    @step
    async def reserve(self, amount: int) -> dict[str, int]:
        ran("reserve")
        return {"reserved": amount}

    @flow
    async def run(self) -> str:
        reserved = await self.reserve(self.amount + 1)  # new code: other arguments
        return str(reserved)


async def parked_under_new_code(
    client: Client, old: type, new: type, flow: Any, reached: str
) -> str:
    """Run `flow` on the old code until `reached` has run, hand it to the new code, and
    return its id once the new code has parked it (PENDING, HISTORY_MISMATCH)."""
    _, first = await start(client, old, name="old-code")
    flow_id = await client.schedule(flow)
    await eventually(lambda: RUNS.get(reached) == 1, what=f"the flow ran {reached}")
    await first.shutdown(grace=0)
    _, second = await start(client, new, name="new-code")

    async def parked() -> bool:
        record = await client.get(flow_id)
        return record.error is not None and record.error.reason == "HISTORY_MISMATCH"

    await eventually(parked, what="parked")
    await second.shutdown()
    assert (await client.get(flow_id)).status is FlowStatus.PENDING
    return flow_id


async def test_changed_step_arguments_park_the_flow_without_running_the_step(
    client: Client,
) -> None:
    flow_id = await parked_under_new_code(client, Pausing, PausingChanged, Pausing(1), "wait_here")
    assert RUNS["reserve"] == 1
    assert [e.key for e in await client.history(flow_id)] == ["reserve#1"]


@dataclass
@flow_type(type_id="DagPausing")
class DagPausing:
    amount: int

    @step
    async def reserve(self) -> int:
        ran("dag_reserve")
        return self.amount

    @step(inputs={"reserved": "reserve"})
    async def wait_here(self, reserved: int) -> str:
        await GATE.setdefault("go", asyncio.Event()).wait()
        return f"{reserved}:passed"

    @flow
    async def run(self) -> str:
        return str(await dag(self))


@dataclass
@flow_type(type_id="DagPausing")
class DagPausingChanged:
    amount: int

    @step
    async def base(self) -> int:
        return 1

    @step(inputs={"bonus": "base"})
    async def reserve(self, bonus: int) -> int:  # new code: other arguments
        ran("dag_reserve")
        return self.amount + bonus

    @flow
    async def run(self) -> str:
        return str(await dag(self))


async def test_a_history_mismatch_inside_a_dag_parks_the_flow_too(client: Client) -> None:
    # Not wrapped into a DagExecutionError that fails the flow: held for the old code.
    await parked_under_new_code(client, DagPausing, DagPausingChanged, DagPausing(1), "dag_reserve")
    assert RUNS["dag_reserve"] == 1


@dataclass
@flow_type
class Compensating:
    order: str

    @step
    async def charge(self) -> str:
        ran("charge")
        raise NonRetryableError("card declined")

    @step
    async def refund(self, why: str) -> str:
        return f"refunded:{why}"

    @flow
    async def run(self) -> str:
        try:
            return await self.charge()
        except StepFailedError as error:
            return await self.refund(error.message)


async def test_a_failed_step_surfaces_in_the_flow_which_can_compensate(client: Client) -> None:
    _, handle = await start(client, Compensating)
    flow_id = await client.schedule(Compensating("o"))
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.result == "refunded:card declined"
    history = await client.history(flow_id)
    assert [(e.key, e.status) for e in history] == [
        ("charge#1", "FAILED"),
        ("refund#1", "COMPLETED"),
    ]
    assert history[0].error is not None and history[0].error.type == "NonRetryableError"


@dataclass
@flow_type
class RetriedFlow:
    tag: str

    @step
    async def prepare(self) -> str:
        ran("prepare")
        return "ready"

    @step
    async def fragile(self) -> str:
        ran("fragile")
        if RUNS["fragile"] == 1:
            raise RuntimeError("first time fails")
        return "ok"

    @flow(retry_policy=RetryPolicy(max_attempts=2, initial_delay_ms=10))
    async def run(self) -> str:
        return await self.prepare() + "/" + await self.fragile()


async def test_flow_retry_replays_completed_steps_and_reruns_failed_ones(client: Client) -> None:
    _, handle = await start(client, RetriedFlow)
    flow_id = await client.schedule(RetriedFlow("t"))
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert (outcome.status, outcome.result, outcome.attempt) == (
        FlowStatus.COMPLETED,
        "ready/ok",
        2,
    )
    assert RUNS == {"prepare": 1, "fragile": 2}


@dataclass
@flow_type
class FailsForGood:
    tag: str

    @flow(
        retry_policy=RetryPolicy(
            max_attempts=3, initial_delay_ms=1, non_retryable_errors=(ValueError,)
        )
    )
    async def run(self) -> str:
        ran("run")
        raise ValueError("bad order")


async def test_non_retryable_flow_error_fails_at_once(client: Client) -> None:
    _, handle = await start(client, FailsForGood)
    outcome = await client.wait(await client.schedule(FailsForGood("x")), timeout=10)
    await handle.shutdown()
    assert outcome.status is FlowStatus.FAILED and outcome.attempt == 1
    assert outcome.error is not None and (outcome.error.type, outcome.error.message) == (
        "ValueError",
        "bad order",
    )
    assert RUNS == {"run": 1}


class CardDeclined(NonRetryableError):
    pass


@dataclass
@flow_type
class DeclinedStep:
    tag: str

    @step
    async def charge(self) -> str:
        ran("charge")
        raise CardDeclined("card declined")

    @step(
        retry_policy=RetryPolicy(
            max_attempts=2, initial_delay_ms=1, non_retryable_errors=("KeyError",)
        )
    )
    async def look_up(self) -> str:
        ran("look_up")
        raise KeyError("no such customer")

    @flow(retry_policy=RetryPolicy(max_attempts=4, initial_delay_ms=1))
    async def run(self) -> str:
        if self.tag == "charge":
            return await self.charge()
        return await self.look_up()


@pytest.mark.parametrize("tag", ["charge", "look_up"])
async def test_a_steps_non_retryable_error_is_not_retried_by_the_flows_policy(
    client: Client, tag: str
) -> None:
    _, handle = await start(client, DeclinedStep)
    outcome = await client.wait(await client.schedule(DeclinedStep(tag)), timeout=10)
    await handle.shutdown()
    assert (outcome.status, outcome.attempt) == (FlowStatus.FAILED, 1)
    assert dict(RUNS) == {tag: 1}


@dataclass
@flow_type
class Parallel:
    n: int

    @step
    async def square(self, x: int) -> int:
        await asyncio.sleep(0.001 * (5 - x))
        return x * x

    @flow
    async def run(self) -> list[int]:
        return list(await asyncio.gather(*(self.square(i) for i in range(self.n))))


async def test_gathered_steps_get_deterministic_keys(client: Client) -> None:
    _, handle = await start(client, Parallel)
    flow_id = await client.schedule(Parallel(4))
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.result == [0, 1, 4, 9]
    history = {e.key: e.result for e in await client.history(flow_id)}
    assert history == {"square#1": 0, "square#2": 1, "square#3": 4, "square#4": 9}


async def test_cancelling_a_running_flow_stops_it_on_the_worker(client: Client) -> None:
    worker, handle = await start(client, Pausing, Parallel)
    flow_id = await client.schedule(Pausing(3))
    await eventually(lambda: RUNS.get("wait_here") == 1, what="flow reached the gate")
    requested = await client.cancel(flow_id, reason="customer asked")
    assert requested.status is FlowStatus.RUNNING  # it stops at its next step boundary
    GATE["go"].set()
    cancelled = await client.wait(flow_id, timeout=10)
    assert cancelled.status is FlowStatus.CANCELLED
    await eventually(lambda: worker.running == 0, what="worker dropped the flow")
    # The worker carries on with other work.
    outcome = await client.wait(await client.schedule(Parallel(2)), timeout=10)
    await handle.shutdown()
    assert outcome.status is FlowStatus.COMPLETED
    assert (await client.get(flow_id)).status is FlowStatus.CANCELLED


async def test_a_cancel_read_before_the_flows_task_starts_still_stops_it(client: Client) -> None:
    """An assignment and a cancel in one stream message: the cancel is handled before the
    flow's task has run at all, and must still stop it at its first step."""
    from ergon_worker_sdk.proto.ergon.v1 import worker_pb2, worker_pb2_grpc

    _, registers = await start(client, Pausing, name="registers-the-type")
    await registers.shutdown()
    flow_id = await client.schedule(Pausing(3))
    # Leased through a poll, so the test hands the assignment to the worker itself.
    polled = await worker_pb2_grpc.WorkerServiceStub(client.channel).PollTask(
        worker_pb2.PollTaskRequest(
            worker_id="hand", flow_types=["Pausing"], protocol_version=1, timeout_ms=5_000
        )
    )
    assignment = polled.assignment
    assert assignment.flow_id == flow_id
    await client.cancel(flow_id, reason="changed our mind")
    worker, handle = await start(client, Pausing)
    try:
        worker.on_assignment(assignment)
        worker.on_cancel_requested(
            worker_pb2.CancelRequested(
                flow_id=flow_id, lease_token=assignment.lease_token, reason="changed our mind"
            )
        )
        cancelled = await client.wait(flow_id, timeout=10)
        assert cancelled.status is FlowStatus.CANCELLED
        assert "reserve" not in RUNS
    finally:
        await handle.shutdown()


async def test_start_at_delays_the_flow(client: Client) -> None:
    import datetime

    _, handle = await start(client, Parallel)
    start_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(milliseconds=600)
    flow_id = await client.schedule(Parallel(1), start_at=start_at)
    outcome = await client.wait(flow_id, timeout=10)
    await handle.shutdown()
    assert outcome.completed_at is not None and outcome.completed_at >= start_at


@dataclass
@flow_type
class BigResult:
    step_size: int
    flow_size: int

    @step
    async def make(self) -> str:
        ran("make")
        return "x" * self.step_size

    @flow
    async def run(self) -> str:
        made = await self.make()
        return made[:1] * self.flow_size


@pytest.mark.parametrize(
    ("step_size", "flow_size"),
    [(5_000, 5_000), (5_000, 1), (1, 5_000)],
    ids=["both-results", "step-result", "flow-result"],
)
async def test_a_result_over_the_servers_payload_limit_fails_the_flow(
    step_size: int, flow_size: int
) -> None:
    """The worker allows more than the server takes: the refusal fails the flow, once, with its
    reason, instead of leaving it held (and renewed) forever, running it again and again, or
    completing it without the step's result."""
    async with (
        ErgonTestServer(max_payload_bytes=1_000) as server,
        server.client() as client,
        Client(server.address, max_payload_bytes=1 << 20) as worker_client,
    ):
        _, handle = await start(worker_client, BigResult)
        flow_id = await client.schedule(BigResult(step_size, flow_size))
        outcome = await client.wait(flow_id, timeout=20)
        history = await client.history(flow_id)
        await handle.shutdown()
    assert outcome.status is FlowStatus.FAILED and outcome.error is not None
    assert outcome.error.reason == "PAYLOAD_TOO_LARGE", outcome.error
    assert RUNS == {"make": 1}
    assert [e.key for e in history] == ([] if step_size > 1_000 else ["make#1"])


@dataclass
@flow_type(type_id="Brief")
class Brief:
    n: int

    @step
    async def work(self) -> int:
        await asyncio.sleep(0.005)
        return self.n

    @flow
    async def run(self) -> int:
        return await self.work()


@pytest.mark.parametrize("db", [None, "memory://"], ids=["sqlite", "memory"])
async def test_workers_shutting_down_under_load_leave_no_flow_leased(db: str | None) -> None:
    # A lease outlives a minute here: a flow a shutdown left leased would stay RUNNING.
    async with ErgonTestServer(db=db, lease_ttl_ms=60_000) as server, server.client() as client:

        async def leased() -> list[str]:
            return [f.flow_id async for f in client.list_flows(status=FlowStatus.RUNNING)]

        ids: list[str] = []
        for cycle in range(8):
            # Flows keep ending and being dispatched while each worker stops taking them.
            _, handle = await start(client, Brief, name=f"w{cycle}", capacity=8)
            if not ids:  # the server takes a flow type once a worker has registered it
                ids = await client.schedule_many([Brief(n) for n in range(600)])
            await asyncio.sleep(0.1)
            await handle.shutdown()
            await eventually(
                lambda: _none(leased()), within=3, what=f"no flow leased after shutdown {cycle}"
            )
        _, handle = await start(client, Brief, name="last", capacity=50)
        outcomes = await asyncio.gather(*(client.wait(f, timeout=60) for f in ids))
        assert [o.result for o in outcomes] == list(range(600))
        await handle.shutdown()


async def _none(items: Awaitable[list[str]]) -> bool:
    return not await items


@pytest.mark.parametrize("running", [0, 4])
async def test_a_worker_shuts_down_at_once_when_its_server_is_gone(running: int) -> None:
    server = ErgonTestServer(db="memory://")
    await server.start()
    async with server.client() as client:
        _, handle = await start(client, Brief, Pausing, name="orphan")
        for amount in range(running):
            await client.schedule(Pausing(amount))
        await eventually(lambda: RUNS.get("wait_here", 0) == running, what="flows at the gate")
        await server.shutdown()
        # Nobody is left to take capacity 0 in, nor the flows given back: the worker must
        # not wait for answers (once 5 s per flow running).
        await asyncio.wait_for(handle.shutdown(grace=0), timeout=1.5)


async def test_a_worker_that_reconnects_while_stopping_still_delivers_its_flows() -> None:
    async with ErgonTestServer() as server:
        with TcpProxy(server.address) as proxy:
            async with Client(proxy.address) as client:
                _, handle = await start(client, Pausing, name="stopping")
                flow_id = await client.schedule(Pausing(5))
                await eventually(lambda: RUNS.get("wait_here") == 1, what="the flow runs")
                stopping = asyncio.create_task(handle.shutdown(grace=30))
                await asyncio.sleep(0.3)  # capacity 0 is taken in
                # The connection drops mid-grace: the worker comes back with capacity 0 and
                # the lease it holds, and the flow's end still reaches the server.
                proxy.set_mode(Mode.DROP)
                await asyncio.sleep(0.2)
                proxy.set_mode(Mode.PASS)
                await eventually(lambda: proxy.accepted >= 2, what="the worker reconnected")
                GATE.setdefault("go", asyncio.Event()).set()
                await asyncio.wait_for(stopping, timeout=20)
                outcome = await client.wait(flow_id, timeout=10)
                assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, "5:passed")
                assert RUNS["wait_here"] == 1


@dataclass
@flow_type
class UnresolvableInput:
    amount: Decimal

    @flow
    async def run(self) -> str:
        ran("run")
        return "never"


async def test_a_flow_the_worker_cannot_even_start_is_parked_not_given_back_in_a_loop(
    client: Client,
) -> None:
    _, handle = await start(client, UnresolvableInput)
    try:
        flow_id = await client.schedule_type("UnresolvableInput", {"amount": 3})

        async def parked() -> bool:
            record = await client.get(flow_id)
            return record.error is not None and record.error.reason == "WORKER_ERROR"

        await eventually(parked, within=10, what="the flow parked with the worker's error")
        record = await client.get(flow_id)
        assert record.status is FlowStatus.PENDING
        assert record.error is not None and record.error.type == "NameError"
        assert "run" not in RUNS
    finally:
        await handle.shutdown()


@dataclass
@flow_type
class RefusedResultThenError:
    size: int

    @step
    async def produce(self) -> str:
        ran("produce")
        return "r" * self.size

    @flow
    async def run(self) -> str:
        await self.produce()
        raise ValueError("the flow fails after its step")


async def test_a_refused_step_result_fails_the_flow_instead_of_rerunning_it() -> None:
    # The worker's payload limit is above the server's: the server refuses the step's result.
    async with (
        ErgonTestServer(max_payload_bytes=1_000) as server,
        server.client() as client,
    ):
        _, handle = await start(client, RefusedResultThenError)
        try:
            outcome = await client.wait(
                await client.schedule(RefusedResultThenError(5_000)), timeout=10
            )
        finally:
            await handle.shutdown()
    assert outcome.status is FlowStatus.FAILED
    assert outcome.error is not None and outcome.error.type == "PayloadTooLargeError"
    assert dict(RUNS) == {"produce": 1}


@dataclass
@flow_type
class GatherOneFails:
    tag: str

    @step
    async def boom(self) -> None:
        raise RuntimeError("boom")

    @step
    async def charge(self) -> str:
        ran("charge started")
        await asyncio.sleep(0.3)
        ran("charge finished")
        return "charged"

    @flow(retry_policy=RetryPolicy(max_attempts=2, initial_delay_ms=1))
    async def run(self) -> None:
        await asyncio.gather(self.boom(), self.charge())


async def test_a_flows_end_stops_the_step_bodies_it_left_running(client: Client) -> None:
    """gather() raises the first failure and leaves its other steps running: the flow's end
    (and its retry) must not have an old attempt's step body running beside it."""
    _, handle = await start(client, GatherOneFails)
    try:
        outcome = await client.wait(await client.schedule(GatherOneFails("x")), timeout=10)
        assert (outcome.status, outcome.attempt) == (FlowStatus.FAILED, 2)
        # Longer than a charge takes: a body left running would have finished by now.
        await asyncio.sleep(0.6)
    finally:
        await handle.shutdown()
    assert dict(RUNS) == {"charge started": 2}


@dataclass
@flow_type
class CatchesARefusal:
    size: int

    @step
    async def charge(self) -> str:
        ran("charge")
        return "r" * self.size

    @step
    async def notify(self) -> None:
        ran("notify")

    @flow
    async def run(self) -> str:
        await self.charge()
        try:
            await self.notify()  # where the refusal of charge's result surfaces
        except Exception:
            ran("caught")
        return "done"


async def test_a_flow_that_catches_a_refused_step_result_still_does_not_complete() -> None:
    async with (
        ErgonTestServer(max_payload_bytes=1_000) as server,
        server.client() as client,
    ):
        _, handle = await start(client, CatchesARefusal)
        try:
            flow_id = await client.schedule(CatchesARefusal(5_000))
            outcome = await client.wait(flow_id, timeout=10)
            history = await client.history(flow_id)
        finally:
            await handle.shutdown()
    assert outcome.status is FlowStatus.FAILED
    assert outcome.error is not None and outcome.error.type == "PayloadTooLargeError"
    assert history == []
    assert dict(RUNS) == {"charge": 1, "caught": 1}


@dataclass
@flow_type
class Branches:
    tag: str

    @step
    async def fetch(self, name: str, pause: float) -> str:
        await asyncio.sleep(pause)
        return f"{name}-data"

    @step
    async def process(self, data: str) -> str:
        return data.upper()

    async def branch(self, name: str, pause: float) -> str:
        return await self.process(await self.fetch(name, pause))

    @flow
    async def run(self) -> list[str]:
        # "a" fetches slowly: "b" processes first on the first run, but not on the replay after
        # the timer (recorded steps return at once there).
        results = await asyncio.gather(self.branch("a", 0.2), self.branch("b", 0.0))
        await schedule_timer(0.2)
        return list(results)


async def test_steps_in_parallel_branches_keep_their_keys_however_the_branches_interleave(
    client: Client,
) -> None:
    _, handle = await start(client, Branches)
    try:
        flow_id = await client.schedule(Branches("x"))
        outcome = await client.wait(flow_id, timeout=10)
        history = {e.key: e.result for e in await client.history(flow_id)}
    finally:
        await handle.shutdown()
    assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, ["A-DATA", "B-DATA"])
    assert history == {
        "fetch#1": "a-data",
        "fetch#2": "b-data",
        "fetch#2>process#1": "B-DATA",
        "fetch#1>process#1": "A-DATA",
        "timer#1": None,
    }


@dataclass
@flow_type
class Doubler:
    n: int

    @flow
    async def run(self) -> int:
        return self.n * 10


@dataclass
@flow_type
class ChildInAStep:
    tag: str

    @step
    async def via_step(self) -> int:
        return int(await self.invoke(Doubler(1)).result())

    @flow
    async def run(self) -> list[int]:
        first = await self.via_step()
        await schedule_timer(0.2)  # replayed after: the step's child must not take a key here
        second = await self.invoke(Doubler(2)).result()
        return [first, second]


async def test_a_child_flow_invoked_in_a_step_is_keyed_under_the_step(client: Client) -> None:
    _, handle = await start(client, ChildInAStep, Doubler)
    try:
        flow_id = await client.schedule(ChildInAStep("x"))
        outcome = await client.wait(flow_id, timeout=10)
        keys = [e.key for e in await client.history(flow_id)]
    finally:
        await handle.shutdown()
    assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, [10, 20])
    assert keys == ["via_step#1/child:Doubler#1", "via_step#1", "timer#1", "child:Doubler#1"]
