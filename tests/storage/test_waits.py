"""Conformance of waits (timers, signals, child flows), suspension, cancellation and parking.

Every test that takes `store` or `backend` runs on every backend (see conftest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ergon_server.errors import InvalidArgumentError
from ergon_server.model import (
    CANCEL_KEY,
    CancelOutcome,
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
    FlowStatus,
    JournalRecord,
    NewFlow,
    Park,
    Satisfied,
    ScheduleResult,
    SignalOutcome,
    SignalResult,
    SuspendOutcome,
    SuspendRequest,
    SuspendResult,
    WaitRequest,
    WaitResult,
)
from ergon_server.storage._checks import cancellation_failure
from ergon_server.storage.base import Store
from ergon_server.storage.sqlite import SqliteStore
from tests.storage.support import (
    BOOM,
    EXISTING,
    LEASE_LOST,
    NOT_FOUND,
    OK,
    T0,
    TTL,
    cancelled,
    claim_one,
    finished,
    flow,
    lease,
    step,
)

if TYPE_CHECKING:
    from tests.storage.conftest import Backend

COMPLETED = EntryStatus.COMPLETED
FAILED = EntryStatus.FAILED
RUNNING = FlowStatus.RUNNING
PENDING = FlowStatus.PENDING
WAITING = FlowStatus.WAITING


def timer(claimed: ClaimedFlow, key: str, fire_at: int) -> WaitRequest:
    return WaitRequest(claimed.flow_id, claimed.lease_token, key, EntryKind.TIMER, fire_at=fire_at)


def signal_wait(claimed: ClaimedFlow, key: str, name: str) -> WaitRequest:
    return WaitRequest(
        claimed.flow_id, claimed.lease_token, key, EntryKind.SIGNAL, signal_name=name
    )


def child_wait(claimed: ClaimedFlow, key: str, child: NewFlow) -> WaitRequest:
    return WaitRequest(claimed.flow_id, claimed.lease_token, key, EntryKind.CHILD, child=child)


def suspend(claimed: ClaimedFlow, *keys: str, abandoned: tuple[str, ...] = ()) -> SuspendRequest:
    return SuspendRequest(claimed.flow_id, claimed.lease_token, keys, abandoned)


def entry(
    sequence: int,
    key: str,
    kind: EntryKind,
    at: int,
    status: EntryStatus = COMPLETED,
    result: bytes | None = None,
    error: Failure | None = None,
) -> JournalRecord:
    """A journal entry as a wait or a cancellation records it."""
    return JournalRecord(sequence, key, kind, status, result, error, 1, "", at)


async def register(store: Store, wait: WaitRequest, now: int) -> WaitResult:
    (result,) = await store.register_waits([wait], now)
    return result


async def status_of(store: Store, flow_id: str) -> FlowStatus:
    record = await store.get_flow(flow_id)
    assert record is not None
    return record.status


async def claim_again(store: Store, flow_id: str, now: int, session: str = "s2") -> ClaimedFlow:
    claimed = await store.claim_flows(session, ["orders"], 10, now + TTL, now)
    assert [c.flow_id for c in claimed] == [flow_id]
    return claimed[0]


# --- timers ----------------------------------------------------------------------------------


async def test_timer_fires_at_its_time_never_early(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await register(store, timer(claimed, "sleep", T0 + 1_000), T0 + 1) == WaitResult(
        OK, None, T0 + 1_000
    )
    # The first registration fixes the fire time for good.
    assert await register(store, timer(claimed, "sleep", T0 + 5), T0 + 2) == WaitResult(
        OK, None, T0 + 1_000
    )
    assert await store.next_timer_at() == T0 + 1_000
    assert await store.fire_timers(T0 + 999, 10) == []
    assert await store.get_history("f1", 0, 10) == []
    fired = await store.fire_timers(T0 + 1_000, 10)
    sleep = entry(1, "sleep", EntryKind.TIMER, T0 + 1_000)
    # The flow runs: its worker must be told, under its lease.
    assert fired == [Satisfied("f1", sleep, RUNNING, claimed.lease_token, "s1")]
    # The history also tells when it was due (the entry itself, as workers get it, does not).
    assert await store.get_history("f1", 0, 10) == [dataclasses.replace(sleep, due_at=T0 + 1_000)]
    assert await store.next_timer_at() is None
    assert await store.fire_timers(T0 + 5_000, 10) == []
    # Registering a fired timer again answers its entry.
    assert await register(store, timer(claimed, "sleep", T0), T0 + 1_001) == WaitResult(
        OK, sleep, T0 + 1_000
    )
    assert await status_of(store, "f1") is RUNNING


async def test_timer_due_at_registration_fires_at_once(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await store.record_steps([step(claimed, "a")], T0) == [OK]
    result = await register(store, timer(claimed, "t", T0 + 10), T0 + 10)
    assert result == WaitResult(OK, entry(2, "t", EntryKind.TIMER, T0 + 10), T0 + 10)
    assert await store.next_timer_at() is None
    assert await store.fire_timers(T0 + 100, 10) == []
    assert await status_of(store, "f1") is RUNNING


async def test_timer_wakes_a_waiting_flow(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await register(store, timer(claimed, "t", T0 + 500), T0)
    assert await store.suspend_flows([suspend(claimed, "t")], T0 + 1) == (
        [SuspendResult(SuspendOutcome.SUSPENDED)],
        [],
    )
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.lease_owner, record.lease_expires_at, record.updated_at) == (
        WAITING,
        None,
        None,
        T0 + 1,
    )
    # A waiting flow holds no lease and is not claimable.
    assert await store.claim_flows("s2", ["orders"], 10, T0 + TTL, T0 + 400) == []
    assert await store.record_steps([step(claimed, "x")], T0 + 2) == [LEASE_LOST]
    fired = await store.fire_timers(T0 + 600, 10)
    t = entry(1, "t", EntryKind.TIMER, T0 + 600)
    assert fired == [Satisfied("f1", t, PENDING, claimed.lease_token, None)]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.ready_at, record.updated_at) == (PENDING, T0 + 600, T0 + 600)
    again = await claim_again(store, "f1", T0 + 600)
    assert (again.lease_token, again.journal) == (claimed.lease_token + 1, [t])


async def test_fire_timers_oldest_first_with_limit(store: Store) -> None:
    a = await claim_one(store, "a")
    b = await claim_one(store, "b")
    await store.register_waits(
        [
            timer(b, "t2", T0 + 20),
            timer(a, "t3", T0 + 30),
            timer(a, "t1", T0 + 20),
            timer(b, "t0", T0 + 10),
            timer(a, "late", T0 + 1_000),
        ],
        T0,
    )
    assert await store.next_timer_at() == T0 + 10
    # Later than a time: what a scan plans for while a fire up to that time is in flight.
    assert await store.next_timer_at(after_ms=T0 + 10) == T0 + 20
    assert await store.next_timer_at(after_ms=T0 + 30) == T0 + 1_000
    assert await store.next_timer_at(after_ms=T0 + 1_000) is None
    first = await store.fire_timers(T0 + 100, 2)
    # Oldest fire_at first; ties by flow then key.
    assert [(s.flow_id, s.entry.key, s.entry.sequence) for s in first] == [
        ("b", "t0", 1),
        ("a", "t1", 1),
    ]
    second = await store.fire_timers(T0 + 100, 2)
    assert [(s.flow_id, s.entry.key, s.entry.sequence) for s in second] == [
        ("b", "t2", 2),
        ("a", "t3", 2),
    ]
    assert await store.fire_timers(T0 + 100, 2) == []
    assert await store.next_timer_at() == T0 + 1_000
    assert await store.fire_timers(T0 + 1_000, 0) == []
    assert [s.entry.key for s in await store.fire_timers(T0 + 1_000, 1)] == ["late"]


async def test_timers_of_ended_flows_never_fire(store: Store) -> None:
    done = await claim_one(store, "done")
    await register(store, timer(done, "t", T0 + 10), T0)
    finish = FlowFinish("done", done.lease_token, FlowStatus.COMPLETED, result=b"")
    assert await finished(store, [finish], T0 + 1) == [OK]
    waiting = await claim_one(store, "waiting")
    await register(store, timer(waiting, "t", T0 + 20), T0)
    await store.suspend_flows([suspend(waiting, "t")], T0)
    assert await cancelled(store, "waiting", "stop", T0 + 2) is CancelOutcome.CANCELLED
    assert await store.next_timer_at() is None
    assert await store.fire_timers(T0 + 100, 10) == []
    assert await store.get_history("done", 0, 10) == []
    assert [e.key for e in await store.get_history("waiting", 0, 10)] == [CANCEL_KEY]


async def test_fire_timers_skips_a_key_recorded_otherwise(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.register_waits([timer(claimed, "k", T0 + 1), timer(claimed, "t", T0 + 2)], T0)
    # A step recorded under the open timer's key: the timer is satisfied without an entry.
    assert await store.record_steps([step(claimed, "k")], T0) == [OK]
    fired = await store.fire_timers(T0 + 10, 1)
    assert [(s.entry.key, s.entry.sequence) for s in fired] == [("t", 2)]
    assert await store.next_timer_at() is None
    assert [e.kind for e in await store.get_history("f1", 0, 10)] == [
        EntryKind.STEP,
        EntryKind.TIMER,
    ]


async def test_sqlite_timers_of_flows_ended_elsewhere_are_cancelled(
    sqlite_store: SqliteStore,
) -> None:
    await sqlite_store.schedule_flows([flow(f"f{index}") for index in range(3)], T0)
    claimed = await sqlite_store.claim_flows("s1", ["orders"], 3, T0 + TTL, T0)
    await sqlite_store.register_waits([timer(c, "t", T0 + 1) for c in claimed], T0)
    # Ended by something that did not cancel its waits (an older server, say).
    with sqlite3.connect(sqlite_store.path) as conn:
        conn.execute("UPDATE flows SET status = 'FAILED' WHERE flow_id IN ('f0', 'f1')")
    conn.close()
    fired = await sqlite_store.fire_timers(T0 + 5, 1)
    assert [s.flow_id for s in fired] == ["f2"]
    assert await sqlite_store.next_timer_at() is None
    assert await sqlite_store.get_history("f0", 0, 10) == []


async def test_timers_survive_restart(backend: Backend) -> None:
    if not backend.survives_reopen:
        pytest.skip(f"{backend.name} keeps nothing across close")
    first = backend.make()
    await first.open()
    try:
        await first.schedule_flows([flow(f"f{index}") for index in range(5)], T0)
        claimed = await first.claim_flows("s1", ["orders"], 5, T0 + TTL, T0)
        results = await first.register_waits(
            [timer(c, "t", T0 + 100 + index) for index, c in enumerate(claimed)], T0
        )
        assert [r.fire_at for r in results] == [T0 + 100 + index for index in range(5)]
        outcomes, _ = await first.suspend_flows([suspend(c, "t") for c in claimed[:3]], T0)
        assert {r.outcome for r in outcomes} == {SuspendOutcome.SUSPENDED}
    finally:
        await first.close()

    second = backend.make()
    await second.open()
    try:
        assert await second.next_timer_at() == T0 + 100
        # Registering after the restart keeps the fire time stored before it.
        assert await register(second, timer(claimed[4], "t", T0 + 9_999), T0) == WaitResult(
            OK, None, T0 + 104
        )
        fired = await second.fire_timers(T0 + 200, 100)
        assert [(s.flow_id, s.status) for s in fired] == [
            ("f0", PENDING),
            ("f1", PENDING),
            ("f2", PENDING),
            ("f3", RUNNING),
            ("f4", RUNNING),
        ]
        assert await second.fire_timers(T0 + 300, 100) == []
        assert await second.next_timer_at() is None
        for c in claimed:
            assert [e.key for e in await second.get_history(c.flow_id, 0, 10)] == ["t"]
    finally:
        await second.close()


# --- signals ---------------------------------------------------------------------------------


async def test_buffered_signals_are_consumed_fifo_once(store: Store) -> None:
    delivered = SignalOutcome.DELIVERED
    claimed = await claim_one(store, "f1")
    for index in (1, 2, 3):
        assert await store.send_signal("f1", "go", str(index).encode(), "", T0) == (
            SignalResult(delivered, index)
        )
    assert await store.send_signal("f1", "other", b"x", "", T0) == SignalResult(delivered, 1)
    one = await register(store, signal_wait(claimed, "w1", "go"), T0 + 1)
    assert one == WaitResult(OK, entry(1, "w1", EntryKind.SIGNAL, T0 + 1, result=b"1"))
    two = await register(store, signal_wait(claimed, "w2", "go"), T0 + 2)
    assert two == WaitResult(OK, entry(2, "w2", EntryKind.SIGNAL, T0 + 2, result=b"2"))
    # Registering a satisfied wait again consumes nothing.
    assert await register(store, signal_wait(claimed, "w1", "go"), T0 + 3) == one
    three, four = await store.register_waits(
        [signal_wait(claimed, "w3", "go"), signal_wait(claimed, "w4", "go")], T0 + 4
    )
    assert three == WaitResult(OK, entry(3, "w3", EntryKind.SIGNAL, T0 + 4, result=b"3"))
    assert four == WaitResult(OK)
    # A signal sent while a wait is open satisfies it at once; the flow runs.
    result = await store.send_signal("f1", "go", b"4", "", T0 + 5)
    w4 = entry(4, "w4", EntryKind.SIGNAL, T0 + 5, result=b"4")
    assert result == SignalResult(
        delivered, 4, Satisfied("f1", w4, RUNNING, claimed.lease_token, "s1")
    )
    # No wait is open any more: the next one is buffered.
    assert await store.send_signal("f1", "go", b"5", "", T0 + 6) == SignalResult(delivered, 5)
    assert [(e.key, e.result) for e in await store.get_history("f1", 0, 10)] == [
        ("w1", b"1"),
        ("w2", b"2"),
        ("w3", b"3"),
        ("w4", b"4"),
    ]
    five = await register(store, signal_wait(claimed, "w5", "go"), T0 + 7)
    assert five.entry is not None
    assert five.entry.result == b"5"
    other = await register(store, signal_wait(claimed, "w6", "other"), T0 + 8)
    assert other.entry is not None
    assert other.entry.result == b"x"


async def test_signal_wakes_a_waiting_flow(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await register(store, signal_wait(claimed, "approval", "approve"), T0)
    assert (await store.suspend_flows([suspend(claimed, "approval")], T0))[0] == [
        SuspendResult(SuspendOutcome.SUSPENDED)
    ]
    # A signal of another name leaves the flow waiting.
    assert (await store.send_signal("f1", "reject", b"", "", T0 + 1)).satisfied is None
    assert await status_of(store, "f1") is WAITING
    result = await store.send_signal("f1", "approve", b"yes", "req-1", T0 + 2)
    approval = entry(1, "approval", EntryKind.SIGNAL, T0 + 2, result=b"yes")
    assert result.satisfied == Satisfied("f1", approval, PENDING, claimed.lease_token, None)
    # A retried delivery answers its first sequence and satisfies nothing more.
    assert await store.send_signal("f1", "approve", b"yes", "req-1", T0 + 3) == SignalResult(
        SignalOutcome.DELIVERED, 1
    )
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.ready_at) == (PENDING, T0 + 2)
    again = await claim_again(store, "f1", T0 + 2)
    assert again.journal == [approval]


async def test_cancelled_signal_wait_does_not_consume(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.register_waits([signal_wait(claimed, "s", "go"), timer(claimed, "t", T0 + 100)], T0)
    # The flow now waits only for the timer and gave the signal wait up: it is cancelled.
    assert (await store.suspend_flows([suspend(claimed, "t", abandoned=("s",))], T0))[0] == [
        SuspendResult(SuspendOutcome.SUSPENDED)
    ]
    assert await store.send_signal("f1", "go", b"kept", "", T0 + 1) == SignalResult(
        SignalOutcome.DELIVERED, 1
    )
    assert await status_of(store, "f1") is WAITING
    assert await store.get_history("f1", 0, 10) == []
    await store.fire_timers(T0 + 100, 10)
    again = await claim_again(store, "f1", T0 + 100)
    # Registered again, the wait reopens and consumes the buffered signal.
    result = await register(store, signal_wait(again, "s", "go"), T0 + 101)
    assert result == WaitResult(OK, entry(2, "s", EntryKind.SIGNAL, T0 + 101, result=b"kept"))


async def test_signal_with_schedule_satisfies_an_open_wait(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await register(store, signal_wait(claimed, "w", "go"), T0)
    await store.suspend_flows([suspend(claimed, "w")], T0)
    scheduled, signalled = await store.signal_with_schedule(flow("f1"), "go", b"p", T0 + 1)
    assert scheduled == ScheduleResult("f1", EXISTING)
    w = entry(1, "w", EntryKind.SIGNAL, T0 + 1, result=b"p")
    assert signalled == SignalResult(
        SignalOutcome.DELIVERED, 1, Satisfied("f1", w, PENDING, claimed.lease_token, None)
    )


# --- suspend ---------------------------------------------------------------------------------


async def test_suspend_is_fenced(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.schedule_flows([flow("pending")], T0)
    results, satisfied = await store.suspend_flows(
        [
            SuspendRequest("missing", 1, ()),
            SuspendRequest("f1", claimed.lease_token + 1, ()),
            SuspendRequest("pending", 0, ()),
        ],
        T0,
    )
    assert results == [
        SuspendResult(SuspendOutcome.NOT_FOUND),
        SuspendResult(SuspendOutcome.LEASE_LOST),
        SuspendResult(SuspendOutcome.LEASE_LOST),
    ]
    assert satisfied == []
    assert await store.suspend_flows([], T0) == ([], [])
    assert await status_of(store, "f1") is RUNNING


async def test_suspend_resumes_when_a_wait_is_already_satisfied(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.register_waits(
        [timer(claimed, "short", T0 + 10), timer(claimed, "long", T0 + 1_000)], T0
    )
    await store.fire_timers(T0 + 10, 10)
    results, _ = await store.suspend_flows([suspend(claimed, "long", "short")], T0 + 20)
    assert results == [
        SuspendResult(SuspendOutcome.RESUME, (entry(1, "short", EntryKind.TIMER, T0 + 10),))
    ]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.lease_token, record.lease_owner) == (
        RUNNING,
        claimed.lease_token,
        "s1",
    )
    # The long timer is still open. A suspend that does not name it leaves it alone (it may
    # have overtaken the wait's registration); one that names it abandoned cancels it.
    assert await store.next_timer_at() == T0 + 1_000
    results, _ = await store.suspend_flows([suspend(claimed, "short")], T0 + 30)
    assert results[0].outcome is SuspendOutcome.RESUME
    assert await store.next_timer_at() == T0 + 1_000
    results, _ = await store.suspend_flows(
        [suspend(claimed, "short", abandoned=("long",))], T0 + 31
    )
    assert results[0].outcome is SuspendOutcome.RESUME
    assert await store.next_timer_at() is None
    assert await store.fire_timers(T0 + 2_000, 10) == []
    # Nothing left to wait for: the flow suspends (and will be woken by nothing).
    results, _ = await store.suspend_flows([suspend(claimed)], T0 + 40)
    assert results == [SuspendResult(SuspendOutcome.SUSPENDED)]


async def test_suspend_many_flows_in_one_call(store: Store) -> None:
    await store.schedule_flows([flow(f"f{index}") for index in range(4)], T0)
    claimed = await store.claim_flows("s1", ["orders"], 4, T0 + TTL, T0)
    await store.register_waits([timer(c, "t", T0 + 10) for c in claimed], T0)
    await store.register_waits([timer(claimed[0], "now", T0)], T0)
    results, _ = await store.suspend_flows(
        [
            suspend(claimed[0], "t", "now"),
            suspend(claimed[1], "t"),
            suspend(claimed[1], "t"),
            suspend(claimed[2], "t"),
        ],
        T0 + 1,
    )
    assert [r.outcome for r in results] == [
        SuspendOutcome.RESUME,
        SuspendOutcome.SUSPENDED,
        SuspendOutcome.LEASE_LOST,
        SuspendOutcome.SUSPENDED,
    ]
    fired = await store.fire_timers(T0 + 10, 10)
    assert [(s.flow_id, s.status) for s in fired] == [
        ("f0", RUNNING),
        ("f1", PENDING),
        ("f2", PENDING),
        ("f3", RUNNING),
    ]


# --- child flows -----------------------------------------------------------------------------


def child(
    flow_id: str = "child",
    data: bytes = b"child-input",
    *,
    request_id: str = "",
    parent_flow_id: str = "",
    parent_key: str = "",
) -> NewFlow:
    return NewFlow(
        flow_id=flow_id,
        flow_type="kids",
        input=data,
        request_id=request_id,
        parent_flow_id=parent_flow_id,
        parent_key=parent_key,
    )


async def claim_child(store: Store, flow_id: str, now: int) -> ClaimedFlow:
    claimed = await store.claim_flows("kid-session", ["kids"], 10, now + TTL, now)
    assert [c.flow_id for c in claimed] == [flow_id]
    return claimed[0]


async def test_register_waits_schedules_the_child(store: Store) -> None:
    parent = await claim_one(store, "parent")
    wait = child_wait(parent, "c", child())
    assert await register(store, wait, T0 + 5) == WaitResult(OK)
    record = await store.get_flow("child")
    assert record is not None
    assert (record.status, record.flow_type, record.input, record.parent_flow_id) == (
        PENDING,
        "kids",
        b"child-input",
        "parent",
    )
    assert (record.created_at, record.ready_at) == (T0 + 5, T0 + 5)
    assert await register(store, wait, T0 + 6) == WaitResult(OK)
    page = await store.list_flows([], None, 10, None)
    assert [(r.flow_id, r.parent_flow_id) for r in page.flows] == [
        ("parent", None),
        ("child", "parent"),
    ]


async def test_a_wait_by_a_child_created_earlier_in_the_same_call_is_fenced(
    store: Store,
) -> None:
    parent = await claim_one(store, "parent")
    # No lease on the new child holds: its wait is refused as any stale lease is.
    by_child = WaitRequest("child", 1, "t", EntryKind.TIMER, fire_at=T0 + 100)
    results = await store.register_waits([child_wait(parent, "c", child()), by_child], T0)
    assert results == [WaitResult(OK), WaitResult(LEASE_LOST)]


async def test_child_completion_wakes_the_waiting_parent(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await register(store, child_wait(parent, "c", child()), T0)
    assert (await store.suspend_flows([suspend(parent, "c")], T0))[0][0].outcome is (
        SuspendOutcome.SUSPENDED
    )
    kid = await claim_child(store, "child", T0 + 1)
    done = FlowFinish("child", kid.lease_token, FlowStatus.COMPLETED, result=b"out")
    c = entry(1, "c", EntryKind.CHILD, T0 + 2, result=b"out")
    assert await store.finish_flows([done], T0 + 2) == (
        [OK],
        [Satisfied("parent", c, PENDING, parent.lease_token, None)],
    )
    # A retried completion satisfies nothing twice.
    assert await store.finish_flows([done], T0 + 3) == ([OK], [])
    record = await store.get_flow("parent")
    assert record is not None
    assert (record.status, record.ready_at) == (PENDING, T0 + 2)
    again = await claim_again(store, "parent", T0 + 2)
    assert again.journal == [c]


async def test_child_of_a_running_parent_reports_its_lease(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await register(store, child_wait(parent, "c", child()), T0)
    kid = await claim_child(store, "child", T0)
    failure = FlowFinish("child", kid.lease_token, FlowStatus.FAILED, error=BOOM)
    outcomes, satisfied = await store.finish_flows([failure], T0 + 1)
    c = entry(1, "c", EntryKind.CHILD, T0 + 1, FAILED, error=BOOM)
    assert (outcomes, satisfied) == (
        [OK],
        [Satisfied("parent", c, RUNNING, parent.lease_token, "s1")],
    )
    assert await store.suspend_flows([suspend(parent, "c")], T0 + 2) == (
        [SuspendResult(SuspendOutcome.RESUME, (c,))],
        [],
    )


async def test_cancelled_child_fails_the_parents_wait(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await register(store, child_wait(parent, "c", child()), T0)
    await store.suspend_flows([suspend(parent, "c")], T0)
    outcome, satisfied = await store.cancel_flow("child", "not needed", T0 + 1)
    c = entry(1, "c", EntryKind.CHILD, T0 + 1, FAILED, error=cancellation_failure("not needed"))
    assert (outcome, satisfied) == (
        CancelOutcome.CANCELLED,
        [Satisfied("parent", c, PENDING, parent.lease_token, None)],
    )
    record = await store.get_flow("child")
    assert record is not None
    assert (record.status, record.error) == (
        FlowStatus.CANCELLED,
        cancellation_failure("not needed"),
    )


async def test_child_that_ended_first_is_recorded_at_registration(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await store.schedule_flows([child(parent_flow_id="parent", parent_key="c")], T0)
    kid = await claim_child(store, "child", T0)
    done = FlowFinish("child", kid.lease_token, FlowStatus.COMPLETED, result=b"early")
    assert await store.finish_flows([done], T0 + 1) == ([OK], [])
    result = await register(store, child_wait(parent, "c", child()), T0 + 2)
    assert result == WaitResult(OK, entry(1, "c", EntryKind.CHILD, T0 + 2, result=b"early"))
    assert await status_of(store, "parent") is RUNNING


async def test_cancelled_child_wait_gets_its_entry_without_waking(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await store.register_waits(
        [child_wait(parent, "c", child()), timer(parent, "t", T0 + 1_000)], T0
    )
    # The parent stops waiting for the child.
    await store.suspend_flows([suspend(parent, "t", abandoned=("c",))], T0)
    kid = await claim_child(store, "child", T0)
    done = FlowFinish("child", kid.lease_token, FlowStatus.COMPLETED, result=b"late")
    assert await store.finish_flows([done], T0 + 1) == ([OK], [])
    assert await status_of(store, "parent") is WAITING
    assert await store.get_history("parent", 0, 10) == [
        entry(1, "c", EntryKind.CHILD, T0 + 1, result=b"late")
    ]


async def test_ended_parent_is_left_alone(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await register(store, child_wait(parent, "c", child()), T0)
    finish = FlowFinish("parent", parent.lease_token, FlowStatus.COMPLETED, result=b"")
    assert await finished(store, [finish], T0 + 1) == [OK]
    kid = await claim_child(store, "child", T0 + 1)
    done = FlowFinish("child", kid.lease_token, FlowStatus.COMPLETED, result=b"")
    assert await store.finish_flows([done], T0 + 2) == ([OK], [])
    assert await store.get_history("parent", 0, 10) == []


async def test_an_existing_flow_is_taken_as_the_child(store: Store) -> None:
    await store.schedule_flows([child("solo", data=b"other")], T0)
    await store.schedule_flows([child("made", request_id="req")], T0)
    parent = await claim_one(store, "parent")
    results = await store.register_waits(
        [
            # Same flow_id, another input: that flow is the child all the same.
            child_wait(parent, "a", child("solo")),
            # A known request id names the flow it created.
            child_wait(parent, "b", child("fresh", request_id="req")),
        ],
        T0,
    )
    assert results == [WaitResult(OK), WaitResult(OK)]
    assert await store.get_flow("fresh") is None
    await store.suspend_flows([suspend(parent, "a", "b")], T0)
    claimed = await store.claim_flows("k", ["kids"], 10, T0 + TTL, T0)
    assert [c.flow_id for c in claimed] == ["solo", "made"]
    ends = [
        FlowFinish(c.flow_id, c.lease_token, FlowStatus.COMPLETED, c.flow_id.encode())
        for c in claimed
    ]
    outcomes, satisfied = await store.finish_flows(ends, T0 + 1)
    assert outcomes == [OK, OK]
    # The first satisfied wait wakes the parent; the second finds it PENDING.
    assert [(s.entry.key, s.entry.result, s.status) for s in satisfied] == [
        ("a", b"solo", PENDING),
        ("b", b"made", PENDING),
    ]


async def test_children_ending_together_satisfy_in_order(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await store.register_waits(
        [child_wait(parent, f"c{index}", child(f"k{index}")) for index in range(3)], T0
    )
    await store.suspend_flows([suspend(parent, "c0", "c1", "c2")], T0)
    kids = await store.claim_flows("k", ["kids"], 10, T0 + TTL, T0)
    ends = [
        FlowFinish(k.flow_id, k.lease_token, FlowStatus.COMPLETED, result=k.flow_id.encode())
        for k in reversed(kids)
    ]
    outcomes, satisfied = await store.finish_flows(ends, T0 + 1)
    assert outcomes == [OK] * 3
    assert [(s.entry.key, s.entry.sequence, s.status) for s in satisfied] == [
        ("c2", 1, PENDING),
        ("c1", 2, PENDING),
        ("c0", 3, PENDING),
    ]


async def test_failed_child_entry_dropped_by_a_retry_is_recorded_again(store: Store) -> None:
    parent = await claim_one(store, "parent")
    await register(store, child_wait(parent, "c", child()), T0)
    kid = await claim_child(store, "child", T0)
    failure = FlowFinish("child", kid.lease_token, FlowStatus.FAILED, error=BOOM)
    await store.finish_flows([failure], T0 + 1)
    retry = FlowFinish(
        "parent", parent.lease_token, FlowStatus.FAILED, error=BOOM, retry_delay_ms=10
    )
    assert await finished(store, [retry], T0 + 2) == [OK]
    assert await store.get_history("parent", 0, 10) == []
    again = await claim_again(store, "parent", T0 + 12)
    # The retry registers the wait again: the failed child is the same flow, failed still.
    result = await register(store, child_wait(again, "c", child()), T0 + 13)
    assert result == WaitResult(OK, entry(2, "c", EntryKind.CHILD, T0 + 13, FAILED, error=BOOM))


async def test_child_end_queued_after_a_parent_write_applies_after_it(store: Store) -> None:
    """Concurrent calls apply in call order even when a child's end writes its parent."""
    parent = await claim_one(store, "parent")
    other = await claim_one(store, "other")
    await register(store, child_wait(parent, "c", child()), T0)
    kid = await claim_child(store, "child", T0)
    end_other = FlowFinish("other", other.lease_token, FlowStatus.COMPLETED, result=b"")
    end_kid = FlowFinish("child", kid.lease_token, FlowStatus.COMPLETED, result=b"k")
    results = await asyncio.gather(
        store.finish_flows([end_other], T0 + 1),
        store.record_steps([step(parent, "s")], T0 + 1),
        store.suspend_flows([suspend(parent, "c")], T0 + 1),
        store.finish_flows([end_kid], T0 + 1),
    )
    c = entry(2, "c", EntryKind.CHILD, T0 + 1, result=b"k")
    assert list(results) == [
        ([OK], []),
        [OK],
        ([SuspendResult(SuspendOutcome.SUSPENDED)], []),
        ([OK], [Satisfied("parent", c, PENDING, parent.lease_token, None)]),
    ]
    assert [e.key for e in await store.get_history("parent", 0, 10)] == ["s", "c"]


@pytest.mark.parametrize("child_first", [False, True])
async def test_parent_retry_and_child_failure_together(store: Store, child_first: bool) -> None:
    parent = await claim_one(store, "parent")
    await register(store, child_wait(parent, "c", child()), T0)
    kid = await claim_child(store, "child", T0)
    retry = FlowFinish(
        "parent", parent.lease_token, FlowStatus.FAILED, error=BOOM, retry_delay_ms=10
    )
    failure = FlowFinish("child", kid.lease_token, FlowStatus.FAILED, error=BOOM)
    calls = [store.finish_flows([retry], T0 + 1), store.finish_flows([failure], T0 + 1)]
    if child_first:
        calls.reverse()
    results = await asyncio.gather(*calls)
    c = entry(1, "c", EntryKind.CHILD, T0 + 1, FAILED, error=BOOM)
    history = await store.get_history("parent", 0, 10)
    if child_first:
        # The child's failure is recorded while the parent runs, then dropped by its retry.
        assert results == [
            ([OK], [Satisfied("parent", c, RUNNING, parent.lease_token, "s1")]),
            ([OK], []),
        ]
        assert history == []
    else:
        # The retry comes first; the failure lands in the re-queued flow's journal.
        assert results == [
            ([OK], []),
            ([OK], [Satisfied("parent", c, PENDING, parent.lease_token, None)]),
        ]
        assert history == [c]


# --- cancellation ----------------------------------------------------------------------------


async def test_cancel_records_the_cancellation(store: Store) -> None:
    await store.schedule_flows([flow("f1")], T0)
    assert await cancelled(store, "f1", "not needed", T0 + 1) is CancelOutcome.CANCELLED
    failure = cancellation_failure("not needed")
    assert await store.get_history("f1", 0, 10) == [
        entry(1, CANCEL_KEY, EntryKind.CANCEL, T0 + 1, error=failure)
    ]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.error, record.cancel_requested) == (
        FlowStatus.CANCELLED,
        failure,
        False,
    )
    assert await cancelled(store, "f1", "again", T0 + 2) is CancelOutcome.CLOSED
    assert len(await store.get_history("f1", 0, 10)) == 1


async def test_cancel_a_waiting_flow(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.register_waits([timer(claimed, "t", T0 + 100), signal_wait(claimed, "s", "go")], T0)
    await store.suspend_flows([suspend(claimed, "t", "s")], T0)
    assert await cancelled(store, "f1", "stop", T0 + 1) is CancelOutcome.CANCELLED
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.completed_at, record.lease_owner) == (
        FlowStatus.CANCELLED,
        T0 + 1,
        None,
    )
    assert await store.next_timer_at() is None
    assert await store.send_signal("f1", "go", b"", "", T0 + 2) == SignalResult(
        SignalOutcome.CLOSED
    )
    assert [e.key for e in await store.get_history("f1", 0, 10)] == [CANCEL_KEY]


async def test_cancel_a_running_flow(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await store.record_steps([step(claimed, "a")], T0) == [OK]
    assert await cancelled(store, "f1", "stop", T0 + 1) is CancelOutcome.CANCEL_REQUESTED
    cancel = entry(2, CANCEL_KEY, EntryKind.CANCEL, T0 + 1, error=cancellation_failure("stop"))
    # A second request records nothing more and keeps the first reason.
    assert await cancelled(store, "f1", "again", T0 + 2) is CancelOutcome.CANCEL_REQUESTED
    assert [e.key for e in await store.get_history("f1", 0, 10)] == ["a", CANCEL_KEY]
    assert (await store.get_history("f1", 1, 10)) == [cancel]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.cancel_requested, record.lease_owner, record.updated_at) == (
        RUNNING,
        True,
        "s1",
        T0 + 1,
    )
    # Even a retry request ends it CANCELLED, with the cancellation as its error.
    retry = FlowFinish("f1", claimed.lease_token, FlowStatus.FAILED, error=BOOM, retry_delay_ms=5)
    assert await finished(store, [retry], T0 + 3) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.error, record.result, record.completed_at, record.attempt) == (
        FlowStatus.CANCELLED,
        cancellation_failure("stop"),
        None,
        T0 + 3,
        1,
    )
    # A retried finish of any kind under the same lease answers OK; another lease does not.
    done = FlowFinish("f1", claimed.lease_token, FlowStatus.COMPLETED, result=b"x")
    stale = FlowFinish("f1", claimed.lease_token - 1, FlowStatus.COMPLETED, result=b"x")
    assert await finished(store, [retry, done, stale], T0 + 4) == [OK, OK, LEASE_LOST]
    assert await cancelled(store, "f1", "late", T0 + 5) is CancelOutcome.CLOSED


async def test_cancel_requested_survives_a_requeue(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await cancelled(store, "f1", "first", T0) is CancelOutcome.CANCEL_REQUESTED
    assert await store.release_flows([lease(claimed)], T0 + 1) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.cancel_requested) == (PENDING, True)
    again = await claim_again(store, "f1", T0 + 1)
    assert [e.key for e in again.journal] == [CANCEL_KEY]
    assert [lease.flow_id for lease in await store.expire_leases(T0 + 1 + TTL + 1, 100)] == ["f1"]
    # Cancelled while PENDING: at once, keeping the first cancellation.
    assert await cancelled(store, "f1", "second", T0 + 20_000) is CancelOutcome.CANCELLED
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.error) == (FlowStatus.CANCELLED, cancellation_failure("first"))
    assert [e.key for e in await store.get_history("f1", 0, 10)] == [CANCEL_KEY]


async def test_suspend_of_a_flow_asked_to_stop(store: Store) -> None:
    grandparent = await claim_one(store, "gp")
    await register(store, child_wait(grandparent, "c", child("parent")), T0)
    parent = await claim_child(store, "parent", T0)
    await store.register_waits(
        [
            WaitRequest("parent", parent.lease_token, "t", EntryKind.TIMER, fire_at=T0),
            WaitRequest("parent", parent.lease_token, "u", EntryKind.TIMER, fire_at=T0 + 99),
        ],
        T0,
    )
    assert await cancelled(store, "parent", "stop", T0 + 1) is CancelOutcome.CANCEL_REQUESTED
    # A satisfied wait wins: the flow still has work to do.
    t = entry(1, "t", EntryKind.TIMER, T0)
    assert await store.suspend_flows([suspend(parent, "t", "u")], T0 + 2) == (
        [SuspendResult(SuspendOutcome.RESUME, (t,))],
        [],
    )
    results, satisfied = await store.suspend_flows([suspend(parent, "u")], T0 + 3)
    assert results == [SuspendResult(SuspendOutcome.CANCELLED)]
    failure = cancellation_failure("stop")
    c = entry(1, "c", EntryKind.CHILD, T0 + 3, FAILED, error=failure)
    assert satisfied == [Satisfied("gp", c, RUNNING, grandparent.lease_token, "s1")]
    record = await store.get_flow("parent")
    assert record is not None
    assert (record.status, record.error, record.lease_owner) == (
        FlowStatus.CANCELLED,
        failure,
        None,
    )
    assert await store.next_timer_at() is None


# --- parking ---------------------------------------------------------------------------------


async def test_park_backs_off_doubling_up_to_the_cap(store: Store) -> None:
    mismatch = Failure(type="HistoryMismatch", message="step renamed", reason="HISTORY_MISMATCH")
    claimed = await claim_one(store, "f1")
    assert await store.record_steps([step(claimed, "a")], T0) == [OK]
    outcomes = await store.park_flows(
        [
            Park("missing", 1, mismatch),
            Park("f1", claimed.lease_token + 1, mismatch),
            Park("f1", claimed.lease_token, mismatch),
            Park("f1", claimed.lease_token, mismatch),
        ],
        T0 + 10,
        1_000,
        5_000,
    )
    assert outcomes == [NOT_FOUND, LEASE_LOST, OK, LEASE_LOST]
    ready: list[int] = []
    now = T0 + 10
    for _ in range(5):
        record = await store.get_flow("f1")
        assert record is not None
        assert (record.status, record.error, record.attempt) == (PENDING, mismatch, 1)
        assert (record.lease_owner, record.lease_expires_at, record.updated_at) == (
            None,
            None,
            now,
        )
        ready.append(record.ready_at - now)
        assert await store.claim_flows("s", ["orders"], 1, now + TTL, record.ready_at - 1) == []
        now = record.ready_at
        (again,) = await store.claim_flows("s", ["orders"], 1, now + TTL, now)
        assert [e.key for e in again.journal] == ["a"]
        assert await store.park_flows(
            [Park("f1", again.lease_token, mismatch)], now, 1_000, 5_000
        ) == [OK]
    assert ready == [1_000, 2_000, 4_000, 5_000, 5_000]
    (again,) = await store.claim_flows("s", ["orders"], 1, T0 + 10**6, T0 + 10**6)
    done = FlowFinish("f1", again.lease_token, FlowStatus.COMPLETED, result=b"fixed")
    assert await finished(store, [done], T0 + 10**6) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.error, record.result) == (FlowStatus.COMPLETED, None, b"fixed")


async def test_park_refuses_negative_delays(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    with pytest.raises(InvalidArgumentError):
        await store.park_flows([Park("f1", claimed.lease_token, BOOM)], T0, -1, 10)
    assert await status_of(store, "f1") is RUNNING
    assert await store.park_flows([], T0, 0, 0) == []


async def test_completed_finish_resets_the_park_count(sqlite_store: SqliteStore) -> None:
    claimed = await claim_one(sqlite_store, "f1")
    await sqlite_store.park_flows([Park("f1", claimed.lease_token, BOOM)], T0, 10, 100)
    (again,) = await sqlite_store.claim_flows("s", ["orders"], 1, T0 + TTL, T0 + 10)
    done = FlowFinish("f1", again.lease_token, FlowStatus.COMPLETED, result=b"")
    assert await finished(sqlite_store, [done], T0 + 11) == [OK]
    with sqlite3.connect(sqlite_store.path) as conn:
        assert conn.execute("SELECT parks, error FROM flows").fetchall() == [(0, None)]
    conn.close()


# --- fencing and arguments -------------------------------------------------------------------


async def test_register_waits_is_fenced(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.schedule_flows([flow("pending")], T0)
    results = await store.register_waits(
        [
            WaitRequest("missing", 1, "t", EntryKind.TIMER, fire_at=T0),
            WaitRequest("f1", claimed.lease_token + 1, "t", EntryKind.TIMER, fire_at=T0),
            WaitRequest("pending", 0, "t", EntryKind.TIMER, fire_at=T0),
            child_wait(
                ClaimedFlow("f1", "orders", b"", claimed.lease_token - 1, 1, None, []),
                "c",
                child(),
            ),
        ],
        T0,
    )
    assert results == [
        WaitResult(NOT_FOUND),
        WaitResult(LEASE_LOST),
        WaitResult(LEASE_LOST),
        WaitResult(LEASE_LOST),
    ]
    assert await store.get_flow("child") is None
    assert await store.next_timer_at() is None
    assert await store.register_waits([], T0) == []


@pytest.mark.parametrize(
    "wait",
    [
        WaitRequest("f1", 1, "", EntryKind.TIMER, fire_at=T0),
        WaitRequest("f1", 1, CANCEL_KEY, EntryKind.TIMER, fire_at=T0),
        WaitRequest("f1", 1, "t", EntryKind.TIMER),
        WaitRequest("f1", 1, "s", EntryKind.SIGNAL),
        WaitRequest("f1", 1, "c", EntryKind.CHILD),
        WaitRequest("f1", 1, "c", EntryKind.CHILD, child=NewFlow("", "kids", b"")),
        WaitRequest("f1", 1, "c", EntryKind.CHILD, child=NewFlow("f1", "kids", b"")),
        WaitRequest("f1", 1, "x", EntryKind.STEP),
        WaitRequest("f1", 1, "x", EntryKind.CANCEL),
    ],
)
async def test_register_waits_refuses_bad_waits(store: Store, wait: WaitRequest) -> None:
    claimed = await claim_one(store, "f1")
    good = timer(claimed, "good", T0 + 10)
    with pytest.raises(InvalidArgumentError):
        await store.register_waits([good, wait], T0)
    # Validation happens before anything is written.
    assert await store.next_timer_at() is None


# --- migration -------------------------------------------------------------------------------


def _create_version_1(path: Path) -> None:
    """A database as the first release left it: schema 1 and some data."""
    from ergon_server.storage.migrate import SCHEMA_VERSION_DDL, load_migrations

    (first, *_) = load_migrations("sqlite")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute(SCHEMA_VERSION_DDL)
        conn.executescript(first.sql)
        conn.execute("INSERT INTO schema_version VALUES (1, '0001_initial.sql')")
        conn.executemany(
            "INSERT INTO flows (flow_id, flow_type, status, input, result, error, attempt, "
            "labels, retry_policy, created_at, updated_at, ready_at, completed_at, lease_token, "
            "lease_owner, lease_expires_at, journal_seq) "
            "VALUES (?, 'orders', ?, ?, ?, NULL, 1, '{\"a\":\"b\"}', NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("run", "RUNNING", b"i1", None, T0, T0, T0, None, 3, "s1", T0 + TTL, 2),
                ("done", "COMPLETED", b"i2", b"out", T0, T0 + 5, T0, T0 + 5, 1, None, None, 0),
                ("wait", "PENDING", b"i3", None, T0, T0, T0 + 50, None, 0, None, None, 0),
            ],
        )
        conn.executemany(
            "INSERT INTO journal VALUES ('run', ?, ?, 'STEP', 'COMPLETED', ?, NULL, 1, 'h', ?)",
            [("a", 1, b"ra", T0 + 1), ("b", 2, b"rb", T0 + 2)],
        )
        conn.execute("INSERT INTO request_ids VALUES ('req', 'done')")
        conn.execute(
            "INSERT INTO signals (flow_id, name, sequence, payload, request_id, created_at) "
            "VALUES ('run', 'go', 1, x'01', 'sig-1', ?)",
            (T0,),
        )
        conn.execute("INSERT INTO flow_types VALUES ('orders', ?)", (T0,))
        conn.commit()
    finally:
        conn.close()


async def test_sqlite_upgrades_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "old" / "ergon.db"
    _create_version_1(path)
    store = SqliteStore(str(path))
    await store.open()
    try:
        with sqlite3.connect(path) as conn:
            versions = conn.execute("SELECT version, name FROM schema_version").fetchall()
        conn.close()
        assert versions == [
            (1, "0001_initial.sql"),
            (2, "0002_waits.sql"),
            (3, "0003_open_waits.sql"),
        ]
        record = await store.get_flow("run")
        assert record is not None
        assert (record.status, record.lease_token, record.lease_owner, record.labels) == (
            RUNNING,
            3,
            "s1",
            {"a": "b"},
        )
        assert (record.parent_flow_id, record.cancel_requested) == (None, False)
        done = await store.get_flow("done")
        assert done is not None
        assert (done.status, done.result, done.completed_at) == (
            FlowStatus.COMPLETED,
            b"out",
            T0 + 5,
        )
        history = await store.get_history("run", 0, 10)
        assert [(e.sequence, e.key, e.result) for e in history] == [
            (1, "a", b"ra"),
            (2, "b", b"rb"),
        ]
        assert await store.known_flow_types(["orders"]) == {"orders"}
        assert await store.schedule_flows([flow("x", request_id="req")], T0) == [
            ScheduleResult("done", EXISTING)
        ]
        assert await store.send_signal("run", "go", b"", "sig-1", T0) == SignalResult(
            SignalOutcome.DELIVERED, 1
        )
        # The old rows work with the new verbs; sequences carry on.
        run = ClaimedFlow("run", "orders", b"i1", 3, 1, None, [])
        assert await store.record_steps([step(run, "c")], T0 + 3) == [OK]
        result = await register(store, signal_wait(run, "w", "go"), T0 + 4)
        assert result == WaitResult(OK, entry(4, "w", EntryKind.SIGNAL, T0 + 4, result=b"\x01"))
        assert await register(store, timer(run, "t", T0 + 100), T0 + 4) == WaitResult(
            OK, None, T0 + 100
        )
        assert await cancelled(store, "run", "stop", T0 + 5) is CancelOutcome.CANCEL_REQUESTED
        assert [e.sequence for e in await store.get_history("run", 0, 10)] == [1, 2, 3, 4, 5]
        assert await store.suspend_flows([suspend(run, "t")], T0 + 6) == (
            [SuspendResult(SuspendOutcome.CANCELLED)],
            [],
        )
        assert await store.next_timer_at() is None
        assert await cancelled(store, "wait", "stop", T0 + 7) is CancelOutcome.CANCELLED
    finally:
        await store.close()


# --- SQLite plans ----------------------------------------------------------------------------


async def test_sqlite_wait_statements_use_their_indexes(sqlite_store: SqliteStore) -> None:
    from ergon_server.storage import sqlite as module

    def plan(sql: str, params: tuple[object, ...]) -> str:
        conn = sqlite3.connect(sqlite_store.path)
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        finally:
            conn.close()
        return " | ".join(str(row[3]) for row in rows)

    due = plan(
        f"SELECT {module._WAIT_COLUMNS} FROM waits AS w INDEXED BY waits_timers "
        "WHERE w.status = 'OPEN' AND w.kind = 'TIMER' AND w.fire_at <= ? "
        "ORDER BY w.fire_at, w.flow_id, w.key LIMIT ?",
        (T0, 10),
    )
    assert "USING INDEX waits_timers" in due, due
    assert "TEMP B-TREE" not in due, due
    earliest = plan("SELECT MIN(fire_at) FROM waits WHERE status = 'OPEN' AND kind = 'TIMER'", ())
    assert "waits_timers" in earliest, earliest
    signals = plan(
        f"SELECT {module._WAIT_COLUMNS} FROM waits AS w WHERE w.flow_id = ? "
        "AND w.signal_name = ? AND w.status = 'OPEN' AND w.kind = 'SIGNAL' "
        "ORDER BY w.created_at, w.key",
        ("f", "go"),
    )
    assert "USING INDEX waits_signals" in signals, signals
    assert "TEMP B-TREE" not in signals, signals
    children = plan(
        f"SELECT {module._WAIT_COLUMNS} FROM waits AS w WHERE w.kind = 'CHILD' "
        "AND w.status <> 'SATISFIED' AND w.child_flow_id IN (?, ?)",
        ("a", "b"),
    )
    assert "USING INDEX waits_children" in children, children
    unconsumed = plan(
        "SELECT rowid FROM signals WHERE flow_id = ? AND name = ? AND consumed_at IS NULL "
        "ORDER BY sequence LIMIT 1",
        ("f", "go"),
    )
    assert "signals_unconsumed" in unconsumed, unconsumed
    assert "TEMP B-TREE" not in unconsumed, unconsumed
    state = plan(module._STATE_SQL.format(marks="?"), ("f",))
    assert "SCAN" not in state, state
    assert "SEARCH w USING INDEX waits_open (flow_id=?)" in state, state
    for sql in (module._OPEN_WAITS, module._CANCEL_OPEN_WAITS):
        detail = plan(sql, ("f",))
        assert "SEARCH w USING INDEX waits_open (flow_id=?)" in detail or (
            "SEARCH waits USING INDEX waits_open (flow_id=?)" in detail
        ), detail
    pairs = [("f", "a"), ("g", "b")]
    for select, alias in (
        (f"SELECT {module._WAIT_COLUMNS} FROM {{pairs}} JOIN waits AS w", "w"),
        (f"SELECT j.flow_id, {module.JOURNAL_ROW} FROM {{pairs}} JOIN journal AS j", "j"),
    ):
        lookup = plan(module._by_pairs(select, alias, pairs), ("f", "a", "g", "b"))
        assert f"SEARCH {alias} USING INDEX sqlite_autoindex" in lookup, lookup
        assert f"SCAN {alias}" not in lookup, lookup


async def test_history_gives_each_timer_its_due_time(store: Store) -> None:
    a = await claim_one(store, "a")
    assert await store.record_steps([step(a, "s#1")], T0) == [OK]
    await register(store, timer(a, "t#1", T0 + 50), T0)
    await register(store, timer(a, "t#2", T0 + 500), T0)
    await store.fire_timers(T0 + 70, 10)
    history = await store.get_history("a", 0, 10)
    # Fired at 70 for 50; the open one is not in the journal yet; a step has no due time.
    assert [(e.key, e.due_at, e.recorded_at) for e in history] == [
        ("s#1", None, T0),
        ("t#1", T0 + 50, T0 + 70),
    ]
