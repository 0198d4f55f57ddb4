"""PostgreSQL's own machinery: replicas sharing one database, LISTEN/NOTIFY, migrations, errors.

The conformance suite (test_conformance.py, test_waits.py) runs on PostgreSQL through the
`postgres` backend of conftest.py; these tests cover what only a shared database has: two store
instances (two pools, as two server replicas would have) racing on the same rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ergon_server.errors import SchemaVersionError, StoreError, StoreUnavailableError
from ergon_server.model import (
    CANCEL_KEY,
    ClaimedFlow,
    EntryKind,
    FlowFinish,
    FlowStatus,
    Lease,
    NewFlow,
    ScheduleResult,
    SignalOutcome,
    StoreEvent,
    StoreEventKind,
    SuspendOutcome,
    SuspendRequest,
    WaitRequest,
)
from ergon_server.storage import create_store
from ergon_server.storage.memory import MemoryStore
from ergon_server.storage.migrate import load_migrations
from ergon_server.storage.postgres import (
    _CANCEL_OPEN_WAITS,
    _EXPIRE,
    _OPEN_WAITS,
    _STATE_SQL,
    PostgresStore,
    _batch_flows,
    _ClaimFlows,
    _decode_events,
    _encode_events,
    _literal,
    _RenewLeases,
    _translate,
)
from tests.storage.support import (
    CREATED,
    EXISTING,
    LEASE_LOST,
    OK,
    T0,
    TTL,
    claim_one,
    flow,
    lease,
    step,
)
from tests.support import postgres as pg
from tests.support.processes import eventually

READY = StoreEventKind.READY


@pytest.fixture
async def dsn(postgres_database: str) -> AsyncIterator[str]:
    """A schema of the test's own in the session's database."""
    async with pg.temporary_schema(postgres_database) as url:
        yield url


def replica(dsn: str, application_name: str = "ergon-test") -> PostgresStore:
    settings = {"application_name": application_name}
    return PostgresStore(dsn, min_size=1, max_size=4, server_settings=settings)


# Ends the sessions of one application (the tests share a database, one schema each).
TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = $1 AND query LIKE $2 AND pid <> pg_backend_pid()"
)


@pytest.fixture
async def replicas(dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two store instances on one database, as two server processes would have."""
    first, second = replica(dsn), replica(dsn)
    await asyncio.gather(first.open(), second.open())
    try:
        yield first, second
    finally:
        await asyncio.gather(first.close(), second.close())


class Events:
    """A subscriber that can wait for the event it expects."""

    def __init__(self) -> None:
        self.seen: list[StoreEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: StoreEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    async def wait_for(self, wanted: Callable[[StoreEvent], bool]) -> None:
        async with asyncio.timeout(10.0):
            while not any(wanted(event) for event in self.seen):
                self._changed.clear()
                await self._changed.wait()


# --- replicas --------------------------------------------------------------------------------


async def test_two_replicas_never_claim_the_same_flow(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    total = 1_000
    for start in range(0, total, 250):
        await first.schedule_flows([flow(f"f{i:04d}") for i in range(start, start + 250)], T0)
    rng = random.Random(5)

    async def claimer(store: PostgresStore, session: str) -> list[ClaimedFlow]:
        mine: list[ClaimedFlow] = []
        while True:
            batch = await store.claim_flows(session, ["orders"], rng.randrange(1, 8), T0 + TTL, T0)
            if not batch:
                # SKIP LOCKED may pass over rows the other replica is claiming right now.
                if await store.next_ready_at(["orders"]) is None:
                    return mine
                continue
            mine += batch

    claims = await asyncio.gather(
        *(
            claimer(store, f"{name}{i}")
            for name, store in (("a", first), ("b", second))
            for i in range(8)
        )
    )
    claimed = [c.flow_id for batch in claims for c in batch]
    assert len(claimed) == len(set(claimed)) == total
    assert all(c.lease_token == 1 for batch in claims for c in batch)
    # Both replicas got work, and each flow is leased to the session that claimed it.
    assert sum(len(batch) for batch in claims[:8]) > 0
    assert sum(len(batch) for batch in claims[8:]) > 0
    owners = {c.flow_id: f"{'ab'[i // 8]}{i % 8}" for i, batch in enumerate(claims) for c in batch}
    page = await second.list_flows([], None, total + 1, None)
    assert {r.flow_id: r.lease_owner for r in page.flows} == owners
    assert {r.status for r in page.flows} == {FlowStatus.RUNNING}


async def test_two_replicas_fire_each_timer_once(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    count = 200
    await first.schedule_flows([flow(f"f{i:03d}") for i in range(count)], T0)
    claimed = await first.claim_flows("s", ["orders"], count, T0 + TTL, T0)
    timers = [
        WaitRequest(c.flow_id, c.lease_token, key, EntryKind.TIMER, fire_at=T0 + 10 + i % 7)
        for i, c in enumerate(claimed)
        for key in ("t1", "t2")
    ]
    assert all(r.entry is None for r in await first.register_waits(timers, T0))
    # Half of the flows give their slot back: their timer must wake them.
    suspends = [SuspendRequest(c.flow_id, c.lease_token, ("t1", "t2")) for c in claimed[::2]]
    results, _ = await first.suspend_flows(suspends, T0)
    assert {r.outcome for r in results} == {SuspendOutcome.SUSPENDED}

    async def firer(store: PostgresStore) -> list[tuple[str, str]]:
        fired: list[tuple[str, str]] = []
        while True:
            batch = await store.fire_timers(T0 + 20, 7)
            fired += [(s.flow_id, s.entry.key) for s in batch]
            if not batch and await store.next_timer_at() is None:
                return fired

    rounds = await asyncio.gather(*(firer(store) for store in (first, second) for _ in range(3)))
    fired = [pair for batch in rounds for pair in batch]
    assert len(fired) == len(set(fired)) == 2 * count
    assert sum(len(batch) for batch in rounds[3:]) > 0, "the second replica fired nothing"
    for c in claimed[:20]:
        history = await second.get_history(c.flow_id, 0, 10)
        assert sorted(e.key for e in history) == ["t1", "t2"]
        assert {e.kind for e in history} == {EntryKind.TIMER}
    page = await second.list_flows([FlowStatus.WAITING], None, 10, None)
    assert page.flows == []


async def test_schedules_racing_across_replicas_answer_as_memory_would(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    for round_number in range(40):
        same = f"same{round_number}"
        differ = f"differ{round_number}"
        request = f"req{round_number}"
        results = await asyncio.gather(
            first.schedule_flows([flow(same), flow(differ, data=b"one")], T0),
            second.schedule_flows([flow(same), flow(differ, data=b"two")], T0),
            first.schedule_flows([flow(f"a{round_number}", request_id=request)], T0),
            second.schedule_flows([flow(f"b{round_number}", request_id=request)], T0),
        )
        (a_same, a_differ), (b_same, b_differ), (a_req,), (b_req,) = results
        assert sorted([a_same.outcome.value, b_same.outcome.value]) == ["created", "existing"]
        assert sorted([a_differ.outcome.value, b_differ.outcome.value]) == ["conflict", "created"]
        # One request id, two flow ids: exactly one flow is created, both answers name it.
        assert sorted([a_req.outcome.value, b_req.outcome.value]) == ["created", "existing"]
        assert a_req.flow_id == b_req.flow_id
        loser = f"b{round_number}" if a_req.flow_id == f"a{round_number}" else f"a{round_number}"
        assert await first.get_flow(loser) is None


async def test_fencing_holds_across_replicas(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    await first.schedule_flows([flow("f1")], T0)
    (claimed,) = await first.claim_flows("s1", ["orders"], 1, T0 + TTL, T0)
    assert await first.record_steps([step(claimed, "a")], T0) == [OK]
    # The other replica re-queues the expired lease and a worker of its own claims the flow.
    assert await second.expire_leases(T0 + TTL + 1, 100) == [Lease("f1", claimed.lease_token)]
    (again,) = await second.claim_flows("s2", ["orders"], 1, T0 + 2 * TTL, T0 + TTL + 1)
    assert again.lease_token == claimed.lease_token + 1
    assert await first.record_steps([step(claimed, "b")], T0 + TTL + 2) == [LEASE_LOST]
    finish = FlowFinish("f1", claimed.lease_token, FlowStatus.COMPLETED, result=b"")
    assert (await first.finish_flows([finish], T0 + TTL + 2))[0] == [LEASE_LOST]
    assert await second.record_steps([step(again, "b")], T0 + TTL + 2) == [OK]
    assert [e.key for e in await first.get_history("f1", 0, 10)] == ["a", "b"]


async def test_signals_from_two_replicas_queue_in_one_mailbox(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    await first.schedule_flows([flow("f1")], T0)
    sends = [
        store.send_signal("f1", "go", f"{name}{i}".encode(), f"{name}{i}", T0)
        for i in range(40)
        for name, store in (("a", first), ("b", second))
    ]
    results = await asyncio.gather(*sends)
    assert {r.outcome for r in results} == {SignalOutcome.DELIVERED}
    assert sorted(r.sequence for r in results) == list(range(1, 81))
    # A retried send (same request id) from the other replica appends nothing.
    again = await second.send_signal("f1", "go", b"a0", "a0", T0)
    assert again.sequence == results[0].sequence


async def test_children_ending_while_parents_register_are_never_lost(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A child ended on one replica while its parent registers the wait on the other."""
    first, second = replicas
    count = 60
    await first.schedule_flows([flow(f"p{i:02d}", "parents") for i in range(count)], T0)
    await second.schedule_flows([flow(f"c{i:02d}", "kids") for i in range(count)], T0)
    parents = await first.claim_flows("p", ["parents"], count, T0 + TTL, T0)
    kids = {c.flow_id: c for c in await second.claim_flows("k", ["kids"], count, T0 + TTL, T0)}

    async def parent(claimed: ClaimedFlow) -> None:
        child = NewFlow(claimed.flow_id.replace("p", "c"), "kids", b"input")
        wait = WaitRequest(claimed.flow_id, claimed.lease_token, "c", EntryKind.CHILD, child=child)
        await first.register_waits([wait], T0 + 1)
        await first.suspend_flows(
            [SuspendRequest(claimed.flow_id, claimed.lease_token, ("c",))], T0 + 1
        )

    async def child(claimed: ClaimedFlow) -> None:
        end = FlowFinish(claimed.flow_id, claimed.lease_token, FlowStatus.COMPLETED, result=b"k")
        await second.finish_flows([end], T0 + 1)

    jobs = [parent(p) for p in parents] + [child(k) for k in kids.values()]
    random.Random(3).shuffle(jobs)
    await asyncio.gather(*jobs)
    for p in parents:
        entry = await second.get_entry(p.flow_id, "c")
        assert entry is not None and entry.result == b"k", p.flow_id
        record = await second.get_flow(p.flow_id)
        assert record is not None
        # Woken (PENDING) or still running with the entry (the suspend answered RESUME).
        assert record.status in (FlowStatus.PENDING, FlowStatus.RUNNING), p.flow_id


@pytest.fixture
async def repeatable_read_dsn() -> AsyncIterator[str]:
    """A database whose sessions default to REPEATABLE READ (a setting the store must not need)."""
    async with pg.temporary_database("ergon_rr") as url:
        name = urlsplit(url).path.lstrip("/")
        await pg.execute(
            url, f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
        )
        yield url


# Sessions of one application waiting for a lock.
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = $1 AND wait_event_type = 'Lock'"
)


async def _waiting_for_a_lock(dsn: str, application_name: str) -> None:
    await eventually(
        lambda: _fetch_value(dsn, LOCK_WAITERS, application_name),
        within=10.0,
        interval=0.01,
        what=f"{application_name} waits for a lock",
    )


async def test_a_signal_sent_while_a_wait_waits_for_the_lock_is_not_lost_at_repeatable_read(
    repeatable_read_dsn: str,
) -> None:
    """One replica's signal commits while the other's wait is queued for the flow's lock.

    The wait's transaction started (and, at REPEATABLE READ, took its snapshot) before the
    signal committed; reading the mailbox after the lock must still find it, as the calls made
    one after the other on any store would.
    """
    dsn = repeatable_read_dsn
    assert await _fetch_value(dsn, "SHOW default_transaction_isolation") == "repeatable read"
    waiter, sender = replica(dsn, "ergon-rr-waiter"), replica(dsn, "ergon-rr-sender")
    holder: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        await waiter.open()
        await sender.open()
        claimed = await claim_one(waiter, "f1")
        wait = WaitRequest("f1", claimed.lease_token, "sig", EntryKind.SIGNAL, signal_name="go")
        # A third session holds the flow's row lock, so the two queue behind it in a known
        # order: first the signal, then the wait.
        locked = holder.transaction()
        await locked.start()
        await holder.execute("SELECT 1 FROM flows WHERE flow_id = 'f1' FOR UPDATE")
        sending = asyncio.create_task(sender.send_signal("f1", "go", b"payload", "r1", T0 + 1))
        await _waiting_for_a_lock(dsn, "ergon-rr-sender")
        registering = asyncio.create_task(waiter.register_waits([wait], T0 + 2))
        await _waiting_for_a_lock(dsn, "ergon-rr-waiter")
        await locked.commit()
        sent, (registered,) = await asyncio.gather(sending, registering)
    finally:
        await holder.close()
        await asyncio.gather(waiter.close(), sender.close())
    # The same calls, one after the other, on the memory store.
    memory = MemoryStore()
    await memory.open()
    expected_claim = await claim_one(memory, "f1")
    expected_sent = await memory.send_signal("f1", "go", b"payload", "r1", T0 + 1)
    (expected,) = await memory.register_waits(
        [dataclasses.replace(wait, lease_token=expected_claim.lease_token)], T0 + 2
    )
    await memory.close()
    assert sent == expected_sent
    assert registered == expected
    assert registered.entry is not None and registered.entry.result == b"payload"


async def _fetch_value(dsn: str, sql: str, *args: object) -> Any:
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


# --- notifications ---------------------------------------------------------------------------


async def test_notifications_reach_the_other_replica(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    events = Events()
    await second.subscribe(events)
    await first.schedule_flows([flow("f1")], T0)
    await events.wait_for(lambda e: e.kind is READY)

    (claimed,) = await first.claim_flows("s1", ["orders"], 1, T0 + TTL, T0)
    wait = WaitRequest("f1", claimed.lease_token, "sig", EntryKind.SIGNAL, signal_name="go")
    await first.register_waits([wait], T0)
    timer = WaitRequest("f1", claimed.lease_token, "later", EntryKind.TIMER, fire_at=T0 + 50)
    await first.register_waits([timer], T0)
    await events.wait_for(lambda e: e.kind is StoreEventKind.TIMER)
    # The signal is sent through the first replica; the holder's replica must hear of it.
    result = await first.send_signal("f1", "go", b"payload", "", T0 + 1)
    assert result.satisfied is not None
    wakeup = StoreEvent(StoreEventKind.WAKEUP, "f1", claimed.lease_token, "sig")
    await events.wait_for(lambda e: e == wakeup)

    await first.cancel_flow("f1", "stop", T0 + 2)
    requested = StoreEvent(StoreEventKind.CANCEL_REQUESTED, "f1", claimed.lease_token)
    await events.wait_for(lambda e: e == requested)
    done = FlowFinish("f1", claimed.lease_token, FlowStatus.COMPLETED, result=b"")
    await first.finish_flows([done], T0 + 3)
    await events.wait_for(lambda e: e == StoreEvent(StoreEventKind.ENDED, "f1"))

    # A lease the first replica expires: the holder may be on the other one.
    lapsed = await claim_one(first, "f2", now=T0 + 4)
    assert await first.expire_leases(T0 + 5 + TTL, 10) == [lease(lapsed)]
    expired = StoreEvent(StoreEventKind.LEASE_EXPIRED, "f2", lapsed.lease_token)
    await events.wait_for(lambda e: e == expired)


async def test_a_replica_does_not_hear_its_own_notifications(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    mine, theirs = Events(), Events()
    await first.subscribe(mine)
    await second.subscribe(theirs)
    await first.schedule_flows([flow("f1")], T0)
    await theirs.wait_for(lambda e: e.kind is READY)
    # The other replica's change is heard; the first's own never was (its engine made it).
    await second.schedule_flows([flow("f2")], T0)
    await mine.wait_for(lambda e: e.kind is READY)
    assert mine.seen == [StoreEvent(READY)]


async def test_notifications_are_sent_only_on_commit(
    dsn: str, replicas: tuple[PostgresStore, PostgresStore]
) -> None:
    first, second = replicas
    events = Events()
    await second.subscribe(events)
    await first.schedule_flows([flow("f1")], T0)
    await first.claim_flows("s1", ["orders"], 1, T0 + TTL, T0)
    # A deferred constraint trigger fails the cancel's transaction at COMMIT, the statement
    # that carries its NOTIFY (`_Tx.commit`).
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE FUNCTION refuse_cancel() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'cancel refused at commit'; END $$; "
            "CREATE CONSTRAINT TRIGGER refuse_cancel AFTER UPDATE ON flows "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            "WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested) "
            "EXECUTE FUNCTION refuse_cancel()"
        )
        with pytest.raises(StoreError, match="cancel refused at commit"):
            await first.cancel_flow("f1", "stop", T0 + 1)
        await conn.execute("DROP TRIGGER refuse_cancel ON flows")
    finally:
        await conn.close()
    marker = await claim_one(first, "f2", now=T0 + 2)
    done = FlowFinish("f2", marker.lease_token, FlowStatus.COMPLETED, result=b"")
    await first.finish_flows([done], T0 + 3)
    # Notifications arrive in commit order: had the rolled-back cancel been sent, it would
    # have arrived before the marker's end.
    await events.wait_for(lambda e: e == StoreEvent(StoreEventKind.ENDED, "f2"))
    assert not any(e.kind is StoreEventKind.CANCEL_REQUESTED for e in events.seen)
    record = await second.get_flow("f1")
    assert record is not None and not record.cancel_requested


# Quotes, backslashes, dollar quotes, a JSON escape's look-alike and non-ASCII text.
AWKWARD = ["", "plain", "it's", "a\\b", "\\'; COMMIT; --", "$$x$$", "\\u0041", "ünï ☃"]


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_string_constants_read_back_as_the_text(dsn: str, conforming: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"SET standard_conforming_strings = {conforming}")
        for text in AWKWARD:
            assert await conn.fetchval(f"SELECT {_literal(text)}") == text
    finally:
        await conn.close()
    with pytest.raises(ValueError, match="NUL"):
        _literal("a\x00b")


async def test_notifications_carry_awkward_flow_ids_intact(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = replicas
    events = Events()
    await second.subscribe(events)
    for n, text in enumerate(AWKWARD[1:]):
        claimed = await claim_one(first, text, now=T0 + n)
        done = FlowFinish(text, claimed.lease_token, FlowStatus.COMPLETED, result=b"")
        await first.finish_flows([done], T0 + n)
        await events.wait_for(lambda e, text=text: e == StoreEvent(StoreEventKind.ENDED, text))


async def test_listener_reconnects_by_itself(dsn: str) -> None:
    first, second = replica(dsn), replica(dsn, "ergon-test-listener")
    await first.open()
    await second.open()
    try:
        await _listener_reconnects(first, second)
    finally:
        await second.close()
        await first.close()


async def _listener_reconnects(first: PostgresStore, second: PostgresStore) -> None:
    events = Events()
    await second.subscribe(events)
    killed = await pg.execute(second.dsn, TERMINATE, "ergon-test-listener", "LISTEN%")
    assert killed == "SELECT 1"
    # After a reconnect the listener says "look again", since events may have been lost.
    await events.wait_for(lambda e: e.kind is StoreEventKind.EVENTS_LOST)
    assert {READY, StoreEventKind.TIMER} <= {e.kind for e in events.seen}
    events.seen.clear()
    await first.schedule_flows([flow("after")], T0)
    await events.wait_for(lambda e: e.kind is READY)


def test_event_payloads_round_trip_below_the_notify_limit() -> None:
    events = [
        StoreEvent(READY),
        StoreEvent(StoreEventKind.TIMER),
        StoreEvent(StoreEventKind.WAKEUP, 'f\u00e9\n\t"1', 7, "k\\ey"),
        StoreEvent(StoreEventKind.CANCEL_REQUESTED, "f2", 3),
        StoreEvent(StoreEventKind.LEASE_EXPIRED, "f\u00e93", 2**62),
        *(StoreEvent(StoreEventKind.ENDED, f"flow-{i:04d}-" + "x" * 60) for i in range(400)),
    ]
    payloads = _encode_events(events)
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert [e for p in payloads for e in _decode_events(p)] == events
    # Payloads named by their sender: the sender's own listener skips them, others do not.
    named = _encode_events(events, origin="replica-1")
    assert all(len(p.encode()) < 8000 and p.startswith('[["O","replica-1"],') for p in named)
    assert [e for p in named for e in _decode_events(p, ignore_origin="replica-2")] == events
    assert [e for p in named for e in _decode_events(p)] == events
    assert [e for p in named for e in _decode_events(p, ignore_origin="replica-1")] == []
    # An event too big for any payload is dropped (events are hints); junk is ignored.
    huge = StoreEvent(StoreEventKind.ENDED, "x" * 9000)
    assert _encode_events([huge, StoreEvent(READY)]) == ['[["R"]]']
    assert _decode_events("not json") == []
    assert _decode_events('[["W", "f"], ["Z"], 3, ["E", "f1"]]') == [
        StoreEvent(StoreEventKind.ENDED, "f1")
    ]


# --- migrations ------------------------------------------------------------------------------


async def test_replicas_starting_together_migrate_once(dsn: str) -> None:
    stores = [replica(dsn) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        rows = await _fetch(dsn, "SELECT version, name FROM schema_version ORDER BY version")
        assert [tuple(row) for row in rows] == [
            (1, "0001_initial.sql"),
            (2, "0002_record_steps.sql"),
            (3, "0003_open_waits.sql"),
        ]
        assert await stores[0].schedule_flows([flow("f")], T0) == [ScheduleResult("f", CREATED)]
        assert await stores[1].schedule_flows([flow("f")], T0) == [ScheduleResult("f", EXISTING)]
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_replicas_starting_together_migrate_once_at_repeatable_read(
    repeatable_read_dsn: str,
) -> None:
    await test_replicas_starting_together_migrate_once(repeatable_read_dsn)


async def test_the_open_waits_migration_runs_again_harmlessly(dsn: str) -> None:
    store = replica(dsn)
    await store.open()
    await store.close()
    (migration,) = [m for m in load_migrations("postgres") if m.version == 3]
    await pg.execute(dsn, migration.sql)
    rows = await _fetch(dsn, "SELECT indexname FROM pg_indexes WHERE indexname = 'waits_open'")
    assert len(rows) == 1


async def test_newer_schema_is_refused(dsn: str) -> None:
    store = replica(dsn)
    await store.open()
    await store.close()
    await pg.execute(dsn, "INSERT INTO schema_version (version, name) VALUES (9, '0009_x.sql')")
    newer = replica(dsn)
    with pytest.raises(SchemaVersionError) as raised:
        await newer.open()
    assert str(raised.value) == (
        "database schema version 9 is newer than this ergon-server supports (3); "
        "upgrade ergon-server"
    )
    await newer.close()


async def _fetch(dsn: str, sql: str) -> list[Any]:
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


# --- errors, URLs, plans ---------------------------------------------------------------------


async def test_an_absent_server_is_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/ergon", connect_timeout_s=2)
    with pytest.raises(StoreUnavailableError):
        await store.open()
    await store.close()
    with pytest.raises(StoreUnavailableError):
        await store.get_flow("f")
    with pytest.raises(StoreUnavailableError):
        await store.subscribe(lambda event: None)


async def test_a_database_that_does_not_exist_is_an_error(dsn: str) -> None:
    store = PostgresStore(pg.dsn_for("ergon_no_such_database_here", dsn))
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert not isinstance(raised.value, StoreUnavailableError)


async def test_a_failed_write_leaves_no_transaction_open_on_a_pooled_connection(
    dsn: str,
) -> None:
    # The pool does not reset sessions on release (`_keep_session`): a failed batch must not
    # leave a transaction open (step results alone run in none, other batches in one), or the
    # next user of the connection would run inside it.
    app = "ergon-failed-write"
    store = replica(dsn, app)
    await store.open()
    try:
        claimed = await claim_one(store, "f1")
        poison = step(claimed, "poison", result=object())  # type: ignore[arg-type]
        results = await asyncio.gather(
            store.record_steps([step(claimed, "a")], T0),
            store.record_steps([poison], T0),
            store.record_steps([step(claimed, "b")], T0),
            return_exceptions=True,
        )
        assert results[0] == [OK] and results[2] == [OK]
        assert isinstance(results[1], StoreError)
        assert not isinstance(results[1], StoreUnavailableError)
        # Every pooled connection serves again, and none sits in a transaction.
        await asyncio.gather(*(store.get_flow("f1") for _ in range(20)))
        assert await store.record_steps([step(claimed, "c")], T0 + 1) == [OK]
        assert [e.key for e in await store.get_history("f1", 0, 10)] == ["a", "b", "c"]
        conn = await asyncpg.connect(dsn)
        try:
            open_transactions = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                "AND state LIKE 'idle in transaction%'",
                app,
            )
        finally:
            await conn.close()
        assert open_transactions == 0
    finally:
        await store.close()


async def test_connections_the_server_ends_are_replaced(dsn: str) -> None:
    store = replica(dsn, "ergon-test-ended")
    await store.open()
    try:
        claimed = await claim_one(store, "f1")
        for attempt in range(3):
            await pg.execute(dsn, TERMINATE, "ergon-test-ended", "%")
            # Idle connections died under the store: nothing had run on them, so the calls
            # run again on fresh ones instead of failing.
            result = await store.schedule_flows([flow(f"g{attempt}")], T0)
            assert result == [ScheduleResult(f"g{attempt}", CREATED)]
            assert await store.get_flow("f1") is not None
            # A batch of step results alone runs without a transaction around it.
            await pg.execute(dsn, TERMINATE, "ergon-test-ended", "%")
            assert await store.record_steps([step(claimed, f"s{attempt}")], T0) == [OK]
        history = await store.get_history("f1", 0, 10)
        assert [(e.key, e.sequence) for e in history] == [("s0", 1), ("s1", 2), ("s2", 3)]
    finally:
        await store.close()


class Proxy:
    """A TCP relay to the PostgreSQL server that a test can cut and restore."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65_536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_a_lost_server_is_unavailable_until_it_is_back(dsn: str) -> None:
    parts = urlsplit(dsn)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    store = PostgresStore(via_proxy, min_size=1, max_size=2, connect_timeout_s=2)
    await store.open()
    try:
        await store.schedule_flows([flow("f1")], T0)
        await proxy.stop()
        with pytest.raises(StoreUnavailableError):
            await store.schedule_flows([flow("f2")], T0)
        with pytest.raises(StoreUnavailableError):
            await store.get_flow("f1")
        await proxy.start()
        assert await store.schedule_flows([flow("f3")], T0) == [ScheduleResult("f3", CREATED)]
        assert await store.get_flow("f2") is None
        assert await store.get_flow("f3") is not None
    finally:
        await store.close()
        await proxy.stop()


async def test_deadlocks_and_serialization_failures_are_retried(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore(dsn, min_size=1, max_size=2, retries=3)
    await store.open()
    try:
        real = store._transaction
        failures = [
            asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
            asyncpg.exceptions.SerializationError("could not serialize access"),
        ]
        calls = 0

        async def flaky(batch: Any) -> None:
            nonlocal calls
            calls += 1
            if failures:
                raise failures.pop(0)
            await real(batch)

        monkeypatch.setattr(store, "_transaction", flaky)
        # Two failures, then the third run commits: the caller sees only the answer.
        assert await store.schedule_flows([flow("f1")], T0) == [ScheduleResult("f1", CREATED)]
        assert calls == 3
        # A batch that keeps failing reaches its callers as unavailable after `retries` runs.
        failures += [asyncpg.exceptions.DeadlockDetectedError("deadlock detected")] * 3
        calls = 0
        with pytest.raises(StoreUnavailableError, match="deadlock"):
            await store.schedule_flows([flow("f2")], T0)
        assert calls == 3
        assert await store.get_flow("f2") is None
    finally:
        await store.close()


def test_driver_errors_are_translated() -> None:
    exceptions = asyncpg.exceptions
    unavailable = [
        exceptions.CannotConnectNowError("the database system is starting up"),
        exceptions.TooManyConnectionsError("sorry, too many clients already"),
        exceptions.DiskFullError("could not extend file: No space left on device"),
        exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        exceptions.AdminShutdownError("terminating connection due to administrator command"),
        exceptions.DeadlockDetectedError("deadlock detected"),
        exceptions.InterfaceError("pool is closed"),
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ]
    for exc in unavailable:
        assert isinstance(_translate(exc), StoreUnavailableError), repr(exc)
    errors = [
        exceptions.UniqueViolationError("duplicate key"),
        exceptions.UndefinedTableError('relation "flows" does not exist'),
        exceptions.InvalidCatalogNameError('database "x" does not exist'),
        exceptions.InterfaceError("cannot perform operation: another operation is in progress"),
        RuntimeError("bug"),
    ]
    for exc in errors:
        error = _translate(exc)
        assert type(error) is StoreError, repr(exc)
        assert error.__cause__ is exc


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
def test_create_store_builds_a_postgres_store(scheme: str) -> None:
    store = create_store(f"{scheme}://ergon@db.example:5433/ergon?sslmode=require")
    assert isinstance(store, PostgresStore)
    assert store.dsn == f"{scheme.lower()}://ergon@db.example:5433/ergon?sslmode=require"


async def test_hot_statements_use_their_indexes(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    first, _ = replicas
    await first.schedule_flows([flow(f"f{i}", "ab"[i % 2]) for i in range(400)], T0)
    for session in range(8):
        await first.claim_flows(f"s{session}", ["a", "b"], 20, T0 + session, T0)
    loop = asyncio.get_running_loop()
    plans: dict[str, str] = {}
    conn: asyncpg.Connection = await asyncpg.connect(first.dsn)
    try:
        # Flows with a long history of waits, one of them still open each.
        await conn.execute(
            "INSERT INTO waits (flow_id, key, kind, status, fire_at, created_at) "
            "SELECT 'f' || i, 'k' || j, 'TIMER', "
            "CASE WHEN j = 1 THEN 'OPEN' ELSE 'SATISFIED' END, 0, 0 "
            "FROM generate_series(0, 399) AS i, generate_series(1, 20) AS j"
        )
        await conn.execute("ANALYZE")
        await conn.execute("SET enable_seqscan = off")
        for types in (["a"], ["a", "b"]):
            sql, params = _ClaimFlows(loop.create_future(), "s", types, 10, T0, T0).statement()
            async with conn.transaction():
                rows = await conn.fetch("EXPLAIN " + sql, *params)
            plans[f"claim {types}"] = "\n".join(row[0] for row in rows)
        rows = await conn.fetch("EXPLAIN " + _EXPIRE, T0, 500)
        plans["expiry"] = "\n".join(row[0] for row in rows)
        for name, sql, params in (
            ("state", _STATE_SQL, (["f1", "f2"], CANCEL_KEY)),
            ("open waits", _OPEN_WAITS, ("f1",)),
            ("end's waits", _CANCEL_OPEN_WAITS, (["f1", "f2"],)),
        ):
            rows = await conn.fetch("EXPLAIN " + sql, *params)
            plans[name] = "\n".join(row[0] for row in rows)
        checks = {
            "timers": "SELECT fire_at, flow_id, key FROM waits WHERE status = 'OPEN' "
            "AND kind = 'TIMER' AND fire_at <= 5 ORDER BY fire_at, flow_id, key LIMIT 3",
            "owner": "SELECT seq FROM flows WHERE status = 'RUNNING' AND lease_owner = 's'",
            "signals": "SELECT * FROM waits AS w WHERE w.flow_id = 'f' AND w.signal_name = 'n' "
            "AND w.status = 'OPEN' AND w.kind = 'SIGNAL' ORDER BY w.created_at, w.key",
            "children": "SELECT flow_id FROM waits WHERE kind = 'CHILD' "
            "AND child_flow_id = ANY('{a,b}'::text[])",
        }
        for name, sql in checks.items():
            plans[name] = "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + sql))
    finally:
        await conn.close()
    expected = {
        "claim ['a']": "flows_pending",
        "claim ['a', 'b']": "flows_pending",
        "timers": "waits_timers",
        "expiry": "flows_lease_expiry",
        "owner": "flows_lease_owner",
        "signals": "waits_signals",
        "children": "waits_children",
        "state": "waits_open",
        "open waits": "waits_open",
        "end's waits": "waits_open",
    }
    for name, index in expected.items():
        assert index in plans[name], f"{name}:\n{plans[name]}"
        assert "Seq Scan" not in plans[name], f"{name}:\n{plans[name]}"


# --- the test helper itself ------------------------------------------------------------------


async def test_missing_server_skips_or_fails_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pg.DSN_ENV, "postgresql://postgres@127.0.0.1:1/postgres")
    monkeypatch.delenv(pg.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server"):
        async with pg.temporary_database():
            pass
    monkeypatch.setenv(pg.REQUIRE_ENV, "1")
    with (
        pytest.raises(pytest.fail.Exception, match="PostgreSQL is required"),
        pg.temporary_database_sync(),
    ):
        pass


async def test_temporary_databases_are_dropped(dsn: str) -> None:
    async with pg.temporary_database() as inner:
        store = replica(inner)
        await store.open()
        await store.schedule_flows([flow("f")], T0)
        # Left open on purpose: the drop disconnects whoever still uses the database.
        name = inner.rsplit("/", 1)[-1]
    rows = await _fetch(dsn, f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
    assert rows == []
    await store.close()


async def test_a_heartbeats_flows_are_locked_up_front_with_the_rest_of_its_batch() -> None:
    # Locked later, in its own statement, a heartbeat's rows could be taken after the batch's
    # other flows while another replica's batch took them in the other order: a deadlock.
    loop = asyncio.get_running_loop()
    heartbeat = _RenewLeases(loop.create_future(), "s1", T0, ("m", "a"))
    by_owner = _RenewLeases(loop.create_future(), "s1", T0, None)
    assert _batch_flows([heartbeat], {}) == ["a", "m"]
    assert _batch_flows([by_owner], {}) == []
