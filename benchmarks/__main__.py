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
import os
import sys
import tempfile
from pathlib import Path

from ergon_server.grpc_io import prefer_iomgr

RESULTS = Path(__file__).resolve().parent / "results"


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
    """Run the command line's workloads; the exit status."""
    # Imported here, not above: `__main__` chooses gRPC's I/O before anything imports grpc.
    from benchmarks import peers
    from benchmarks.calibrate import calibrate, describe
    from benchmarks.harness import machine_facts, progress
    from benchmarks.runner import main, print_table

    args = parse(sys.argv[1:] if argv is None else argv)
    if args.workload == "install-peers":
        return peers.install()
    # Where the run's databases live (the default temporary directory).
    scratch = Path(tempfile.gettempdir())
    progress("calibrating: how fast is the machine now")
    before = asyncio.run(calibrate(scratch))
    rows = asyncio.run(main(args))
    after = asyncio.run(calibrate(scratch))
    print_table(rows)
    print(describe(before, after))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or RESULTS / f"{stamp}-{args.workload}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine_facts(), "calibration": {"before": before, "after": after}}
    path.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    # The harness is the workloads' client, and its worker and servers inherit its environment:
    # all of them use the I/O the server prefers unless GRPC_EXPERIMENTS says otherwise (set it
    # empty for gRPC's own default). See ergon_server/grpc_io.py.
    prefer_iomgr(os.environ)
    sys.exit(cli())
