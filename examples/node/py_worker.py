"""The Python side of the Node demo: a worker for `PyApproval`, the flow type demo.js schedules.

    uv run python examples/node/py_worker.py [--address 127.0.0.1:50051]

It registers, prints `python worker ready`, and runs until Ctrl-C (or SIGTERM). Then, in
another terminal:

    cd examples/node && npm install --no-package-lock && node demo.js 127.0.0.1:50051

The flow waits for an `approved` signal, which demo.js sends from Node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from dataclasses import dataclass

from ergon_worker_sdk import Client, Worker, await_external_signal, flow, flow_type


@dataclass
@flow_type(type_id="PyApproval")
class PyApproval:
    item: str

    @flow
    async def run(self) -> str:
        approval = await await_external_signal("approved")
        return f"{self.item} approved by {approval['by']} (run in Python)"


async def main(address: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Client(address) as client:
        worker = Worker(client, "python-worker")
        await worker.register(PyApproval)
        handle = await worker.start()
        print("python worker ready", flush=True)
        await stop.wait()
        await handle.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("ERGON_ADDRESS", "127.0.0.1:50051"))
    asyncio.run(main(parser.parse_args().address))
