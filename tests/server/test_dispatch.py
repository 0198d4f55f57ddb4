"""The dispatcher on a real store: claims only when they can find work or room for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ergon_server.clock import SystemClock
from ergon_server.engine import Engine, EngineConfig
from ergon_server.engine.sessions import (
    AckOut,
    AssignmentOut,
    FlowFinishIn,
    HeartbeatIn,
    RevokeOut,
    ServerEventOut,
    Session,
    StepResultIn,
)
from ergon_server.errors import StoreUnavailableError
from ergon_server.model import (
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    FlowFinish,
    FlowStatus,
    NewFlow,
    StepRecord,
)
from ergon_server.storage.base import Store
from tests.support.processes import eventually


@pytest.fixture
async def engine(store: Store) -> AsyncIterator[Engine]:
    engine = Engine(store, SystemClock(), EngineConfig(allow_unregistered_flow_types=True))
    await engine.start()
    yield engine
    await engine.shutdown()


def count_claims(store: Store) -> list[int]:
    """Count the store's claims (what each found) from here on."""
    found: list[int] = []
    claim: Callable[..., Awaitable[list[ClaimedFlow]]] = store.claim_flows

    async def counted(*args: Any, **kwargs: Any) -> list[ClaimedFlow]:
        flows = await claim(*args, **kwargs)
        found.append(len(flows))
        return flows

    store.claim_flows = counted  # type: ignore[method-assign]
    return found


async def assigned(session: Session) -> list[ClaimedFlow]:
    async with asyncio.timeout(5):
        batch = await session.next_batch()
    return [e.flow for e in batch if isinstance(e, AssignmentOut)]


async def complete(engine: Engine, session: Session, flow: ClaimedFlow, seq: int) -> None:
    finish = FlowFinish(flow.flow_id, flow.lease_token, FlowStatus.COMPLETED, result=b"{}")
    await engine.handle_worker_events(session, [FlowFinishIn(seq, finish)])


async def test_a_flow_ending_on_a_worker_with_nothing_left_to_claim_costs_no_claim(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 4, 1, [])
    await engine.schedule_flows([NewFlow("f1", "T", b"{}")])
    (flow,) = await assigned(session)
    claims = count_claims(store)
    await complete(engine, session, flow, 1)
    (ack,) = await session.next_batch()
    assert isinstance(ack, AckOut) and ack.code == 0
    await asyncio.sleep(0.2)
    # The worker had room and nothing to fill it with: the freed slot changes neither.
    assert claims == []
    # New work still goes out at once.
    await engine.schedule_flows([NewFlow("f2", "T", b"{}")])
    (second,) = await assigned(session)
    assert second.flow_id == "f2" and claims[0] == 1


async def test_a_flow_ending_on_a_full_worker_lets_the_next_flow_in(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 1, 1, [])
    await engine.schedule_flows([NewFlow("f1", "T", b"{}"), NewFlow("f2", "T", b"{}")])
    (first,) = await assigned(session)
    claims = count_claims(store)
    await complete(engine, session, first, 1)
    async with asyncio.timeout(5):
        batch = list(await session.next_batch())
        while not any(isinstance(e, AssignmentOut) for e in batch):
            batch += await session.next_batch()
    (second,) = [e.flow for e in batch if isinstance(e, AssignmentOut)]
    assert second.flow_id == "f2" and claims[0] == 1


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
async def test_a_flow_goes_to_its_worker_before_its_scheduler_hears_back(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 4, 1, [])
    await asyncio.sleep(0.2)  # the session's first pass
    # The schedule and the claim it wakes share one group commit; the worker is on the
    # flow's critical path, the scheduler is not.
    await engine.schedule_flows([NewFlow("f1", "T", b"{}")])
    assert "f1" in session.held


async def test_an_assignment_leaves_before_the_dispatchers_next_read(
    engine: Engine, store: Store
) -> None:
    # Room for 8: a pass asks for 2 flows at a time, so finding 1 ends it.
    session, _ = await engine.open_session("w", ["T"], 8, 1, [])
    await asyncio.sleep(0.2)  # the session's first pass
    taken: list[ServerEventOut] = []

    async def stream() -> None:
        while batch := await session.next_batch():
            taken.extend(batch)

    writer = asyncio.create_task(stream())
    seen_by_read: list[int] = []
    read = asyncio.Event()
    next_ready_at = store.next_ready_at

    async def spied(flow_types: Any) -> int | None:
        seen_by_read.append(len(taken))
        read.set()
        return await next_ready_at(flow_types)

    store.next_ready_at = spied  # type: ignore[method-assign]
    try:
        # The worker has room for more than there is: the pass ends by asking the store when
        # the next flow is due, a read the stream's write should not wait behind.
        await engine.schedule_flows([NewFlow("f1", "T", b"{}")])
        async with asyncio.timeout(5):
            await read.wait()
        assert seen_by_read[0] == 1, "the assignment was still queued when the read began"
    finally:
        session.close()
        await writer


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
async def test_a_flows_end_reaches_its_waiters_before_the_acks_committed_with_it(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 4, 1, [])
    await engine.schedule_flows([NewFlow("f1", "T", b"{}")])
    (flow,) = await assigned(session)
    order: list[str] = []
    send, notify = session.send, engine._notify

    def sent(event: ServerEventOut) -> None:
        order.append(f"ack {event.seq}" if isinstance(event, AckOut) else type(event).__name__)
        send(event)

    def notified(flow_id: str) -> None:
        order.append(f"end of {flow_id}")
        notify(flow_id)

    session.send = sent  # type: ignore[method-assign]
    engine._notify = notified  # type: ignore[method-assign]
    # The worker's last step and the flow's end, in one message and so one group commit.
    step = StepRecord(
        flow.flow_id, flow.lease_token, "last", EntryKind.STEP, "h", 1, EntryStatus.COMPLETED, b"1"
    )
    finish = FlowFinish(flow.flow_id, flow.lease_token, FlowStatus.COMPLETED, result=b"{}")
    await engine.handle_worker_events(session, [StepResultIn(1, step), FlowFinishIn(2, finish)])
    # A client waiting on the flow is on the latency's critical path; the worker's acks are not.
    assert order == ["end of f1", "ack 2", "ack 1"]


async def test_an_expired_lease_is_revoked_only_from_its_own_holder(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 4, 1, [])
    await engine.schedule_flows([NewFlow("f1", "T", b"{}")])
    (flow,) = await assigned(session)
    # An older lease on f1 expired, and a claim in the same group commit (it resolves first)
    # has already given the flow to this session under a newer token: that lease stays.
    engine.dispatcher.revoke("f1", "LEASE_EXPIRED", flow.lease_token - 1)
    assert session.held == {"f1": flow.lease_token}
    engine.dispatcher.revoke("f1", "LEASE_EXPIRED", flow.lease_token)
    assert "f1" not in session.held
    (revoke,) = await session.next_batch()
    assert isinstance(revoke, RevokeOut) and revoke.lease_token == flow.lease_token


async def test_a_failed_give_back_for_a_gone_worker_does_not_strand_the_others_flows(
    engine: Engine, store: Store
) -> None:
    gone, _ = await engine.open_session("gone", ["T"], 1, 1, [])
    staying, _ = await engine.open_session("staying", ["T"], 1, 1, [])
    await asyncio.sleep(0.2)  # their first passes
    claim, release = store.claim_flows, store.release_flows
    failures = [StoreUnavailableError("the store blinked")]

    async def claim_then_leave(session_id: str, *args: Any) -> list[ClaimedFlow]:
        flows = await claim(session_id, *args)
        if session_id == gone.session_id:
            engine.close_session(gone)  # its worker left while the claim was in flight
        return flows

    async def release_failing_once(*args: Any) -> list[Any]:
        if failures:
            raise failures.pop()
        return await release(*args)

    store.claim_flows = claim_then_leave  # type: ignore[method-assign]
    store.release_flows = release_failing_once  # type: ignore[method-assign]
    # One pass claims for both: the gone worker's flow cannot be given back this time.
    await engine.schedule_flows([NewFlow("f1", "T", b"{}"), NewFlow("f2", "T", b"{}")])
    (flow,) = await assigned(staying)
    assert not failures and flow.flow_id in ("f1", "f2")


async def test_flows_handed_to_a_session_that_closes_before_writing_them_go_back_at_once(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 4, 1, [])
    await engine.schedule_flows([NewFlow("f1", "T", b"{}")])
    await eventually(lambda: "f1" in session.held, what="f1 handed over")
    # The stream ends before its writer took the assignment: the worker never saw f1.
    engine.close_session(session)

    async def pending_again() -> bool:
        record = await store.get_flow("f1")
        return record is not None and record.status is FlowStatus.PENDING

    # Not after the lease TTL (15 s by default): at once.
    await eventually(pending_again, within=5, what="f1 given back")


async def test_a_heartbeat_renews_only_the_leases_its_worker_runs(
    engine: Engine, store: Store
) -> None:
    session, _ = await engine.open_session("w", ["T"], 8, 1, [])
    await engine.schedule_flows([NewFlow("f1", "T", b"{}"), NewFlow("f2", "T", b"{}")])
    await eventually(lambda: len(session.held) == 2, what="both handed over")
    # The server lost track of f2 on this session (its worker never heard of it, say): the
    # worker's heartbeats must not keep that lease alive, or f2 would wait for ever.
    engine.dispatcher.forget("f2")
    renewed: list[list[str] | None] = []
    renew = store.renew_leases

    async def spied(session_id: str, expires_at: int, flow_ids: Any = None) -> int:
        renewed.append(None if flow_ids is None else list(flow_ids))
        return await renew(session_id, expires_at, flow_ids)

    store.renew_leases = spied  # type: ignore[method-assign]
    await engine.handle_worker_events(session, [HeartbeatIn(1)])
    assert renewed == [["f1"]]
