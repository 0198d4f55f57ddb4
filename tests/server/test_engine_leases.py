"""Leases in the engine, driven by a manual clock on every backend."""

from __future__ import annotations

import pytest

from ergon_server.clock import ManualClock
from ergon_server.engine import Engine, EngineConfig
from ergon_server.engine.sessions import AckOut, HeartbeatIn, RevokeOut, Session
from ergon_server.errors import StoreUnavailableError
from ergon_server.model import FlowStatus, NewFlow
from ergon_server.storage.base import Store

TTL_MS = 15_000


async def test_an_expiry_scan_re_queues_every_expired_lease_a_batch_at_a_time(
    store: Store,
) -> None:
    clock = ManualClock()
    config = EngineConfig(allow_unregistered_flow_types=True, lease_ttl_ms=TTL_MS)
    engine = Engine(store, clock, config)
    await engine.schedule_flows([NewFlow(f"f{i}", "T", b"") for i in range(7)])
    session, _ = await engine.open_session("w", ["T"], 10, 1, [])
    claimed = await store.claim_flows(
        session.session_id, ["T"], 10, clock.now_ms() + TTL_MS, clock.now_ms()
    )
    for flow in claimed:
        engine.dispatcher.adopt(session, flow.flow_id, flow.lease_token)
    await engine.schedule_flows([NewFlow("late", "T", b"")])
    now = clock.now_ms()
    (late,) = await store.claim_flows("other", ["T"], 1, now + 2 * TTL_MS, now)
    clock.advance(TTL_MS + 1)
    # Seven expired, three at a time: one scan takes them all, and leaves the live one.
    assert await engine.expire_leases(limit=3) == 7
    revoked = [e for e in await session.next_batch() if isinstance(e, RevokeOut)]
    assert sorted(e.flow_id for e in revoked) == sorted(f.flow_id for f in claimed)
    assert session.held == {}
    page = await store.list_flows([], None, 100, None)
    assert {r.flow_id: r.status for r in page.flows} == {
        **{f.flow_id: FlowStatus.PENDING for f in claimed},
        "late": FlowStatus.RUNNING,
    }
    assert late.flow_id == "late"
    assert await engine.expire_leases(limit=3) == 0


def heartbeating_engine(store: Store, clock: ManualClock) -> Engine:
    """An engine on `store` and `clock` whose workers heartbeat every 5 s."""
    config = EngineConfig(
        allow_unregistered_flow_types=True, lease_ttl_ms=TTL_MS, heartbeat_interval_ms=5_000
    )
    return Engine(store, clock, config)


async def heartbeat_refused(engine: Engine, session: Session, clock: ManualClock, seq: int) -> None:
    """5 s on, the session's heartbeat, refused: the store is down."""
    clock.advance(5_000)
    await engine.handle_worker_events(session, [HeartbeatIn(seq)])
    (ack,) = await session.next_batch()
    assert isinstance(ack, AckOut) and ack.reason == "STORE_UNAVAILABLE", ack


async def test_after_a_store_outage_live_workers_keep_their_leases(store: Store) -> None:
    """Heartbeats could not renew leases while the store was down: that expires none."""
    clock = ManualClock()
    engine = heartbeating_engine(store, clock)
    await engine.schedule_flows([NewFlow("f1", "T", b""), NewFlow("f2", "T", b"")])
    session, _ = await engine.open_session("w", ["T"], 1, 1, [])
    now = clock.now_ms()
    (mine,) = await store.claim_flows(session.session_id, ["T"], 1, now + TTL_MS, now)
    engine.dispatcher.adopt(session, mine.flow_id, mine.lease_token)
    # Leased to a session of another replica, whose worker renews it through that replica.
    (theirs,) = await store.claim_flows("elsewhere", ["T"], 1, now + TTL_MS, now)
    await store.close()
    # Down for two lease TTLs; the worker heartbeats all along, and every renewal fails.
    for seq in range(1, 8):
        await heartbeat_refused(engine, session, clock, seq)
    with pytest.raises(StoreUnavailableError):
        await engine.scan_expired_leases()
    await store.open()
    back = clock.now_ms()

    async def statuses() -> dict[str, FlowStatus]:
        page = await store.list_flows([], None, 10, None)
        return {record.flow_id: record.status for record in page.flows}

    # The first scan renews the live session's leases here, and expires none for a TTL:
    # the other replica's worker renews its own meanwhile.
    await engine.scan_expired_leases()
    record = await store.get_flow(mine.flow_id)
    assert record is not None
    assert (record.lease_token, record.lease_expires_at) == (mine.lease_token, back + TTL_MS)
    clock.advance(TTL_MS - 1)
    await engine.scan_expired_leases()
    assert await statuses() == {"f1": FlowStatus.RUNNING, "f2": FlowStatus.RUNNING}
    # Past the grace, leases nobody renewed expire as usual.
    clock.advance(1)
    await engine.scan_expired_leases()
    assert await statuses() == {
        mine.flow_id: FlowStatus.RUNNING,
        theirs.flow_id: FlowStatus.PENDING,
    }
    clock.advance(1)
    await engine.scan_expired_leases()
    assert await statuses() == {"f1": FlowStatus.PENDING, "f2": FlowStatus.PENDING}
    assert session.held == {}


async def test_a_lease_that_ran_out_before_an_outage_expires_in_the_grace_after_it(
    store: Store,
) -> None:
    """The grace after an outage is for leases the outage kept from renewing, not for a worker
    that was already gone: else outages recurring within a TTL would keep its flows forever."""
    clock = ManualClock()
    engine = heartbeating_engine(store, clock)
    await engine.schedule_flows([NewFlow("dead", "T", b""), NewFlow("live", "T", b"")])
    session, _ = await engine.open_session("w", ["T"], 1, 1, [])
    now = clock.now_ms()
    (gone,) = await store.claim_flows("gone", ["T"], 1, now + TTL_MS, now)
    clock.advance(TTL_MS + 1)  # the dead worker's lease has run out; nobody scanned yet
    now = clock.now_ms()
    (mine,) = await store.claim_flows(session.session_id, ["T"], 1, now + TTL_MS, now)
    engine.dispatcher.adopt(session, mine.flow_id, mine.lease_token)
    await store.close()
    await heartbeat_refused(engine, session, clock, 1)
    await store.open()
    await engine.scan_expired_leases()
    dead, live = await store.get_flow(gone.flow_id), await store.get_flow(mine.flow_id)
    assert dead is not None and live is not None
    assert (dead.status, live.status) == (FlowStatus.PENDING, FlowStatus.RUNNING)
