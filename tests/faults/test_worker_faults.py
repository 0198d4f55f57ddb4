"""Workers SIGKILLed, cut off and stalled: leases expire, flows move, stale results are refused."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from ergon_worker_sdk import Client, FlowStatus
from tests.faults.conftest import Processes
from tests.faults.load import FaultPoint, MixedLoad, fault_point
from tests.support.processes import eventually, read_events, step_runs
from tests.support.proxy import Mode, TcpProxy
from tests.support.worker_app import ThreeSteps, WhoRuns

pytestmark = pytest.mark.faults


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ergon.db'}"


def _busy(events: Path, worker: str) -> int:
    """Steps the worker has started and not finished."""
    mine = [e for e in read_events(events) if e[3] == worker]
    return sum(1 for e in mine if e[0] == "step-start") - sum(
        1 for e in mine if e[0] == "step-done"
    )


def _done_by(events: Path, worker: str) -> int:
    return sum(1 for e in read_events(events) if e[0] == "flow-end" and e[3] == worker)


async def test_worker_sigkilled_under_load_its_flows_move_and_complete(
    processes: Processes, tmp_path: Path, events: Path, rng: random.Random
) -> None:
    store_url = _sqlite(tmp_path)
    server = processes.server(store_url)
    victim = processes.worker(server.address, "victim", capacity=15, step_delay=0.3)
    processes.worker(server.address, "survivor", capacity=15, step_delay=0.1)
    faults: list[FaultPoint] = []
    async with Client(server.address) as client:
        load = MixedLoad(client, rng, signal_delay_s=3.0)
        await load.schedule(200)
        await eventually(lambda: _done_by(events, "victim") >= 3, what="victim at work")
        await eventually(lambda: _busy(events, "victim") >= 5, what="victim busy")
        victim.kill()
        # What the victim sent before it died (a step's result, a flow's end riding with its
        # last result) is stored in the next moment: look after that, well within the lease.
        await asyncio.sleep(0.5)
        faults.append(await asyncio.to_thread(fault_point, "victim killed", store_url, events))
        victim_started = {
            (e[1], e[2]) for e in read_events(events) if e[0] == "step-start" and e[3] == "victim"
        }
        in_flight = victim_started - faults[0].snap.completed_steps
        held = {f for f, row in faults[0].snap.flows.items() if row["lease_owner"]}
        await load.wait_all(within=60, store_url=store_url)
    figures = load.verify(store_url, events, faults)
    victims_flows = {f for f, _ in in_flight}
    assert victims_flows, "the kill found no step in flight"
    # Its leases expired (nothing released them: SIGKILL) and the flows moved.
    logs = server.logs()
    expired = set(re.findall(r"lease on flow (\S+) expired; re-queued", logs))
    assert victims_flows <= expired, victims_flows - expired
    assert expired <= held
    # The steps it had in flight were run again, by the survivor, and recorded once.
    finishers = {(e[1], e[2]): e[3] for e in read_events(events) if e[0] == "step-done"}
    assert all(finishers[step] == "survivor" for step in in_flight)
    print(f"worker kill: {len(expired)} leases expired and moved; {figures}")


async def test_worker_cut_off_shorter_than_its_lease_reattaches_without_rerunning(
    processes: Processes, tmp_path: Path, events: Path
) -> None:
    server = processes.server(_sqlite(tmp_path))
    with TcpProxy(server.address) as proxy:
        worker = processes.worker(proxy.address, "cut", capacity=20, step_delay=0.3)
        async with Client(server.address) as client:
            ids = await client.schedule_many([ThreeSteps(n) for n in range(60)])
            await eventually(lambda: len(step_runs(events)) >= 20, what="steps under way")
            proxy.set_mode(Mode.DROP)
            await asyncio.sleep(0.8)
            proxy.set_mode(Mode.PASS)
            outcomes = await asyncio.gather(*(client.wait(f, timeout=60) for f in ids))
    assert [o.result for o in outcomes] == [n * 2 + 1 for n in range(60)]
    assert proxy.resets >= 1
    output = worker.output.read_text()
    reattached = [int(n) for n in re.findall(r"(\d+) leases re-attached", output)]
    assert len(reattached) >= 2 and max(reattached[1:]) > 0, output
    runs = step_runs(events)
    # Within the lease, nothing moves: every step ran exactly once, results were re-sent.
    assert len(runs) == 180 and set(runs.values()) == {1}, runs.most_common(3)
    assert "lease lost" not in output and "not re-attached" not in output


async def test_stalled_worker_loses_its_leases_and_its_late_results_are_refused(
    processes: Processes, tmp_path: Path, events: Path
) -> None:
    server = processes.server(_sqlite(tmp_path))
    with TcpProxy(server.address) as proxy:
        stale = processes.worker(proxy.address, "stale", capacity=5, step_delay=2.5)
        async with Client(server.address) as client:
            ids = await client.schedule_many([WhoRuns(n) for n in range(5)])
            await eventually(
                lambda: sum(1 for e in read_events(events) if e[0] == "step-start") >= 5,
                what="the stale worker runs all five",
            )
            # A black hole: the worker keeps computing, nothing it sends gets through.
            proxy.set_mode(Mode.STALL)
            fresh = processes.worker(server.address, "fresh", capacity=5, step_delay=0.05)
            outcomes = await asyncio.gather(*(client.wait(f, timeout=30) for f in ids))
            assert [o.result for o in outcomes] == [f"{n}:fresh:fresh" for n in range(5)]
            # The stale worker finished its steps meanwhile. It gave up on the dead stream (no
            # pings for three heartbeats), then on the dial that went into the black hole (its
            # registration unanswered, or the connection's keepalive ping), and dials again.
            assert sum(1 for e in read_events(events) if e[:1] == ["step-done"]) >= 5

            def gave_up_twice() -> bool:
                output = stale.output.read_text()
                after = output.split("the server stopped answering", 1)[1:]
                return bool(after) and "stream lost" in after[0]

            await eventually(
                gave_up_twice, within=20, what="the stale worker gave up on the black hole, twice"
            )
            proxy.set_mode(Mode.PASS)
            await eventually(
                lambda: len(re.findall(r"worker stale lost its lease on flow", server.logs())) >= 5,
                within=30,
                what="the stale worker's results refused with LEASE_LOST",
            )
            histories = await asyncio.gather(*(client.history(f) for f in ids))
            # The SDK took the refusal in its stride: the worker is alive and works.
            assert stale.process.poll() is None
            fresh.kill()
            more = await client.schedule_many([WhoRuns(n) for n in range(5, 8)])
            later = await asyncio.gather(*(client.wait(f, timeout=30) for f in more))
    for history in histories:
        assert [(e.key, e.result, e.attempts) for e in history] == [
            ("work#1", "fresh", 1),
            ("after#1", "fresh", 1),
        ]
    assert all(o.status is FlowStatus.COMPLETED for o in later)
    assert [o.result for o in later] == [f"{n}:stale:stale" for n in range(5, 8)]
    # Each lease expired once: the silent session got none of the flows back meanwhile.
    expiries = Counter(re.findall(r"lease on flow (\S+) expired", server.logs()))
    assert expiries == Counter(set(ids)), expiries
    refused = set(re.findall(r'worker stale lost its lease on flow ([^\s",]+)', server.logs()))
    assert refused == set(ids)
    output = stale.output.read_text()
    assert all(
        f"flow {f}: lease lost" in output or f"lease on flow {f} was not re-attached" in output
        for f in ids
    ), output
    assert "Traceback" not in output
    # Each "work" ran twice, legitimately: the stale run's result was never recorded.
    runs = step_runs(events)
    assert all(runs[(f, "work")] == 2 for f in ids)
    done_by = {(e[1], e[3]) for e in read_events(events) if e[0] == "step-done"}
    assert all((f, "stale") in done_by and (f, "fresh") in done_by for f in ids)
