"""Run the workloads a command line asks for, on Ergon and its peers; rows for the table."""

from __future__ import annotations

import argparse
import math
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import peers
from benchmarks.harness import Deployment, deploy, progress
from benchmarks.workloads import backlog, latency, throughput, timers

Run = Callable[[Deployment], Awaitable[dict[str, Any]]]


async def run_one(
    name: str, run: Run, *, store: str, replicas: int, capacity: int, synchronous: str
) -> dict[str, Any]:
    progress(f"{name} on {store} x{replicas}")
    async with deploy(store, replicas, capacity, synchronous) as deployment:
        figures = await run(deployment)
        return {
            "workload": name,
            "system": "ergon",
            "store": store,
            "replicas": replicas,
            "synchronous": {"sqlite": synchronous, "memory": "none (nothing kept)"}.get(
                store, "postgres default"
            ),
            **deployment.facts,
            **figures,
        }


def print_table(rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(str(row.get(k, "")).ljust(widths[k]) for k in keys))


def add_peer_speedups(rows: list[dict[str, Any]]) -> None:
    """Give each peer row `ergon_speedup`: how many times faster Ergon was in the same run.

    Against Ergon's first row of the same workload (the store the command line chose):
    throughput is Ergon's flows/s over the peer's, latency the peer's p50 over Ergon's; above
    1 Ergon is faster. The issue's targets count this ratio, not the absolute figures.
    """
    ergon: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["system"] == "ergon":
            ergon.setdefault(row["workload"], row)
    for row in rows:
        mine = ergon.get(row["workload"])
        if row["system"] == "ergon" or mine is None:
            continue
        if row["workload"] == "throughput":
            faster, slower = mine.get("flows_per_s"), row.get("flows_per_s")
        elif row["workload"] == "latency":
            faster, slower = row.get("p50_ms"), mine.get("p50_ms")
        else:
            continue
        # A figure that is missing, zero or NaN (a failed run) gives no ratio.
        if faster and slower and math.isfinite(faster / slower):
            row["ergon_speedup"] = round(faster / slower, 2)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {"capacity": args.capacity, "synchronous": args.synchronous}
    rows: list[dict[str, Any]] = []

    async def add(
        name: str, run: Run, store: str = args.store, replicas: int = args.replicas
    ) -> None:
        rows.append(await run_one(name, run, store=store, replicas=replicas, **common))

    flows = args.flows
    if args.workload in ("throughput", "suite"):
        await add("throughput", lambda d: throughput(d, flows or 1000))
    if args.workload in ("latency", "suite"):
        await add("latency", lambda d: latency(d, flows or 200))
    if args.workload in ("timers", "suite"):
        await add("timers", lambda d: timers(d, flows or 10_000, args.seconds))
    if args.workload in ("backlog", "suite"):
        small, large = min(1000, args.queued), args.queued
        await add("backlog", lambda d: backlog(d, small, min(small, args.measured)))
        await add("backlog", lambda d: backlog(d, large, args.measured))
        rows[-1]["ratio_to_small_backlog"] = round(
            rows[-1]["flows_per_s"] / rows[-2]["flows_per_s"], 3
        )
    if args.workload == "suite":
        for replicas in (1, 2):
            await add("throughput", lambda d: throughput(d, 1000), "postgres", replicas)
            await add("latency", lambda d: latency(d, 200), "postgres", replicas)
    if args.workload == "suite" or args.peer:
        compared = [w for w in ("throughput", "latency") if args.workload in (w, "suite")]
        for peer in peers.available(args.peer):
            for name in compared:
                progress(f"{name} on peer {peer.name}")
                rows.append(await peer.run(name, flows or (1000 if name == "throughput" else 200)))
        add_peer_speedups(rows)
    return rows
