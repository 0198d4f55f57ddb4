"""`python -m benchmarks WORKLOAD [options]`: run a workload, print a table, write JSON.

Workloads (see README's performance section):
  throughput  N flows of 3 trivial steps scheduled up front, one worker process
  latency     one 3-step flow at a time, start-to-result p50/p99
  timers      flows sleeping on a durable timer, firing lateness
  backlog     throughput with a large queue versus a small one
  suite       all of the above at their default sizes, on SQLite, then (a) and (b) on
              PostgreSQL with one and two replicas, and the peers that are installed

  install-peers  make the peers' own environments (benchmarks/.peers/, with uv): pyergon
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import peers
from benchmarks.harness import Deployment, deploy, machine_facts, progress
from benchmarks.workloads import backlog, latency, throughput, timers

RESULTS = Path(__file__).resolve().parent / "results"

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
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "workload",
        choices=["throughput", "latency", "timers", "backlog", "suite", "install-peers"],
    )
    parser.add_argument("--flows", type=int, default=0, help="flows (workload default if 0)")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres", "memory"],
        default="sqlite",
        help="memory: the server's in-memory store, no disk and no SQL (a floor, not durable)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="server replicas (PostgreSQL)")
    parser.add_argument("--capacity", type=int, default=200, help="the worker's capacity")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--seconds", type=float, default=1.0, help="timers: how long flows sleep")
    parser.add_argument("--queued", type=int, default=100_000, help="backlog: flows queued")
    parser.add_argument("--measured", type=int, default=10_000, help="backlog: flows timed")
    parser.add_argument("--peer", action="append", default=[], help="also run a peer (pyergon)")
    parser.add_argument("--json", type=Path, help="where to write the results")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.workload == "install-peers":
        return peers.install()
    rows = asyncio.run(main(args))
    print_table(rows)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or RESULTS / f"{stamp}-{args.workload}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_facts(), "results": rows}, indent=2))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
