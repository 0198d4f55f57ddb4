"""Durable waits end to end: real server and worker processes, real SIGKILLs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from ergon_worker_sdk import Client, FlowStatus
from tests.support.processes import ServerProcess, WorkerProcess, eventually, read_events, step_runs
from tests.support.worker_app import Shipment, Sleeper


async def _count(client: Client, status: FlowStatus) -> int:
    return len([f async for f in client.list_flows(status=status, page_size=1000)])


async def test_1000_sleeping_flows_hold_no_slots_and_no_timer_fires_early(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("sleepy", capacity=10)
    async with Client(server_process.address) as client:
        started = time.monotonic()
        flow_ids = await client.schedule_many([Sleeper(seconds=2.0) for _ in range(1000)])
        outcomes = await asyncio.gather(*(client.wait(f, timeout=90) for f in flow_ids))
        elapsed = time.monotonic() - started
        histories = await asyncio.gather(*(client.history(f) for f in flow_ids[::50]))
    assert all(o.status is FlowStatus.COMPLETED and o.result == "slept" for o in outcomes)
    for outcome, history in zip(outcomes[::50], histories, strict=True):
        (timer,) = history
        assert (timer.key, timer.kind) == ("timer#1", "TIMER")
        assert outcome.created_at is not None
        assert (timer.recorded_at - outcome.created_at).total_seconds() >= 2.0
        # The history says when it was due: 2 s after the flow registered it, not before.
        assert timer.due_at is not None and timer.recorded_at >= timer.due_at
        assert (timer.due_at - outcome.created_at).total_seconds() >= 2.0
    report = worker.stop()
    assert "max_running=" in report and int(report.split("max_running=")[1].split()[0]) <= 10
    # With slots held while sleeping, 1,000 flows x 2 s over 10 slots would take 200 s.
    print(f"1000 sleeping flows on 10 slots: {elapsed:.1f}s")


async def test_timers_pending_across_a_server_kill_fire_once_after_restart(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker("w1", capacity=20)
    async with Client(server_process.address, retry_timeout_s=60) as client:
        flow_ids = await client.schedule_many([Sleeper(seconds=2.0) for _ in range(100)])
        await eventually(
            lambda: _count_at_least(client, FlowStatus.WAITING, 100), what="100 flows waiting"
        )
        server_process.kill()
        await asyncio.sleep(2.5)  # past every fire time, with the server down
        server_process.start()
        outcomes = await asyncio.gather(*(client.wait(f, timeout=60) for f in flow_ids))
        histories = await asyncio.gather(*(client.history(f) for f in flow_ids))
    assert all(o.status is FlowStatus.COMPLETED for o in outcomes)
    for outcome, history in zip(outcomes, histories, strict=True):
        assert [(e.key, e.kind, e.status) for e in history] == [("timer#1", "TIMER", "COMPLETED")]
        assert outcome.created_at is not None
        assert (history[0].recorded_at - outcome.created_at).total_seconds() >= 2.0


async def _count_at_least(client: Client, status: FlowStatus, n: int) -> bool:
    return await _count(client, status) >= n


async def test_parent_with_three_parallel_children_survives_a_worker_kill(
    server_process: ServerProcess, start_worker: Callable[..., WorkerProcess], events: Path
) -> None:
    doomed = start_worker("doomed", capacity=5, step_delay=1.0)
    start_worker("steady", capacity=5, step_delay=0.2)
    async with Client(server_process.address) as client:
        flow_ids = await client.schedule_many(
            [Shipment(items=[f"{n}a", f"{n}b", f"{n}c"]) for n in range(4)]
        )

        def doomed_packing() -> bool:
            return any(e[0] == "step-start" and e[3] == "doomed" for e in read_events(events))

        await eventually(doomed_packing, what="the doomed worker started packing")
        doomed.kill()
        outcomes = await asyncio.gather(*(client.wait(f, timeout=60) for f in flow_ids))
        children = await asyncio.gather(
            *(
                client.get(f"{flow_id}/child:PackItem#{k}")
                for flow_id in flow_ids
                for k in (1, 2, 3)
            )
        )
    assert [o.result for o in outcomes] == [
        f"packed:{n}a+packed:{n}b+packed:{n}c" for n in range(4)
    ]
    assert all(c.status is FlowStatus.COMPLETED for c in children)
    runs = step_runs(events)
    assert runs[(flow_ids[0], "label")] == 1
    assert all(count == 1 for (flow_id, key), count in runs.items() if key == "label")
