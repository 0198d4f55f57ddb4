"""The durable core end to end: real server process, real worker processes, real SIGKILLs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ergon_worker_sdk import Client, FlowStatus
from tests.support.processes import ServerProcess, WorkerProcess, eventually, read_events, step_runs
from tests.support.worker_app import FiveSteps, Flaky, ThreeSteps


async def test_step_failing_twice_then_succeeding_records_three_attempts_and_one_result(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    start_worker("w1")
    async with Client(server_process.address) as client:
        flow_id = await client.schedule(Flaky(fail_times=2))
        outcome = await client.wait(flow_id, timeout=30)
        history = await client.history(flow_id)
    assert outcome.status is FlowStatus.COMPLETED
    assert outcome.result == "charged"
    assert [(e.key, e.status, e.attempts, e.result) for e in history] == [
        ("charge#1", "COMPLETED", 3, "charged")
    ]
    starts = [e for e in read_events(events) if e[0] == "step-start" and e[1] == flow_id]
    assert len(starts) == 3
    assert step_runs(events)[(flow_id, "charge")] == 1


async def test_run_answers_with_the_outcome_and_a_repeat_waits_for_the_same_flow(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    start_worker("w1", step_delay=0.1)
    async with Client(server_process.address) as client:
        with pytest.raises(TimeoutError):
            await client.run(ThreeSteps(4), flow_id="run-4", timeout=0.05)
        outcome = await client.run(ThreeSteps(4), flow_id="run-4", timeout=30)
        again = await client.run(ThreeSteps(4), flow_id="run-4")
    assert (outcome.flow_id, outcome.status, outcome.result) == ("run-4", FlowStatus.COMPLETED, 9)
    assert again == outcome
    runs = step_runs(events)
    assert [runs[("run-4", step)] for step in ("one", "two", "three")] == [1, 1, 1]


async def test_worker_killed_mid_flow_another_worker_finishes_without_rerunning_steps(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    first = start_worker("first", capacity=1, step_delay=0.4)
    async with Client(server_process.address) as client:
        flow_id = await client.schedule(FiveSteps(label="order"))

        async def recorded() -> list[str]:
            return [e.key for e in await client.history(flow_id)]

        await eventually(lambda: _at_least(recorded(), 2), what="two steps recorded")
        first.kill()
        recorded_before_kill = await recorded()
        assert 2 <= len(recorded_before_kill) < 5
        start_worker("second", capacity=1)
        outcome = await client.wait(flow_id, timeout=60)
        history = await client.history(flow_id)
    assert outcome.status is FlowStatus.COMPLETED
    assert outcome.result == "order:15"
    assert [e.key for e in history] == [f"s{n}#1" for n in range(1, 6)]
    runs = step_runs(events)
    for key in recorded_before_kill:
        step = key.split("#")[0]
        assert runs[(flow_id, step)] == 1, f"{step} ran again after it was recorded"
    workers_done = {e[3] for e in read_events(events) if e[0] == "step-done"}
    assert workers_done == {"first", "second"}


async def _at_least(values: object, n: int) -> bool:
    return len(await values) >= n  # type: ignore[misc,arg-type]


async def test_server_killed_with_200_flows_in_flight_all_complete_once(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    for name in ("w1", "w2"):
        start_worker(name, capacity=20, step_delay=0.05)
    async with Client(server_process.address, retry_timeout_s=60) as client:
        flow_ids = await client.schedule_many([ThreeSteps(n=i) for i in range(200)])
        assert len(set(flow_ids)) == 200

        def completed_count() -> int:
            return sum(1 for e in read_events(events) if e[0] == "flow-end")

        await eventually(lambda: completed_count() >= 30, what="30 flows done")
        server_process.kill()
        assert completed_count() < 200, "the kill came too late to test anything"
        await asyncio.sleep(0.5)
        server_process.start()
        outcomes = await asyncio.gather(*(client.wait(f, timeout=120) for f in flow_ids))
        histories = await asyncio.gather(*(client.history(f) for f in flow_ids))
        listed = [f async for f in client.list_flows()]
    assert len(listed) == 200
    for n, outcome in enumerate(outcomes):
        assert outcome.status is FlowStatus.COMPLETED, outcome
        assert outcome.result == n * 2 + 1
    for history in histories:
        assert [(e.key, e.status, e.attempts) for e in history] == [
            ("one#1", "COMPLETED", 1),
            ("two#1", "COMPLETED", 1),
            ("three#1", "COMPLETED", 1),
        ]
    runs = step_runs(events)
    assert set(runs.values()) == {1}, "a recorded step ran more than once"
    assert len(runs) == 600


async def test_500_flows_across_three_workers_respect_capacity_and_share_fairly(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    workers = [start_worker(f"w{i}", capacity=20, step_delay=0.01) for i in range(3)]
    async with Client(server_process.address) as client:
        flow_ids = await client.schedule_many([ThreeSteps(n=i) for i in range(500)])
        outcomes = await asyncio.gather(*(client.wait(f, timeout=120) for f in flow_ids))
    assert all(o.status is FlowStatus.COMPLETED for o in outcomes)
    reports = [w.stop() for w in workers]
    for report in reports:
        stats = dict(part.split("=") for part in report.split() if "=" in part)
        assert int(stats["max_running"]) <= 20, report
    ends = Counter(e[3] for e in read_events(events) if e[0] == "flow-end")
    assert sum(ends.values()) == 500
    assert len(ends) == 3
    # Equal workers: each within a generous band around a third.
    assert min(ends.values()) >= 500 / 3 * 0.6, ends


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_server_down_longer_than_a_lease_lets_its_workers_reattach(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    # SQLite has one server: while it is down no worker can heartbeat anywhere, so that time
    # must not cost them their leases (here 4 s) and re-run the steps they are running.
    start_worker("w1", capacity=5, step_delay=3.0)
    async with Client(server_process.address, retry_timeout_s=60) as client:
        flow_ids = await client.schedule_many([ThreeSteps(n=i) for i in range(3)])

        def started() -> int:
            return sum(1 for e in read_events(events) if e[:1] == ["step-start"])

        await eventually(lambda: started() >= 3, what="the three first steps running")
        server_process.kill()
        await asyncio.sleep(6)  # longer than the 4 s lease TTL
        server_process.start()
        outcomes = await asyncio.gather(*(client.wait(f, timeout=60) for f in flow_ids))
    assert [o.status for o in outcomes] == [FlowStatus.COMPLETED] * 3
    starts = Counter((e[1], e[2]) for e in read_events(events) if e[0] == "step-start")
    assert set(starts.values()) == {1}, f"a step ran again after the restart: {starts}"
    assert len(starts) == 9
