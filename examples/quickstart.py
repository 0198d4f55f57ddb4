"""Quick start: an order processor run by a worker, scheduled and awaited through the server.

Start the server first (`make server`, or `uv run ergon-server`), then:

    uv run python examples/quickstart.py [--address 127.0.0.1:50051]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass

from ergon_worker_sdk import Client, RetryPolicy, Scheduler, Worker, flow, flow_type, step


@dataclass
@flow_type
class OrderProcessor:
    order_id: str
    amount: float

    @step
    async def validate(self) -> bool:
        print(f"[{self.order_id}] validating")
        return self.amount > 0

    @step(
        retry_policy=RetryPolicy(
            max_attempts=5, initial_delay_ms=100, max_delay_ms=2000, backoff_multiplier=2.0
        )
    )
    async def process_payment(self) -> str:
        print(f"[{self.order_id}] charging ${self.amount:.2f}")
        return f"payment-{self.order_id}"

    @flow
    async def run(self) -> str:
        await self.validate()
        return await self.process_payment()


async def main(address: str) -> None:
    async with Client(address) as client:
        worker = Worker(client, "worker-1", max_concurrency=100)
        await worker.register(OrderProcessor)
        handle = await worker.start()
        flow_id = await Scheduler(client).schedule(OrderProcessor("ORD-001", 100.0))
        outcome = await client.wait(flow_id, timeout=30)
        print(f"flow {flow_id}: {outcome.status.name}, result {outcome.result!r}")
        for entry in await client.history(flow_id):
            print(f"  {entry.sequence}. {entry.key}: {entry.status} -> {entry.result!r}")
        await handle.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    asyncio.run(main(parser.parse_args().address))
