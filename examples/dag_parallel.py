"""Independent steps of a flow run in parallel: `@step(depends_on=..., inputs=...)` + `dag()`.

    uv run python examples/dag_parallel.py [--address 127.0.0.1:50051]

fetch_customer, fetch_orders and fetch_prices have no dependencies and run at once; the
invoice step receives their results through `inputs`; `dag()` returns the final step's result.
Every step is durable: after a crash, finished steps replay and only the rest run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

from ergon_worker_sdk import Client, Worker, dag, flow, flow_type, step


@dataclass
@flow_type
class InvoiceBuilder:
    customer_id: str

    @step
    async def fetch_customer(self) -> dict[str, str]:
        await asyncio.sleep(0.3)
        return {"id": self.customer_id, "name": "Ada"}

    @step
    async def fetch_orders(self) -> list[dict[str, int]]:
        await asyncio.sleep(0.3)
        return [{"sku": 1, "qty": 2}, {"sku": 2, "qty": 1}]

    @step
    async def fetch_prices(self) -> dict[str, float]:
        await asyncio.sleep(0.3)
        return {"1": 9.5, "2": 20.0}

    @step(inputs={"customer": "fetch_customer", "orders": "fetch_orders", "prices": "fetch_prices"})
    async def invoice(
        self, customer: dict[str, str], orders: list[dict[str, int]], prices: dict[str, float]
    ) -> str:
        total = sum(prices[str(o["sku"])] * o["qty"] for o in orders)
        return f"invoice for {customer['name']}: ${total:.2f}"

    @step(depends_on="invoice")
    async def notify(self) -> str:
        return "sent"

    @flow
    async def run(self) -> str:
        text: str = await dag(self, final_step="invoice")
        return text


async def main(address: str) -> None:
    async with Client(address) as client:
        worker = Worker(client, "dag-worker", max_concurrency=10)
        await worker.register(InvoiceBuilder)
        handle = await worker.start()
        started = time.monotonic()
        flow_id = await client.schedule(InvoiceBuilder("C-1"))
        outcome = await client.wait(flow_id, timeout=30)
        elapsed = time.monotonic() - started
        print(
            f"{outcome.status.name}: {outcome.result} ({elapsed:.2f}s; the 3 fetches ran at once)"
        )
        for entry in await client.history(flow_id):
            print(f"  {entry.sequence}. {entry.key}")
        await handle.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    asyncio.run(main(parser.parse_args().address))
