"""A worker process for the end-to-end tests.

Every step body appends `step-done FLOW_ID KEY WORKER_ID` to the events file when it finishes
(and `step-start` when it begins), so the tests can count real executions across processes.
SIGTERM shuts the worker down gracefully and prints `max_running=N completed=N`. The SDK's
log (INFO and up) goes to the worker's output, so tests can see what it reported (lease lost,
reconnects).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ergon_worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    await_external_signal,
    current_context,
    flow,
    flow_type,
    schedule_timer,
    step,
)

EVENTS: Path
STEP_DELAY = 0.0
WORKER_ID = ""


def record(kind: str, key: str) -> None:
    context = current_context()
    flow_id = context.flow_id if context else "-"
    line = f"{kind} {flow_id} {key} {WORKER_ID}\n".encode()
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass
@flow_type
class FiveSteps:
    label: str

    async def _body(self, n: int) -> int:
        record("step-start", f"s{n}")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", f"s{n}")
        return n

    @step
    async def s1(self) -> int:
        return await self._body(1)

    @step
    async def s2(self) -> int:
        return await self._body(2)

    @step
    async def s3(self) -> int:
        return await self._body(3)

    @step
    async def s4(self) -> int:
        return await self._body(4)

    @step
    async def s5(self) -> int:
        return await self._body(5)

    @flow
    async def run(self) -> str:
        record("flow-start", "-")
        total = 0
        for part in (self.s1, self.s2, self.s3, self.s4, self.s5):
            total += await part()
        record("flow-end", "-")
        return f"{self.label}:{total}"


@dataclass
@flow_type
class ThreeSteps:
    n: int

    @step
    async def one(self) -> int:
        record("step-start", "one")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", "one")
        return self.n

    @step
    async def two(self, x: int) -> int:
        record("step-start", "two")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", "two")
        return x * 2

    @step
    async def three(self, x: int) -> int:
        record("step-start", "three")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", "three")
        return x + 1

    @flow
    async def run(self) -> int:
        record("flow-start", "-")
        value = await self.three(await self.two(await self.one()))
        record("flow-end", "-")
        return value


@dataclass
@flow_type
class Flaky:
    fail_times: int

    @step(retry_policy=RetryPolicy(max_attempts=5, initial_delay_ms=10, backoff_multiplier=2.0))
    async def charge(self) -> str:
        record("step-start", "charge")
        context = current_context()
        assert context is not None
        attempts = sum(
            1
            for line in EVENTS.read_text().splitlines()
            if line.startswith(f"step-start {context.flow_id} charge ")
        )
        if attempts <= self.fail_times:
            raise ConnectionError(f"payment gateway down (attempt {attempts})")
        record("step-done", "charge")
        return "charged"

    @flow
    async def run(self) -> str:
        return await self.charge()


@dataclass
@flow_type
class Sleeper:
    seconds: float

    @flow
    async def run(self) -> str:
        record("flow-start", "-")
        await schedule_timer(self.seconds)
        record("flow-end", "-")
        return "slept"


@dataclass
@flow_type
class Signalled:
    """A step, two signals on one mailbox (FIFO, each consumed once), a timer, a last step."""

    n: int
    nap: float = 0.0

    @step
    async def prepare(self) -> int:
        record("step-start", "prepare")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", "prepare")
        return self.n

    @step
    async def finish(self, first: str, second: str) -> str:
        record("step-start", "finish")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", "finish")
        return f"{first}+{second}"

    @flow
    async def run(self) -> str:
        record("flow-start", "-")
        n = await self.prepare()
        first = await await_external_signal("go")
        second = await await_external_signal("go")
        if self.nap:
            await schedule_timer(self.nap)
        value = await self.finish(str(first), str(second))
        record("flow-end", "-")
        return f"{n}:{value}"


@dataclass
@flow_type
class WhoRuns:
    """Steps whose result names the worker that ran them: the journal shows whose was kept."""

    n: int

    @step
    async def work(self) -> str:
        record("step-start", "work")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", "work")
        return WORKER_ID

    @step
    async def after(self) -> str:
        record("step-start", "after")
        record("step-done", "after")
        return WORKER_ID

    @flow
    async def run(self) -> str:
        record("flow-start", "-")
        first = await self.work()
        second = await self.after()
        record("flow-end", "-")
        return f"{self.n}:{first}:{second}"


@dataclass
@flow_type
class PackItem:
    item: str

    @step
    async def pack(self) -> str:
        record("step-start", f"pack-{self.item}")
        await asyncio.sleep(STEP_DELAY)
        record("step-done", f"pack-{self.item}")
        return f"packed:{self.item}"

    @flow
    async def run(self) -> str:
        return await self.pack()


@dataclass
@flow_type
class Shipment:
    items: list[str]

    @step
    async def label(self, packed: list[str]) -> str:
        record("step-done", "label")
        return "+".join(packed)

    @flow
    async def run(self) -> str:
        packed = await asyncio.gather(*(self.invoke(PackItem(i)).result() for i in self.items))  # type: ignore[attr-defined]
        return await self.label(list(packed))


def dump_tasks() -> None:
    """SIGUSR1: print every task's stack, to see where a stuck worker waits."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}: {task.get_coro()}", flush=True)
        for frame in task.get_stack():
            print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
    sys.stdout.flush()


async def main() -> None:
    global EVENTS, STEP_DELAY, WORKER_ID
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--capacity", type=int, default=10)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    EVENTS, STEP_DELAY, WORKER_ID = Path(args.events), args.step_delay, args.worker_id
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    logging.getLogger("ergon_worker_sdk").setLevel(logging.INFO)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    async with Client(args.address.split(",")) as client:
        worker = Worker(client, args.worker_id, max_concurrency=args.capacity)
        await worker.register(
            FiveSteps, ThreeSteps, Flaky, Sleeper, Signalled, WhoRuns, PackItem, Shipment
        )
        handle = await worker.start()
        print("worker started", flush=True)
        await stop.wait()
        await handle.shutdown(grace=5)
        print(f"max_running={worker.max_running} completed={worker.flows_completed}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
