"""Ergon's throughput and latency workloads, run on `pyergon` (the design Ergon descends from).

A standalone script for the peer's own virtual environment (`python -m benchmarks
install-peers` makes it): it imports pyergon and nothing of Ergon's.

    benchmarks/.peers/pyergon/bin/python benchmarks/peer_pyergon.py throughput --flows 1000
    benchmarks/.peers/pyergon/bin/python benchmarks/peer_pyergon.py latency --flows 200

pyergon as it ships: `SqliteExecutionLog` on a fresh file, its `Scheduler`, and its `Worker`
in the same process and event loop (its design), with its default settings. Prints one JSON
object on stdout with the keys of Ergon's rows; progress goes to stderr.

The worker's concurrency is pyergon's default (no limit): in 0.8.1,
`Worker.with_max_concurrent_flows(n)` never gives a permit back once a flow has finished, so
the worker stops for good after n flows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pyergon import Scheduler, SqliteExecutionLog, Worker, flow, flow_type, step
from pyergon.core import TaskStatus

SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@dataclass
@flow_type
class Trivial3:
    """The same flow as Ergon's benchmark worker runs: three trivial steps returning ints."""

    n: int

    @step
    async def one(self) -> int:
        return self.n

    @step
    async def two(self, x: int) -> int:
        return x + 1

    @step
    async def three(self, x: int) -> int:
        return x * 2

    @flow
    async def run(self) -> int:
        return await self.three(await self.two(await self.one()))


def progress(message: str) -> None:
    print(f"  .. pyergon: {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at `fraction` (0..1) of the sorted values (nearest rank), as Ergon's harness."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


async def durability(storage: SqliteExecutionLog) -> dict[str, str]:
    """What the storage's own connection runs with (pyergon sets it in `connect()`)."""
    connection = storage._connection  # the settings are per connection: ask the one it uses
    assert connection is not None
    facts = {}
    for pragma in ("journal_mode", "synchronous"):
        async with connection.execute(f"PRAGMA {pragma}") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        facts[pragma] = SYNCHRONOUS.get(row[0], str(row[0])) if pragma == "synchronous" else row[0]
    return {"journal_mode": str(facts["journal_mode"]).upper(), "synchronous": facts["synchronous"]}


def schedule_to_complete(db: Path) -> list[float]:
    """Schedule-to-complete of every completed flow, in ms, from pyergon's own queue table.

    `created_at` is set when the flow is scheduled and `updated_at` when it is marked complete
    (both integer milliseconds).
    """
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT updated_at - created_at FROM flow_queue WHERE status = 'COMPLETE'"
        ).fetchall()
    return [float(value) for (value,) in rows]


async def throughput(storage: SqliteExecutionLog, db: Path, flows: int) -> dict[str, Any]:
    """N flows scheduled up front (the worker runs alongside, as pyergon does), wait for all."""
    scheduler = Scheduler(storage).unversioned()
    started = time.perf_counter()
    ids = []
    for n in range(flows):
        ids.append(await scheduler.schedule(Trivial3(n)))
        if (n + 1) % 1000 == 0 and flows > 1000:
            progress(f"throughput: scheduled {n + 1:,}/{flows:,}")
    outcomes = await storage.wait_for_all(ids)
    elapsed = time.perf_counter() - started
    failed = [task for task, status in outcomes if status is not TaskStatus.COMPLETE]
    if failed:
        raise RuntimeError(f"{len(failed)} flows did not complete, e.g. {failed[0]}")
    latencies = schedule_to_complete(db)
    if len(latencies) != flows:
        raise RuntimeError(f"{len(latencies)} completed flows in the queue table, not {flows}")
    return {
        "flows": flows,
        "seconds": round(elapsed, 3),
        "flows_per_s": round(flows / elapsed, 1),
        "schedule_to_complete_p50_ms": round(percentile(latencies, 0.5), 1),
        "schedule_to_complete_p99_ms": round(percentile(latencies, 0.99), 1),
    }


async def latency(storage: SqliteExecutionLog, flows: int) -> dict[str, Any]:
    """One flow at a time: schedule, wait for completion, read its result; after 10 warm-ups."""
    scheduler = Scheduler(storage).unversioned()
    samples = []
    for n in range(flows + 10):
        started = time.perf_counter()
        task_id = await scheduler.schedule(Trivial3(n))
        status = await storage.wait_for_completion(task_id)
        if status is not TaskStatus.COMPLETE:
            raise RuntimeError(f"flow {task_id} ended {status.name}")
        # The flow's result is its step 0's return value (task id = flow id).
        entry = await storage.get_invocation(task_id, 0)
        result = pickle.loads(entry.return_value) if entry and entry.return_value else None
        if result != (n + 1) * 2:
            raise RuntimeError(f"flow {task_id} returned {result!r}, not {(n + 1) * 2}")
        if n >= 10:  # the first few warm up, as in Ergon's latency workload
            samples.append((time.perf_counter() - started) * 1000)
        if n and n % 50 == 0:
            progress(f"latency: {n}/{flows + 10}")
    return {
        "flows": flows,
        "p50_ms": round(percentile(samples, 0.5), 2),
        "p99_ms": round(percentile(samples, 0.99), 2),
        "mean_ms": round(sum(samples) / len(samples), 2),
    }


async def run(workload: str, flows: int, db: Path) -> dict[str, Any]:
    storage = SqliteExecutionLog(str(db))
    await storage.connect()
    try:
        settings = await durability(storage)
        progress(
            f"{workload}, {flows:,} flows on {db} (journal_mode={settings['journal_mode']}, "
            f"synchronous={settings['synchronous']}, autocommit: one transaction per statement; "
            "worker in-process, concurrency unlimited)"
        )
        worker = Worker(storage, "bench-worker")
        await worker.register(Trivial3)
        handle = await worker.start()
        try:
            if workload == "throughput":
                figures = await throughput(storage, db, flows)
            else:
                figures = await latency(storage, flows)
        finally:
            await handle.shutdown()
    finally:
        await storage.close()
    return {
        "workload": workload,
        "system": f"pyergon {version('pyergon')}",
        "store": "sqlite",
        "synchronous": settings["synchronous"],
        "journal_mode": settings["journal_mode"],
        **figures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["throughput", "latency"])
    parser.add_argument("--flows", type=int, default=0, help="flows (1,000 / 200 if 0)")
    parser.add_argument("--db", type=Path, help="a new SQLite file (default: in a temp dir)")
    args = parser.parse_args()
    flows = args.flows or (1000 if args.workload == "throughput" else 200)
    if args.db is not None:
        if args.db.exists():
            parser.error(f"{args.db} exists: the run needs a fresh file")
        row = asyncio.run(run(args.workload, flows, args.db))
    else:
        with tempfile.TemporaryDirectory(prefix="pyergon-bench-") as tmp:
            row = asyncio.run(run(args.workload, flows, Path(tmp) / "bench.db"))
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
