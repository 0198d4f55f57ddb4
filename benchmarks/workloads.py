"""The workloads: throughput, latency, timers, backlog. Each returns a dict of figures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.harness import (
    Deployment,
    completion_latencies,
    percentile,
    progress,
    schedule_all,
    start_worker,
)
from benchmarks.worker import Sleeper, Trivial3
from ergon_worker_sdk import Client, FlowStatus


async def throughput(deployment: Deployment, flows: int = 1000) -> dict[str, Any]:
    """N flows of 3 trivial steps scheduled up front; one worker process."""
    worker = await start_worker(deployment)
    async with Client(deployment.addresses) as client:
        started = time.perf_counter()
        await schedule_all(client, [Trivial3(n) for n in range(flows)], "throughput")
        await worker.wait_done(flows, "throughput")
        elapsed = time.perf_counter() - started
        latencies = await completion_latencies(client, "Trivial3")
    return {
        "flows": flows,
        "seconds": round(elapsed, 3),
        "flows_per_s": round(flows / elapsed, 1),
        "schedule_to_complete_p50_ms": round(percentile(latencies, 0.5), 1),
        "schedule_to_complete_p99_ms": round(percentile(latencies, 0.99), 1),
    }


async def latency(deployment: Deployment, flows: int = 200) -> dict[str, Any]:
    """One 3-step flow at a time: start-to-result, measured by the client (`Client.run`)."""
    await start_worker(deployment)
    async with Client(deployment.addresses) as client:
        samples = []
        for n in range(flows + 10):
            started = time.perf_counter()
            outcome = await client.run(Trivial3(n), timeout=30)
            if outcome.status is not FlowStatus.COMPLETED:
                raise RuntimeError(f"flow {outcome.flow_id} ended {outcome.status.name}")
            if n >= 10:  # the first few warm the connections up
                samples.append((time.perf_counter() - started) * 1000)
            if n and n % 50 == 0:
                progress(f"latency: {n}/{flows + 10}")
    return {
        "flows": flows,
        "p50_ms": round(percentile(samples, 0.5), 2),
        "p99_ms": round(percentile(samples, 0.99), 2),
        "mean_ms": round(sum(samples) / len(samples), 2),
    }


async def timers(
    deployment: Deployment, flows: int = 10_000, seconds: float = 1.0
) -> dict[str, Any]:
    """Flows sleeping on a durable timer; lateness = when it fired - when it was due.

    Both times are the server's, from each flow's history. `after_mark_*` is the older,
    looser figure: fired - (the step before the timer + seconds), which also counts the
    round trip between that step's record and the timer's registration.
    """
    worker = await start_worker(deployment)
    async with Client(deployment.addresses) as client:
        started = time.perf_counter()
        ids = await schedule_all(client, [Sleeper(seconds) for _ in range(flows)], "timers")
        await worker.wait_done(flows, "timers")
        elapsed = time.perf_counter() - started
        lateness: list[float] = []
        after_mark: list[float] = []
        semaphore = asyncio.Semaphore(32)

        async def measure(flow_id: str) -> None:
            async with semaphore:
                history = await client.history(flow_id)
            (mark,) = [e for e in history if e.key == "mark#1"]
            (fired,) = [e for e in history if e.kind == "TIMER"]
            if fired.due_at is None:
                raise RuntimeError(f"the history of {flow_id} gives its timer no due time")
            lateness.append((fired.recorded_at - fired.due_at).total_seconds() * 1000)
            after_mark.append(
                (fired.recorded_at.timestamp() - mark.recorded_at.timestamp() - seconds) * 1000
            )

        progress("timers: reading histories")
        await asyncio.gather(*(measure(f) for f in ids))
    return {
        "flows": flows,
        "sleep_s": seconds,
        "seconds": round(elapsed, 3),
        "lateness_p50_ms": round(percentile(lateness, 0.5), 1),
        "lateness_p99_ms": round(percentile(lateness, 0.99), 1),
        "lateness_max_ms": round(max(lateness), 1),
        "fired_early": sum(1 for value in lateness if value < 0),
        "after_mark_p50_ms": round(percentile(after_mark, 0.5), 1),
        "after_mark_p99_ms": round(percentile(after_mark, 0.99), 1),
    }


async def backlog(
    deployment: Deployment, queued: int = 100_000, measured: int = 10_000
) -> dict[str, Any]:
    """Throughput over the first `measured` flows while `queued` flows wait in the queue.

    Timed from the worker's start (its connection included, the same for every backlog).
    """
    async with Client(deployment.addresses) as client:
        await schedule_all(client, [Trivial3(n) for n in range(queued)], f"backlog {queued:,}")
        started = time.perf_counter()
        worker = await start_worker(deployment)
        target = min(queued, measured)
        await worker.wait_done(target, f"backlog {queued:,}")
        elapsed = time.perf_counter() - started
    return {
        "queued": queued,
        "measured": target,
        "seconds": round(elapsed, 3),
        "flows_per_s": round(target / elapsed, 1),
    }


WORKLOADS = {
    "throughput": throughput,
    "latency": latency,
    "timers": timers,
    "backlog": backlog,
}
