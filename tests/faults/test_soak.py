"""Soak: mixed load for ERGON_SOAK_SECONDS (default 600) under random server and worker kills
and network drops, then a consistency check of the whole store. Marked `soak`: not in the
default run; `ERGON_SOAK_SECONDS=60 uv run pytest -m soak tests/faults/test_soak.py -s`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from ergon_worker_sdk import Client
from tests.faults.conftest import Processes
from tests.faults.load import FaultPoint, MixedLoad, fault_point
from tests.support.processes import WorkerProcess
from tests.support.proxy import Mode, TcpProxy

SECONDS = float(os.environ.get("ERGON_SOAK_SECONDS", "600"))


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 600)
async def test_soak_mixed_load_with_kills_then_whole_store_is_consistent(
    store_url: str, processes: Processes, events: Path, rng: random.Random
) -> None:
    started = time.monotonic()
    server = processes.server(store_url)
    faults: list[FaultPoint] = []
    counts = {"server kills": 0, "worker kills": 0, "network drops": 0}
    with TcpProxy(server.address) as proxy:
        workers: dict[str, WorkerProcess] = {}
        generation = 0

        def start_worker(slot: str) -> None:
            nonlocal generation
            generation += 1
            address = proxy.address if slot == "proxied" else server.address
            workers[slot] = processes.worker(
                address, f"{slot}-{generation}", capacity=20, step_delay=0.05
            )

        for slot in ("direct", "proxied"):
            start_worker(slot)
        async with Client(server.address, retry_timeout_s=120) as client:
            load = MixedLoad(client, rng, signal_delay_s=5.0)

            async def schedule() -> None:
                while time.monotonic() - started < SECONDS:
                    await load.schedule(rng.randint(20, 80))
                    load.run_soon(rng.randint(0, 4), within=300)
                    await asyncio.sleep(rng.uniform(0.5, 2.0))

            async def chaos() -> None:
                while time.monotonic() - started < SECONDS - 5:
                    await asyncio.sleep(rng.uniform(3.0, 8.0))
                    fault = rng.choice(["server", "worker", "network"])
                    if fault == "server":
                        server.kill()
                        faults.append(
                            await asyncio.to_thread(fault_point, "server", store_url, events)
                        )
                        await asyncio.sleep(rng.uniform(0.05, 1.0))
                        await asyncio.to_thread(server.start)
                        counts["server kills"] += 1
                    elif fault == "worker":
                        slot = rng.choice(sorted(workers))
                        workers[slot].kill()
                        faults.append(
                            await asyncio.to_thread(fault_point, "worker", store_url, events)
                        )
                        await asyncio.to_thread(start_worker, slot)
                        counts["worker kills"] += 1
                    else:
                        proxy.set_mode(rng.choice([Mode.DROP, Mode.STALL]))
                        faults.append(
                            await asyncio.to_thread(fault_point, "network", store_url, events)
                        )
                        await asyncio.sleep(rng.uniform(0.5, 6.0))
                        proxy.set_mode(Mode.PASS)
                        counts["network drops"] += 1

            await asyncio.gather(schedule(), chaos())
            await load.wait_all(within=300, store_url=store_url)
    figures = load.verify(store_url, events, faults)
    assert sum(counts.values()) >= 3, counts
    print(f"soak {store_url.split(':')[0]}: {time.monotonic() - started:.0f}s, {counts}; {figures}")
