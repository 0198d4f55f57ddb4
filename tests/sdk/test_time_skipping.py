"""Users' own tests with ErgonTestEnvironment: a 1-hour timer flow finishes at once."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ergon_worker_sdk import (
    FlowStatus,
    await_external_signal,
    flow,
    flow_type,
    schedule_timer,
    schedule_timer_named,
    step,
)
from ergon_worker_sdk.testing import ErgonTestEnvironment


@dataclass
@flow_type
class Subscription:
    customer: str

    @step
    async def charge(self, month: int) -> str:
        return f"charged {self.customer} for month {month}"

    @flow
    async def run(self) -> list[str]:
        receipts = []
        for month in (1, 2):
            receipts.append(await self.charge(month))
            await schedule_timer(3600)  # an hour between charges
        return receipts


@dataclass
@flow_type
class Reminder:
    to: str

    @step
    async def wait_a_day(self) -> str:
        await schedule_timer_named(24 * 3600, "day")  # a timer inside a step
        return f"reminded {self.to}"

    @flow
    async def run(self) -> str:
        return await self.wait_a_day()


async def test_a_flow_sleeping_hours_finishes_at_once() -> None:
    async with ErgonTestEnvironment(Subscription, Reminder) as env:
        started = time.monotonic()
        outcome = await env.run(Subscription("ann"))
        reminded = await env.run(Reminder("bob"))
        elapsed = time.monotonic() - started
    assert outcome.status is FlowStatus.COMPLETED
    assert outcome.result == ["charged ann for month 1", "charged ann for month 2"]
    assert reminded.result == "reminded bob"
    assert env.skipped_ms >= (2 * 3600 + 24 * 3600) * 1000 - 1000
    # Two hours and a day of timers took wall-clock seconds at most, not hours.
    assert elapsed < 10, elapsed
    print(f"26 hours of timers in {elapsed:.2f}s")


@dataclass
@flow_type
class Approval:
    item: str

    @flow
    async def run(self) -> str:
        decision = await await_external_signal("decision")
        return f"{self.item}: {decision}"


async def test_signals_and_manual_time_in_the_environment() -> None:
    async with ErgonTestEnvironment(Approval, time_skipping=False) as env:
        flow_id = await env.client.schedule(Approval("lamp"))
        await env.sleep(60)
        await env.client.signal(flow_id, "decision", "approved")
        outcome = await env.client.wait(flow_id, timeout=10)
    assert outcome.result == "lamp: approved"
