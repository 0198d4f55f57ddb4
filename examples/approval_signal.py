"""A flow waits for a human approval, sent as a signal, for example with grpcurl.

    uv run python examples/approval_signal.py [--address 127.0.0.1:50051] [--expense EXP-1]

The script schedules the flow, prints the grpcurl command that approves it, and waits. Run the
command in another terminal (or pass --approve-by NAME to have the script send the signal
itself through the SDK):

    grpcurl -plaintext -d '{"flow_id": "expense-EXP-1", "name": "approved",
      "payload": {"json": {"by": "ann"}}}' 127.0.0.1:50051 ergon.v1.SignalService/SendSignal

While it waits, the flow holds no worker slot; the signal is stored durably, and one sent
before the flow reaches its wait is kept until it does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import dataclass

from ergon_worker_sdk import Client, Worker, await_external_signal, flow, flow_type, step


@dataclass
class Approval:
    by: str


@dataclass
@flow_type
class ExpenseApproval:
    expense_id: str
    amount: float

    @step
    async def submit(self) -> str:
        print(f"[{self.expense_id}] submitted for approval (${self.amount:.2f})", flush=True)
        return "submitted"

    @step
    async def pay(self, approver: str) -> str:
        return f"{self.expense_id} paid, approved by {approver}"

    @flow
    async def run(self) -> str:
        await self.submit()
        approval = await await_external_signal("approved", Approval)
        return await self.pay(approval.by)


async def main(address: str, expense: str, approve_by: str | None) -> None:
    async with Client(address) as client:
        worker = Worker(client, "approvals", max_concurrency=10)
        await worker.register(ExpenseApproval)
        handle = await worker.start()
        flow_id = await client.schedule(
            ExpenseApproval(expense, 42.0), flow_id=f"expense-{expense}"
        )
        request = {"flow_id": flow_id, "name": "approved", "payload": {"json": {"by": "ann"}}}
        print("waiting for approval; approve with:", flush=True)
        print(
            f"  grpcurl -plaintext -d '{json.dumps(request)}' {address} "
            "ergon.v1.SignalService/SendSignal",
            flush=True,
        )
        if approve_by:
            await client.signal(flow_id, "approved", Approval(approve_by))
        outcome = await client.wait(flow_id, timeout=300)
        print(f"{flow_id}: {outcome.status.name}: {outcome.result}", flush=True)
        await handle.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--expense", default="EXP-1")
    parser.add_argument("--approve-by", help="send the approval signal from this script")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.address, arguments.expense, arguments.approve_by))
