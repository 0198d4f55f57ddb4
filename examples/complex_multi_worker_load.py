"""Several worker processes share hundreds of flows; every flow completes exactly once.

Start the server first (`make server`), then:

    uv run python examples/complex_multi_worker_load.py --workers 3 --flows 300

The script starts the worker processes itself (it re-runs itself with `--worker`), schedules
the flows in batches, waits for all of them, checks every result and journal, and prints who
did what.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass

from ergon_worker_sdk import Client, FlowStatus, Scheduler, Worker, flow, flow_type, step


@dataclass
class Item:
    sku: str
    quantity: int
    price: float


@dataclass
@flow_type
class OrderFulfillment:
    order_id: str
    items: list[Item]

    @step
    async def reserve_stock(self) -> list[str]:
        await asyncio.sleep(0.002)
        return [item.sku for item in self.items]

    @step
    async def price_order(self, skus: list[str]) -> float:
        return round(sum(i.quantity * i.price for i in self.items if i.sku in skus), 2)

    @step
    async def ship(self, total: float) -> str:
        await asyncio.sleep(0.002)
        return f"{self.order_id}:{total:.2f}:{os.environ.get('ERGON_WORKER_ID', '?')}"

    @flow
    async def run(self) -> str:
        skus = await self.reserve_stock()
        total = await self.price_order(skus)
        return await self.ship(total)


async def run_worker(address: str, worker_id: str, capacity: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Client(address) as client:
        worker = Worker(client, worker_id, max_concurrency=capacity)
        await worker.register(OrderFulfillment)
        handle = await worker.start()
        print(f"{worker_id} ready", flush=True)
        await stop.wait()
        await handle.shutdown(grace=10)


async def run_load(address: str, workers: int, flows: int, capacity: int) -> int:
    processes = []
    for n in range(workers):
        worker_id = f"worker-{n + 1}"
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                worker_id,
                "--address",
                address,
                "--capacity",
                str(capacity),
                env={**os.environ, "ERGON_WORKER_ID": worker_id},
                stdout=asyncio.subprocess.PIPE,
            )
        )
    try:
        for process in processes:
            assert process.stdout is not None
            await process.stdout.readline()
        orders = [
            OrderFulfillment(
                f"ORD-{i:05d}",
                [Item(f"SKU-{i % 7}", 1 + i % 3, 9.99), Item("SKU-GIFT", 1, 0.5)],
            )
            for i in range(flows)
        ]
        started = time.perf_counter()
        async with Client(address) as client:
            flow_ids = await Scheduler(client).schedule_many(orders)
            outcomes = await asyncio.gather(*(client.wait(f, timeout=300) for f in flow_ids))
            elapsed = time.perf_counter() - started
            histories = await asyncio.gather(*(client.history(f) for f in flow_ids))
        problems = 0
        done_by: Counter[str] = Counter()
        for order, outcome, history in zip(orders, outcomes, histories, strict=True):
            total = round(sum(i.quantity * i.price for i in order.items), 2)
            ok = (
                outcome.status is FlowStatus.COMPLETED
                and outcome.result.startswith(f"{order.order_id}:{total:.2f}:")
                and [e.key for e in history] == ["reserve_stock#1", "price_order#1", "ship#1"]
            )
            problems += not ok
            if ok:
                done_by[outcome.result.rsplit(":", 1)[1]] += 1
        print(
            f"{flows} flows on {workers} workers in {elapsed:.2f}s "
            f"({flows / elapsed:.0f} flows/s); each completed once: {problems == 0}"
        )
        for worker_id, count in sorted(done_by.items()):
            print(f"  {worker_id}: {count} flows")
        return 1 if problems else 0
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.wait_for(process.wait(), 30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--flows", type=int, default=300)
    parser.add_argument("--capacity", type=int, default=20)
    parser.add_argument("--worker", metavar="WORKER_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(run_worker(args.address, args.worker, args.capacity))
        return 0
    return asyncio.run(run_load(args.address, args.workers, args.flows, args.capacity))


if __name__ == "__main__":
    sys.exit(main())
