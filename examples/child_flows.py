"""A parent flow invokes child flows in parallel and handles a child's failure.

    uv run python examples/child_flows.py [--address 127.0.0.1:50051]

`self.invoke(Child(...)).result()` schedules the child with a deterministic id (the parent's id
and the call's key) and waits for it without holding a worker slot. A failed child surfaces in
the parent as `ChildFlowError`, which the parent may catch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass

from ergon_worker_sdk import ChildFlowError, Client, Worker, flow, flow_type, step


@dataclass
@flow_type
class ChargeCard:
    card: str
    amount: float

    @step
    async def charge(self) -> str:
        if self.card.startswith("0000"):
            raise ValueError(f"card {self.card} declined")
        return f"charged {self.amount:.2f} on {self.card[-4:]}"

    @flow
    async def run(self) -> str:
        return await self.charge()


@dataclass
@flow_type
class SplitPayment:
    cards: list[str]
    total: float

    @step
    async def receipt(self, lines: list[str]) -> str:
        return "; ".join(lines)

    @flow
    async def run(self) -> str:
        share = round(self.total / len(self.cards), 2)
        children = [self.invoke(ChargeCard(card, share)) for card in self.cards]  # type: ignore[attr-defined]
        try:
            lines = await asyncio.gather(*(child.result() for child in children))
        except ChildFlowError as error:
            return f"payment failed: {error.message}"
        return await self.receipt(list(lines))


async def main(address: str) -> None:
    async with Client(address) as client:
        worker = Worker(client, "payments", max_concurrency=10)
        await worker.register(SplitPayment, ChargeCard)
        handle = await worker.start()
        good = await client.schedule(SplitPayment(["4111-1", "4222-2", "4333-3"], 90.0))
        bad = await client.schedule(SplitPayment(["4111-1", "0000-9"], 50.0))
        for flow_id in (good, bad):
            outcome = await client.wait(flow_id, timeout=30)
            print(f"{outcome.status.name}: {outcome.result}")
        children = [f async for f in client.list_flows(flow_type="ChargeCard")]
        print(f"{len(children)} child flows, e.g. {children[0].flow_id}")
        await handle.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    asyncio.run(main(parser.parse_args().address))
