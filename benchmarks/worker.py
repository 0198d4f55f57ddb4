"""The benchmark worker process: trivial flows, reporting completions on stdout.

Prints `ready` once registered, then `done COUNT` lines (at most every 50 ms) as flows complete,
so the harness can time throughput without polling the server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ergon_worker_sdk import Client, Worker, flow, flow_type, schedule_timer, step


@dataclass
@flow_type
class Trivial3:
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


@dataclass
@flow_type
class Sleeper:
    seconds: float

    @step
    async def mark(self) -> float:
        return time.time()

    @flow
    async def run(self) -> str:
        await self.mark()
        await schedule_timer(self.seconds)
        return "woke"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--capacity", type=int, default=200)
    args = parser.parse_args()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Client(args.address.split(",")) as client:
        worker = Worker(client, "bench-worker", max_concurrency=args.capacity)
        await worker.register(Trivial3, Sleeper)
        handle = await worker.start()
        print("ready", flush=True)
        reported = -1
        while not stop.is_set():
            if worker.flows_completed != reported:
                reported = worker.flows_completed
                print(f"done {reported}", flush=True)
            try:
                async with asyncio.timeout(0.05):
                    await stop.wait()
            except TimeoutError:
                pass
        await handle.shutdown(grace=2)


if __name__ == "__main__":
    asyncio.run(main())
