"""Several server replicas on one PostgreSQL database: real processes, real SIGKILLs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ergon_worker_sdk import Client, FlowStatus
from tests.conftest import FAST_LEASES
from tests.support.postgres import run_sync, temporary_database_sync
from tests.support.processes import ServerProcess, WorkerProcess, eventually, read_events, step_runs
from tests.support.worker_app import Sleeper, ThreeSteps


@pytest.fixture
def database() -> Iterator[str]:
    with temporary_database_sync("ergon_replicas") as dsn:
        yield dsn


@pytest.fixture
def replicas(database: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        server = ServerProcess(database, workdir, *FAST_LEASES)
        server.start()
        servers.append(server)
    yield servers
    for server in servers:
        server.kill()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


def start_worker(
    started: list[WorkerProcess], addresses: list[str], name: str, events: Path, **options: object
) -> WorkerProcess:
    worker = WorkerProcess(",".join(addresses), name, events, events.parent, **options)  # type: ignore[arg-type]
    started.append(worker)
    worker.wait_ready()
    return worker


async def test_two_replicas_share_1000_flows_each_completes_exactly_once(
    replicas: list[ServerProcess], workers: list[WorkerProcess], events: Path
) -> None:
    a, b = replicas
    start_worker(workers, [a.address], "on-a", events, capacity=20)
    start_worker(workers, [b.address], "on-b", events, capacity=20)
    async with Client(a.address) as via_a, Client(b.address) as via_b:
        ids = await via_a.schedule_many([ThreeSteps(n) for n in range(500)])
        ids += await via_b.schedule_many([ThreeSteps(n) for n in range(500, 1000)])
        outcomes = await asyncio.gather(*(via_a.wait(f, timeout=120) for f in ids))
    assert [o.result for o in outcomes] == [n * 2 + 1 for n in range(1000)]
    ends = [e for e in read_events(events) if e[0] == "flow-end"]
    assert sorted(e[1] for e in ends) == sorted(ids), "a flow ran to its end twice, or never"
    per_worker = Counter(e[3] for e in ends)
    assert per_worker["on-a"] > 0 and per_worker["on-b"] > 0, per_worker
    assert set(step_runs(events).values()) == {1}


async def test_killing_a_replica_moves_its_workers_to_the_other(
    replicas: list[ServerProcess], workers: list[WorkerProcess], events: Path
) -> None:
    a, b = replicas
    start_worker(workers, [a.address, b.address], "w1", events, capacity=10, step_delay=0.05)
    start_worker(workers, [b.address, a.address], "w2", events, capacity=10, step_delay=0.05)
    async with Client([a.address, b.address], retry_timeout_s=60) as client:
        ids = await client.schedule_many([ThreeSteps(n) for n in range(300)])
        await eventually(
            lambda: sum(1 for e in read_events(events) if e[0] == "flow-end") >= 40,
            what="40 flows done",
        )
        # Round-robin places the workers; kill a replica that holds at least one of them.
        victim = next(s for s in (a, b) if "connected: session" in s.logs())
        victim.kill()
        outcomes = await asyncio.gather(*(client.wait(f, timeout=120) for f in ids))
    assert [o.result for o in outcomes] == [n * 2 + 1 for n in range(300)]
    assert all(o.status is FlowStatus.COMPLETED for o in outcomes)
    runs = step_runs(events)
    assert len(runs) == 900 and set(runs.values()) == {1}, "a recorded step ran twice"


async def test_1000_timers_across_two_replicas_fire_once_none_early(
    replicas: list[ServerProcess], workers: list[WorkerProcess], events: Path
) -> None:
    a, b = replicas
    start_worker(workers, [a.address], "on-a", events, capacity=50)
    start_worker(workers, [b.address], "on-b", events, capacity=50)
    async with Client(a.address) as via_a, Client(b.address) as via_b:
        ids = await via_a.schedule_many([Sleeper(2.0) for _ in range(500)])
        ids += await via_b.schedule_many([Sleeper(2.0) for _ in range(500)])
        outcomes = await asyncio.gather(*(via_a.wait(f, timeout=120) for f in ids))
        histories = await asyncio.gather(*(via_b.history(f) for f in ids))
    for outcome, history in zip(outcomes, histories, strict=True):
        assert outcome.status is FlowStatus.COMPLETED
        assert [(e.key, e.kind) for e in history] == [("timer#1", "TIMER")]
        assert outcome.created_at is not None
        assert (history[0].recorded_at - outcome.created_at).total_seconds() >= 2.0


async def test_a_server_refuses_a_database_migrated_by_newer_code(
    database: str, tmp_path: Path
) -> None:
    first = ServerProcess(database, tmp_path)
    first.start()
    first.stop()

    async def bump() -> None:
        conn = await asyncpg.connect(database)
        try:
            await conn.execute("INSERT INTO schema_version (version, name) VALUES (99, 'x.sql')")
        finally:
            await conn.close()

    run_sync(bump())
    newer = ServerProcess(database, tmp_path)
    with pytest.raises(RuntimeError, match="newer than this ergon-server supports"):
        newer.start()
    assert newer.process is not None and newer.process.wait(10) != 0
