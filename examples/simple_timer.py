"""Durable timers with two workers: pyergon's timed order processor, over Ergon's server.

Each order's fraud check waits 2 s on a durable timer inside a step. The fire time is stored
on the server, so a retry (or another worker, after a crash) does not wait again.

    uv run python examples/simple_timer.py [--address 127.0.0.1:50051] [--orders 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

from ergon_worker_sdk import Client, Scheduler, Worker, flow, flow_type, schedule_timer_named, step


@dataclass
@flow_type
class TimedOrderProcessor:
    order_id: str

    @step
    async def wait_for_fraud_check(self) -> None:
        print(f"[{self.order_id}] waiting for fraud check...")
        await schedule_timer_named(2.0, f"fraud-{self.order_id}")
        print(f"[{self.order_id}] fraud check complete")

    @flow
    async def process(self) -> str:
        await self.wait_for_fraud_check()
        return "completed"


async def main(address: str, orders: int) -> None:
    async with Client(address) as client:
        handles = []
        for name in ("worker-1", "worker-2"):
            worker = Worker(client, name, max_concurrency=10)
            await worker.register(TimedOrderProcessor)
            handles.append(await worker.start())
        scheduler = Scheduler(client)
        started = time.monotonic()
        flow_ids = [
            await scheduler.schedule(TimedOrderProcessor(f"ORD-{i:03d}")) for i in range(orders)
        ]
        outcomes = await asyncio.gather(*(client.wait(f, timeout=60) for f in flow_ids))
        for outcome in outcomes:
            print(f"{outcome.flow_id}: {outcome.status.name} {outcome.result!r}")
        print(f"{orders} orders in {time.monotonic() - started:.1f}s")
        for handle in handles:
            await handle.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--orders", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.address, arguments.orders))
