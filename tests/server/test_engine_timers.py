"""Timers in the engine, driven by a manual clock on every backend: never early, never lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ergon_server.clock import ManualClock, SystemClock
from ergon_server.engine import Engine, EngineConfig
from ergon_server.engine.sessions import AckOut, Session, SuspendIn, WaitIn, WakeupOut
from ergon_server.model import EntryKind, FlowStatus, NewFlow, SuspendRequest, WaitRequest
from ergon_server.storage import create_store
from ergon_server.storage.base import Store


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'e.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = create_store(store_url)
    await store.open()
    yield store
    await store.close()


async def acks(session: Session) -> list[AckOut]:
    return [e for e in await session.next_batch() if isinstance(e, AckOut)]


async def test_a_suspended_timer_fires_exactly_at_its_time_never_before(store: Store) -> None:
    clock = ManualClock()
    engine = Engine(store, clock, EngineConfig(allow_unregistered_flow_types=True))
    await engine.schedule_flows([NewFlow("f1", "Sleeper", b"")])
    session, _ = await engine.open_session("w", ["Sleeper"], 1, 1, [])
    (claimed,) = await store.claim_flows(
        session.session_id, ["Sleeper"], 1, clock.now_ms() + 15_000, clock.now_ms()
    )
    engine.dispatcher.adopt(session, claimed.flow_id, claimed.lease_token)
    fire_at = clock.now_ms() + 2_000
    wait = WaitRequest("f1", claimed.lease_token, "timer#1", EntryKind.TIMER, fire_at=fire_at)
    await engine.handle_worker_events(session, [WaitIn(1, wait)])
    (ack,) = await acks(session)
    assert (ack.code, ack.fire_at_ms, ack.entries) == (0, fire_at, ())
    suspend = SuspendRequest("f1", claimed.lease_token, ("timer#1",))
    await engine.handle_worker_events(session, [SuspendIn(2, suspend)])
    (ack,) = await acks(session)
    assert ack.suspended and session.free == 1
    assert (await engine.get_flow("f1")).status is FlowStatus.WAITING

    clock.advance(1_999)
    assert await engine.fire_due_timers() == 0
    assert (await engine.get_flow("f1")).status is FlowStatus.WAITING
    assert await store.next_timer_at() == fire_at

    clock.advance(1)
    assert await engine.fire_due_timers() == 1
    flow = await engine.get_flow("f1")
    assert flow.status is FlowStatus.PENDING
    (entry,) = await engine.get_history("f1", 0, 10)
    assert (entry.key, entry.kind, entry.recorded_at) == ("timer#1", EntryKind.TIMER, fire_at)
    assert await engine.fire_due_timers() == 0  # fired once


async def test_registering_the_same_timer_again_keeps_its_first_fire_time(store: Store) -> None:
    clock = ManualClock()
    engine = Engine(store, clock, EngineConfig(allow_unregistered_flow_types=True))
    await engine.schedule_flows([NewFlow("f2", "Sleeper", b"")])
    session, _ = await engine.open_session("w", ["Sleeper"], 1, 1, [])
    (claimed,) = await store.claim_flows(
        session.session_id, ["Sleeper"], 1, clock.now_ms() + 15_000, clock.now_ms()
    )
    first = clock.now_ms() + 5_000
    wait = WaitRequest("f2", claimed.lease_token, "timer#1", EntryKind.TIMER, fire_at=first)
    await engine.handle_worker_events(session, [WaitIn(1, wait)])
    clock.advance(3_000)
    again = WaitRequest(
        "f2", claimed.lease_token, "timer#1", EntryKind.TIMER, fire_at=clock.now_ms() + 5_000
    )
    await engine.handle_worker_events(session, [WaitIn(2, again)])
    batch = await acks(session)
    assert [a.fire_at_ms for a in batch] == [first, first]


async def test_a_timer_due_before_the_loops_next_scan_wakes_it(store: Store) -> None:
    # The loop sleeps until the next due timer (or the poll interval, an hour here): a timer
    # registered meanwhile that is due sooner must wake it, or it would fire an hour late.
    clock = SystemClock()
    config = EngineConfig(allow_unregistered_flow_types=True, timer_poll_interval_ms=3_600_000)
    engine = Engine(store, clock, config)
    await engine.schedule_flows([NewFlow("long", "Sleeper", b""), NewFlow("short", "Sleeper", b"")])
    session, _ = await engine.open_session("w", ["Sleeper"], 2, 1, [])
    claimed = await store.claim_flows(
        session.session_id, ["Sleeper"], 2, clock.now_ms() + 600_000, clock.now_ms()
    )
    tokens = {c.flow_id: c.lease_token for c in claimed}
    for flow_id, token in tokens.items():
        engine.dispatcher.adopt(session, flow_id, token)
    await engine.start()
    try:
        far = WaitRequest(
            "long", tokens["long"], "timer#1", EntryKind.TIMER, fire_at=clock.now_ms() + 600_000
        )
        await engine.handle_worker_events(session, [WaitIn(1, far)])
        await asyncio.sleep(0.2)  # the loop has planned its next scan for the far timer
        soon = WaitRequest(
            "short", tokens["short"], "timer#1", EntryKind.TIMER, fire_at=clock.now_ms() + 50
        )
        await engine.handle_worker_events(session, [WaitIn(2, soon)])
        wakeups: list[WakeupOut] = []
        async with asyncio.timeout(10):
            while not wakeups:
                wakeups = [e for e in await session.next_batch() if isinstance(e, WakeupOut)]
        assert [(w.flow_id, w.entry.key) for w in wakeups] == [("short", "timer#1")]
        assert wakeups[0].entry.recorded_at >= soon.fire_at
        assert await engine.get_history("long", 0, 10) == []
    finally:
        await engine.shutdown()
