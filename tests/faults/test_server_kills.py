"""The server SIGKILLed at random points under a load of 500 mixed flows, on every store."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from ergon_worker_sdk import Client
from tests.faults.conftest import Processes
from tests.faults.load import FaultPoint, MixedLoad, fault_point
from tests.support.processes import eventually
from tests.support.store_check import snapshot

pytestmark = pytest.mark.faults

FLOWS = 500
KILLS = 4


# Room for the load's 60 s deadline and the report of flows that missed it.
@pytest.mark.timeout(180)
async def test_server_sigkilled_four_times_under_500_flows_loses_nothing(
    store_url: str, processes: Processes, events: Path, rng: random.Random
) -> None:
    started = time.monotonic()
    server = processes.server(store_url)
    for name in ("w1", "w2"):
        processes.worker(server.address, name, capacity=20, step_delay=0.1)
    faults: list[FaultPoint] = []
    runs_cut: list[int] = []
    async with Client(server.address, retry_timeout_s=60) as client:
        load = MixedLoad(client, rng, signal_delay_s=5.0)

        async def schedule() -> None:
            # Batches land before, between and during kills (a batch whose answer a kill
            # swallows is retried with the same request ids).
            for _ in range(5):
                await load.schedule(FLOWS // 5)
                load.run_soon(4, within=120)
                await asyncio.sleep(rng.uniform(0.2, 1.0))

        async def kill() -> None:
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            for k in range(KILLS):
                runs_cut.append(load.runs_in_flight)
                server.kill()
                faults.append(
                    await asyncio.to_thread(fault_point, f"server kill {k + 1}", store_url, events)
                )
                await asyncio.sleep(rng.uniform(0.05, 1.0))
                await asyncio.to_thread(server.start)
                # Kill again only once work has resumed, at a random moment after. Resumed:
                # 20 more entries recorded or flows ended, or fewer when fewer flows are left
                # (each has at least its end to come); Sleeper flows write no events.
                point = faults[-1]
                target = point.snap.progress + min(20, point.unfinished)

                async def resumed(target: int = target) -> bool:
                    now = await asyncio.to_thread(snapshot, store_url)
                    return now.progress >= target

                await eventually(
                    resumed,
                    within=60,
                    interval=0.2,
                    what=f"work resumed after restart {k + 1} (progress to {target})",
                )
                await asyncio.sleep(rng.uniform(0.2, 1.5))

        await asyncio.gather(schedule(), kill())
        await load.wait_all(within=60, store_url=store_url)
    figures = load.verify(store_url, events, faults)
    # Each kill hit work in progress, and between them timers and signal waits were pending.
    assert all(point.unfinished > 0 for point in faults), [p.unfinished for p in faults]
    assert sum(point.open_waits("TIMER") for point in faults) > 0
    assert sum(point.open_waits("SIGNAL") for point in faults) > 0
    assert sum(len(point.in_flight_steps) for point in faults) > 0
    assert server.starts == KILLS + 1
    # Some kills cut `Client.run` calls, which found their flows again after the restart.
    assert sum(runs_cut) > 0, runs_cut
    print(
        f"{store_url.split(':')[0]}: {KILLS} kills survived in {time.monotonic() - started:.1f}s; "
        f"unfinished at each kill {[p.unfinished for p in faults]}, "
        f"steps in flight {[len(p.in_flight_steps) for p in faults]}, "
        f"runs cut {runs_cut}; {figures}"
    )
