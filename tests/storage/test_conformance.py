"""The `Store` conformance suite: every verb and edge case, run against every backend."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ergon_server.clock import ManualClock
from ergon_server.errors import (
    InvalidArgumentError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
)
from ergon_server.model import (
    CancelOutcome,
    ClaimedFlow,
    EntryKind,
    EntryStatus,
    Failure,
    FlowFinish,
    FlowStatus,
    Lease,
    Park,
    RetryPolicy,
    ScheduleResult,
    SignalOutcome,
    SignalResult,
    StepRecord,
    SuspendRequest,
    WaitRequest,
    WriteOutcome,
)
from ergon_server.storage import create_store
from ergon_server.storage.base import Store
from ergon_server.storage.memory import MemoryStore
from ergon_server.storage.sqlite import SqliteStore
from tests.storage.support import (
    BOOM,
    CONFLICT,
    CREATED,
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

# --- life cycle ----------------------------------------------------------------------------


async def test_close_is_idempotent_and_safe_before_open(backend: Backend) -> None:
    never_opened = backend.make()
    await never_opened.close()
    instance = backend.make()
    await instance.open()
    await instance.close()
    await instance.close()


async def test_verbs_refused_after_close(backend: Backend) -> None:
    instance = backend.make()
    await instance.open()
    await instance.close()
    with pytest.raises(StoreUnavailableError):
        await instance.get_flow("f")
    with pytest.raises(StoreUnavailableError):
        await instance.schedule_flows([flow("f")], T0)


async def test_data_survives_reopen(backend: Backend) -> None:
    if not backend.survives_reopen:
        pytest.skip(f"{backend.name} keeps nothing across close")
    first = backend.make()
    await first.open()
    try:
        await first.register_flow_types(["orders"], T0)
        claimed = await claim_one(first, "f1")
        await first.schedule_flows([flow("f2", request_id="r2")], T0)
        assert await first.record_steps([step(claimed, "a")], T0) == [OK]
        assert (await first.send_signal("f1", "go", b"1", "", T0)).sequence == 1
    finally:
        await first.close()

    second = backend.make()
    await second.open()
    try:
        assert await second.known_flow_types(["orders"]) == {"orders"}
        record = await second.get_flow("f1")
        assert record is not None
        assert record.status is FlowStatus.RUNNING
        assert record.lease_token == claimed.lease_token
        assert [entry.key for entry in await second.get_history("f1", 0, 10)] == ["a"]
        # Counters carry on where they stopped.
        assert await second.record_steps([step(claimed, "b")], T0) == [OK]
        assert [entry.sequence for entry in await second.get_history("f1", 0, 10)] == [1, 2]
        assert (await second.send_signal("f1", "go", b"2", "", T0)).sequence == 2
        assert await second.schedule_flows([flow("other", request_id="r2")], T0) == [
            ScheduleResult("f2", EXISTING)
        ]
        page = await second.list_flows([], None, 10, None)
        assert [record.flow_id for record in page.flows] == ["f1", "f2"]
    finally:
        await second.close()


async def test_newer_schema_is_refused(backend: Backend) -> None:
    if backend.set_schema_version is None:
        pytest.skip(f"{backend.name} has no schema")
    instance = backend.make()
    await instance.open()
    await instance.close()
    backend.set_schema_version(7)
    newer = backend.make()
    with pytest.raises(SchemaVersionError) as raised:
        await newer.open()
    assert str(raised.value) == (
        f"database schema version 7 is newer than this ergon-server supports "
        f"({backend.schema_version}); upgrade ergon-server"
    )
    await newer.close()


# --- flow types ----------------------------------------------------------------------------


async def test_flow_types(store: Store) -> None:
    assert await store.known_flow_types(["a", "b"]) == set()
    await store.register_flow_types(["a", "b", "a"], T0)
    await store.register_flow_types(["b", "c"], T0 + 1)
    await store.register_flow_types([], T0 + 2)
    assert await store.known_flow_types(["a", "c", "d"]) == {"a", "c"}
    assert await store.known_flow_types([]) == set()


# --- scheduling ----------------------------------------------------------------------------


async def test_schedule_creates_pending_flow(store: Store) -> None:
    policy = RetryPolicy(
        max_attempts=3,
        initial_delay_ms=100,
        max_delay_ms=1_000,
        backoff_multiplier=2.5,
        non_retryable_error_types=("KeyError", "TypeError"),
    )
    results = await store.schedule_flows(
        [flow("f1", data=b"\x00\xff", retry_policy=policy, labels={"team": "x", "env": "prod"})],
        T0,
    )
    assert results == [ScheduleResult("f1", CREATED)]
    record = await store.get_flow("f1")
    assert record is not None
    assert record.flow_id == "f1"
    assert record.flow_type == "orders"
    assert record.status is FlowStatus.PENDING
    assert record.input == b"\x00\xff"
    assert record.result is None
    assert record.error is None
    assert record.attempt == 1
    assert record.labels == {"team": "x", "env": "prod"}
    assert record.retry_policy == policy
    assert (record.created_at, record.updated_at, record.ready_at) == (T0, T0, T0)
    assert record.completed_at is None
    assert (record.lease_token, record.lease_owner, record.lease_expires_at) == (0, None, None)
    assert await store.get_flow("missing") is None


async def test_schedule_same_flow_id(store: Store) -> None:
    assert await store.schedule_flows([flow("f1")], T0) == [ScheduleResult("f1", CREATED)]
    assert await store.schedule_flows([flow("f1")], T0 + 5) == [ScheduleResult("f1", EXISTING)]
    assert await store.schedule_flows([flow("f1", data=b"other")], T0) == [
        ScheduleResult("f1", CONFLICT)
    ]
    assert await store.schedule_flows([flow("f1", flow_type="refunds")], T0) == [
        ScheduleResult("f1", CONFLICT)
    ]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.input, record.flow_type, record.created_at) == (b"input", "orders", T0)


async def test_schedule_request_id(store: Store) -> None:
    assert await store.schedule_flows([flow("f1", request_id="r1")], T0) == [
        ScheduleResult("f1", CREATED)
    ]
    # The request id answers first, whatever the rest of the request says.
    assert await store.schedule_flows([flow("f2", data=b"x", request_id="r1")], T0) == [
        ScheduleResult("f1", EXISTING)
    ]
    assert await store.get_flow("f2") is None
    # EXISTING by flow_id remembers the request id too.
    assert await store.schedule_flows([flow("f1", request_id="r2")], T0) == [
        ScheduleResult("f1", EXISTING)
    ]
    assert await store.schedule_flows([flow("f3", request_id="r2")], T0) == [
        ScheduleResult("f1", EXISTING)
    ]
    # A CONFLICT does not remember its request id.
    assert await store.schedule_flows([flow("f1", data=b"x", request_id="r3")], T0) == [
        ScheduleResult("f1", CONFLICT)
    ]
    assert await store.schedule_flows([flow("f4", request_id="r3")], T0) == [
        ScheduleResult("f4", CREATED)
    ]


async def test_schedule_duplicates_within_one_batch(store: Store) -> None:
    results = await store.schedule_flows(
        [
            flow("a"),
            flow("a"),
            flow("a", data=b"other"),
            flow("b", request_id="r"),
            flow("c", request_id="r"),
            flow("d", request_id="q"),
            flow("a", request_id="q"),
            flow("e", data=b"1", request_id="z"),
            flow("e", data=b"2", request_id="z"),
        ],
        T0,
    )
    assert results == [
        ScheduleResult("a", CREATED),
        ScheduleResult("a", EXISTING),
        ScheduleResult("a", CONFLICT),
        ScheduleResult("b", CREATED),
        ScheduleResult("b", EXISTING),
        ScheduleResult("d", CREATED),
        ScheduleResult("d", EXISTING),
        ScheduleResult("e", CREATED),
        ScheduleResult("e", EXISTING),
    ]
    page = await store.list_flows([], None, 100, None)
    assert [record.flow_id for record in page.flows] == ["a", "b", "d", "e"]
    assert await store.schedule_flows([], T0) == []


async def test_schedule_refuses_empty_ids(store: Store) -> None:
    with pytest.raises(InvalidArgumentError):
        await store.schedule_flows([flow("ok"), flow("")], T0)
    with pytest.raises(InvalidArgumentError):
        await store.schedule_flows([flow("x", flow_type="")], T0)
    # Validation happens before anything is written.
    assert await store.get_flow("ok") is None


async def test_start_at_delays_claims(store: Store) -> None:
    await store.schedule_flows([flow("later", start_at=T0 + 1_000)], T0)
    record = await store.get_flow("later")
    assert record is not None
    assert record.ready_at == T0 + 1_000
    assert await store.next_ready_at(["orders"]) == T0 + 1_000
    assert await store.claim_flows("s", ["orders"], 10, T0 + TTL, T0 + 999) == []
    claimed = await store.claim_flows("s", ["orders"], 10, T0 + TTL, T0 + 1_000)
    assert [c.flow_id for c in claimed] == ["later"]
    assert await store.next_ready_at(["orders"]) is None


# --- claims --------------------------------------------------------------------------------


async def test_claim_order_limit_and_types(store: Store) -> None:
    await store.schedule_flows(
        [
            flow("late", start_at=T0 + 30),
            flow("early-2", start_at=T0 + 10),
            flow("other-type", flow_type="refunds", start_at=T0),
            flow("early-1", start_at=T0 + 10),
            flow("first", start_at=T0 + 5),
            flow("future", start_at=T0 + 1_000),
        ],
        T0,
    )
    now = T0 + 100
    # Oldest ready_at first; ties in scheduling order.
    first = await store.claim_flows("s", ["orders"], 2, now + TTL, now)
    assert [c.flow_id for c in first] == ["first", "early-2"]
    second = await store.claim_flows("s", ["orders", "refunds"], 10, now + TTL, now)
    assert [c.flow_id for c in second] == ["other-type", "early-1", "late"]
    assert await store.claim_flows("s", ["orders", "refunds"], 10, now + TTL, now) == []
    assert await store.claim_flows("s", [], 10, now + TTL, now) == []
    assert await store.claim_flows("s", ["orders"], 0, now + TTL, T0 + 5_000) == []
    assert await store.claim_flows("s", ["unknown"], 10, now + TTL, T0 + 5_000) == []


async def test_claim_many_types(store: Store) -> None:
    types = [f"type-{index}" for index in range(80)]
    await store.schedule_flows(
        [flow(f"f{index}", types[index], start_at=T0 - index) for index in range(80)], T0
    )
    for wanted in (types[:3], types):
        claimed = await store.claim_flows("s", wanted, 2, T0 + TTL, T0)
        ready = sorted(range(80), key=lambda index: -index)
        expected = [f"f{index}" for index in ready if types[index] in wanted][:2]
        assert [c.flow_id for c in claimed] == expected


async def test_claim_leases_the_flow(store: Store) -> None:
    policy = RetryPolicy(max_attempts=2)
    await store.schedule_flows([flow("f1", data=b"in", retry_policy=policy)], T0)
    (claimed,) = await store.claim_flows("session-1", ["orders"], 5, T0 + TTL, T0 + 1)
    assert claimed == ClaimedFlow(
        flow_id="f1",
        flow_type="orders",
        input=b"in",
        lease_token=1,
        attempt=1,
        retry_policy=policy,
        journal=[],
        ready_at=T0,
    )
    record = await store.get_flow("f1")
    assert record is not None
    assert record.status is FlowStatus.RUNNING
    assert (record.lease_token, record.lease_owner, record.lease_expires_at) == (
        1,
        "session-1",
        T0 + TTL,
    )
    assert record.updated_at == T0 + 1
    # A running flow is not claimable again.
    assert await store.claim_flows("session-2", ["orders"], 5, T0 + TTL, T0 + 2) == []
    assert await store.release_flows([lease(claimed)], T0 + 3) == [OK]
    (again,) = await store.claim_flows("session-2", ["orders"], 5, T0 + TTL, T0 + 3)
    assert again.lease_token == 2


async def test_claim_returns_journal_in_order(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    records = [
        step(claimed, "b"),
        step(claimed, "a", EntryStatus.RETRYING, result=None, error=BOOM),
        step(claimed, "c", EntryStatus.FAILED, result=None, error=BOOM),
        step(claimed, "t", kind=EntryKind.TIMER, result=None),
    ]
    assert await store.record_steps(records, T0 + 7) == [OK] * 4
    assert await store.release_flows([lease(claimed)], T0 + 8) == [OK]
    (again,) = await store.claim_flows("s", ["orders"], 1, T0 + TTL, T0 + 8)
    assert [(e.sequence, e.key, e.status) for e in again.journal] == [
        (1, "b", EntryStatus.COMPLETED),
        (2, "a", EntryStatus.RETRYING),
        (3, "c", EntryStatus.FAILED),
        (4, "t", EntryStatus.COMPLETED),
    ]
    assert again.journal[1].error == BOOM
    assert again.journal[3].kind is EntryKind.TIMER
    assert again.journal == await store.get_history("f1", 0, 100)


async def test_concurrent_claims_never_share_a_flow(store: Store) -> None:
    await store.schedule_flows([flow(f"f{index:03d}") for index in range(200)], T0)
    claims = await asyncio.gather(
        *(store.claim_flows(f"s{index}", ["orders"], 7, T0 + TTL, T0) for index in range(50))
    )
    claimed = [c.flow_id for batch in claims for c in batch]
    assert len(claimed) == len(set(claimed)) == 200
    assert all(c.lease_token == 1 for batch in claims for c in batch)


async def test_next_ready_at(store: Store) -> None:
    assert await store.next_ready_at(["orders"]) is None
    await store.schedule_flows(
        [
            flow("a", start_at=T0 + 50),
            flow("b", start_at=T0 + 20),
            flow("c", flow_type="refunds", start_at=T0 + 10),
        ],
        T0,
    )
    assert await store.next_ready_at(["orders"]) == T0 + 20
    assert await store.next_ready_at(["orders", "refunds"]) == T0 + 10
    assert await store.next_ready_at(["nothing"]) is None
    assert await store.next_ready_at([]) is None
    # Running flows are not ready.
    await store.claim_flows("s", ["orders"], 1, T0 + TTL, T0 + 20)
    assert await store.next_ready_at(["orders"]) == T0 + 50


# --- step records ----------------------------------------------------------------------------


async def test_record_steps_is_fenced(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    await store.schedule_flows([flow("pending")], T0)
    outcomes = await store.record_steps(
        [
            step(("f1", claimed.lease_token + 1), "stale"),
            step(("f1", claimed.lease_token - 1), "stale"),
            step(("missing", 1), "x"),
            step(("pending", 0), "x"),
            step(claimed, "good"),
        ],
        T0,
    )
    assert outcomes == [LEASE_LOST, LEASE_LOST, NOT_FOUND, LEASE_LOST, OK]
    assert [entry.key for entry in await store.get_history("f1", 0, 10)] == ["good"]
    assert await store.get_history("pending", 0, 10) == []
    assert await store.record_steps([], T0) == []


async def test_record_steps_is_idempotent(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await store.record_steps([step(claimed, "a", result=b"first")], T0 + 1) == [OK]
    assert await store.record_steps(
        [
            step(claimed, "a", result=b"second"),
            step(claimed, "a", EntryStatus.FAILED, result=None, error=BOOM),
            step(claimed, "a", EntryStatus.RETRYING, result=None, error=BOOM, attempts=9),
        ],
        T0 + 2,
    ) == [OK, OK, OK]
    (entry,) = await store.get_history("f1", 0, 10)
    assert (entry.sequence, entry.status, entry.result, entry.attempts, entry.recorded_at) == (
        1,
        EntryStatus.COMPLETED,
        b"first",
        1,
        T0 + 1,
    )
    assert entry.error is None


async def test_retrying_then_completed(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    first_error = Failure(type="IOError", message="try 1")
    second_error = Failure(type="IOError", message="try 2", non_retryable=False)
    retry = EntryStatus.RETRYING
    assert await store.record_steps([step(claimed, "x")], T0) == [OK]
    assert await store.record_steps(
        [step(claimed, "s", retry, result=None, error=first_error, attempts=1)], T0 + 1
    ) == [OK]
    assert await store.record_steps(
        [step(claimed, "s", retry, result=None, error=second_error, attempts=2)], T0 + 2
    ) == [OK]
    entries = await store.get_history("f1", 0, 10)
    assert [(e.key, e.sequence, e.status, e.attempts) for e in entries] == [
        ("x", 1, EntryStatus.COMPLETED, 1),
        ("s", 2, retry, 2),
    ]
    assert entries[1].error == second_error
    assert entries[1].recorded_at == T0 + 2
    assert await store.record_steps([step(claimed, "s", result=b"done", attempts=3)], T0 + 3) == [
        OK
    ]
    entries = await store.get_history("f1", 0, 10)
    assert [(e.key, e.sequence, e.status, e.attempts, e.result) for e in entries] == [
        ("x", 1, EntryStatus.COMPLETED, 1, b"result"),
        ("s", 2, EntryStatus.COMPLETED, 3, b"done"),
    ]
    assert entries[1].error is None


async def test_journal_sequence_and_history_paging(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    keys = [f"step-{index}" for index in range(12)]
    assert await store.record_steps([step(claimed, key) for key in keys[:5]], T0) == [OK] * 5
    for key in keys[5:]:
        assert await store.record_steps([step(claimed, key)], T0) == [OK]
    history = await store.get_history("f1", 0, 100)
    assert [(e.sequence, e.key) for e in history] == list(enumerate(keys, start=1))
    assert history[0].args_hash == "hash-step-0"
    assert [e.key for e in await store.get_history("f1", 0, 5)] == keys[:5]
    assert [e.key for e in await store.get_history("f1", 5, 5)] == keys[5:10]
    assert [e.key for e in await store.get_history("f1", 10, 5)] == keys[10:]
    assert await store.get_history("f1", 12, 5) == []
    assert await store.get_history("missing", 0, 5) == []
    with pytest.raises(InvalidArgumentError):
        await store.get_history("f1", 0, 0)


# --- finishing -----------------------------------------------------------------------------


async def test_finish_completed(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    done = FlowFinish("f1", claimed.lease_token, FlowStatus.COMPLETED, result=b"out")
    assert await finished(store, [done], T0 + 10) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.result, record.error) == (FlowStatus.COMPLETED, b"out", None)
    assert (record.completed_at, record.updated_at) == (T0 + 10, T0 + 10)
    assert (record.lease_owner, record.lease_expires_at) == (None, None)
    assert record.lease_token == claimed.lease_token
    # A retried completion is fine and changes nothing; anything else is refused.
    again = FlowFinish("f1", claimed.lease_token, FlowStatus.COMPLETED, result=b"other")
    failed = FlowFinish("f1", claimed.lease_token, FlowStatus.FAILED, error=BOOM)
    stale = FlowFinish("f1", claimed.lease_token - 1, FlowStatus.COMPLETED, result=b"x")
    missing = FlowFinish("nope", 1, FlowStatus.COMPLETED, result=b"x")
    assert await finished(store, [again, failed, stale, missing], T0 + 20) == [
        OK,
        LEASE_LOST,
        LEASE_LOST,
        NOT_FOUND,
    ]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.result, record.completed_at) == (
        FlowStatus.COMPLETED,
        b"out",
        T0 + 10,
    )
    assert await store.record_steps([step(claimed, "late")], T0 + 30) == [LEASE_LOST]
    assert await finished(store, [], T0) == []


async def test_finish_waits_for_the_step_results_it_requires(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    token = claimed.lease_token
    end = FlowFinish("f1", token, FlowStatus.COMPLETED, result=b"out", requires_keys=("a#1", "b#1"))
    # Neither recorded, or one only as a retrying attempt: refused, nothing written.
    assert await finished(store, [end], T0 + 10) == [WriteOutcome.NOT_RECORDED]
    retrying = step(claimed, "b#1", EntryStatus.RETRYING, result=None, error=BOOM)
    assert await store.record_steps([step(claimed, "a#1"), retrying], T0 + 11) == [OK, OK]
    assert await finished(store, [end], T0 + 12) == [WriteOutcome.NOT_RECORDED]
    record = await store.get_flow("f1")
    assert record is not None and record.status is FlowStatus.RUNNING
    # The missing result and the end submitted together (one group commit where the store
    # has one): the result is recorded first, so the end applies.
    recorded, outcomes = await asyncio.gather(
        store.record_steps([step(claimed, "b#1")], T0 + 13), finished(store, [end], T0 + 13)
    )
    assert (recorded, outcomes) == ([OK], [OK])
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.result) == (FlowStatus.COMPLETED, b"out")
    assert [e.key for e in await store.get_history("f1", 0, 10)] == ["a#1", "b#1"]
    # Sent again (a lost ack), the end is the same answer.
    assert await finished(store, [end], T0 + 14) == [OK]


async def test_finish_failed(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    failed = FlowFinish("f1", claimed.lease_token, FlowStatus.FAILED, error=BOOM)
    assert await finished(store, [failed, failed], T0 + 10) == [OK, OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.error, record.result) == (FlowStatus.FAILED, BOOM, None)
    assert record.completed_at == T0 + 10
    assert await store.claim_flows("s", ["orders"], 10, T0 + TTL, T0 + 100) == []


async def test_finish_with_retry_requeues(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await store.record_steps(
        [
            step(claimed, "done"),
            step(claimed, "broken", EntryStatus.FAILED, result=None, error=BOOM),
            step(claimed, "flaky", EntryStatus.RETRYING, result=None, error=BOOM, attempts=2),
        ],
        T0,
    ) == [OK, OK, OK]
    retry = FlowFinish(
        "f1", claimed.lease_token, FlowStatus.FAILED, error=BOOM, retry_delay_ms=5_000
    )
    assert await finished(store, [retry], T0 + 100) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert record.status is FlowStatus.PENDING
    assert (record.attempt, record.ready_at, record.error) == (2, T0 + 5_100, BOOM)
    assert (record.lease_owner, record.lease_expires_at, record.completed_at) == (None, None, None)
    history = await store.get_history("f1", 0, 10)
    assert [(e.sequence, e.key) for e in history] == [(1, "done"), (3, "flaky")]
    # The same finish again: the lease is gone with the retry.
    assert await finished(store, [retry], T0 + 101) == [LEASE_LOST]
    assert await store.next_ready_at(["orders"]) == T0 + 5_100
    assert await store.claim_flows("s", ["orders"], 1, T0 + TTL, T0 + 5_099) == []
    (again,) = await store.claim_flows("s", ["orders"], 1, T0 + 20_000, T0 + 5_100)
    assert (again.attempt, again.lease_token) == (2, claimed.lease_token + 1)
    assert [e.key for e in again.journal] == ["done", "flaky"]
    # Sequences are never reused after entries are dropped.
    assert await store.record_steps([step(again, "broken")], T0 + 5_200) == [OK]
    history = await store.get_history("f1", 0, 10)
    assert [(e.sequence, e.key) for e in history] == [(1, "done"), (3, "flaky"), (4, "broken")]
    done = FlowFinish("f1", again.lease_token, FlowStatus.COMPLETED, result=b"ok")
    assert await finished(store, [done], T0 + 5_300) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.status, record.attempt, record.result, record.error) == (
        FlowStatus.COMPLETED,
        2,
        b"ok",
        None,
    )


async def test_finish_refuses_bad_requests(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    with pytest.raises(InvalidArgumentError):
        await finished(store, [FlowFinish("f1", claimed.lease_token, FlowStatus.RUNNING)], T0)
    with pytest.raises(InvalidArgumentError):
        await finished(
            store, [FlowFinish("f1", claimed.lease_token, FlowStatus.FAILED, retry_delay_ms=-1)], T0
        )
    record = await store.get_flow("f1")
    assert record is not None
    assert record.status is FlowStatus.RUNNING


async def test_release(store: Store) -> None:
    claimed = await claim_one(store, "f1")
    assert await store.record_steps([step(claimed, "a")], T0) == [OK]
    assert await store.release_flows(
        [lease(claimed), lease(claimed), Lease("missing", 1)], T0 + 50
    ) == [OK, LEASE_LOST, NOT_FOUND]
    record = await store.get_flow("f1")
    assert record is not None
    assert record.status is FlowStatus.PENDING
    assert (record.ready_at, record.updated_at, record.attempt) == (T0 + 50, T0 + 50, 1)
    assert (record.lease_owner, record.lease_expires_at) == (None, None)
    assert await store.record_steps([step(claimed, "b")], T0 + 60) == [LEASE_LOST]
    (again,) = await store.claim_flows("s2", ["orders"], 1, T0 + TTL, T0 + 60)
    assert again.lease_token == claimed.lease_token + 1
    assert [e.key for e in again.journal] == ["a"]


# --- leases --------------------------------------------------------------------------------


async def test_renew_leases(store: Store) -> None:
    clock = ManualClock(T0)
    await store.schedule_flows([flow("a"), flow("b"), flow("c")], clock.now_ms())
    mine = await store.claim_flows("s1", ["orders"], 2, clock.now_ms() + TTL, clock.now_ms())
    theirs = await store.claim_flows("s2", ["orders"], 2, clock.now_ms() + TTL, clock.now_ms())
    assert [c.flow_id for c in mine] == ["a", "b"]
    assert [c.flow_id for c in theirs] == ["c"]
    clock.advance(5_000)
    assert await store.renew_leases("s1", clock.now_ms() + TTL) == 2
    for flow_id, expires in (("a", T0 + 5_000 + TTL), ("b", T0 + 5_000 + TTL), ("c", T0 + TTL)):
        record = await store.get_flow(flow_id)
        assert record is not None
        assert record.lease_expires_at == expires
    done = FlowFinish("a", mine[0].lease_token, FlowStatus.COMPLETED, result=b"")
    assert await finished(store, [done], clock.now_ms()) == [OK]
    assert await store.renew_leases("s1", clock.now_ms() + TTL) == 1
    assert await store.renew_leases("nobody", clock.now_ms() + TTL) == 0


async def test_renew_leases_on_named_flows_only(store: Store) -> None:
    clock = ManualClock(T0)
    await store.schedule_flows([flow("a"), flow("b"), flow("c")], clock.now_ms())
    await store.claim_flows("s1", ["orders"], 2, clock.now_ms() + TTL, clock.now_ms())
    await store.claim_flows("s2", ["orders"], 1, clock.now_ms() + TTL, clock.now_ms())
    clock.advance(5_000)
    # "b" is leased to s1 but its worker does not run it: it is not renewed and lapses.
    # "c" is another session's, "x" nobody's: named, but not s1's to renew.
    assert await store.renew_leases("s1", clock.now_ms() + TTL, ["a", "c", "x", "a"]) == 1
    assert await store.renew_leases("s1", clock.now_ms() + TTL, []) == 0
    expiries = {}
    for flow_id in ("a", "b", "c"):
        record = await store.get_flow(flow_id)
        assert record is not None
        expiries[flow_id] = record.lease_expires_at
    assert expiries == {"a": T0 + 5_000 + TTL, "b": T0 + TTL, "c": T0 + TTL}
    expired = await store.expire_leases(T0 + TTL + 1, 100)
    assert sorted(lease.flow_id for lease in expired) == ["b", "c"]


async def test_expire_leases(store: Store) -> None:
    clock = ManualClock(T0)
    await store.schedule_flows([flow("a"), flow("b")], clock.now_ms())
    claimed = await store.claim_flows("s1", ["orders"], 2, T0 + 1_000, clock.now_ms())
    await store.renew_leases("s1", T0 + 1_000)
    assert await store.renew_leases("s1", T0 + 1_000) == 2
    assert await store.expire_leases(T0 + 1_000, 100) == []
    clock.set(T0 + 1_001)
    # Each lease with the token it had, so the engine revokes that lease and no newer one.
    assert await store.expire_leases(clock.now_ms(), 100) == [
        Lease(f.flow_id, f.lease_token) for f in claimed
    ]
    assert await store.expire_leases(clock.now_ms(), 100) == []
    record = await store.get_flow("a")
    assert record is not None
    assert record.status is FlowStatus.PENDING
    assert (record.ready_at, record.updated_at, record.attempt) == (T0 + 1_001, T0 + 1_001, 1)
    assert (record.lease_token, record.lease_owner, record.lease_expires_at) == (1, None, None)
    assert await store.record_steps([step(claimed[0], "x")], clock.now_ms()) == [LEASE_LOST]
    assert await store.renew_leases("s1", T0 + 9_000) == 0
    again = await store.claim_flows("s2", ["orders"], 2, T0 + 9_000, clock.now_ms())
    assert [(c.flow_id, c.lease_token) for c in again] == [("a", 2), ("b", 2)]


async def test_expire_leases_takes_the_soonest_expired_first_a_batch_at_a_time(
    store: Store,
) -> None:
    expiries = {"a": 50, "b": 10, "c": 30, "d": 10, "e": 9_999}
    claimed = {}
    for flow_id, expires_in in expiries.items():
        await store.schedule_flows([flow(flow_id)], T0)
        (claimed[flow_id],) = await store.claim_flows("s1", ["orders"], 1, T0 + expires_in, T0)
    now = T0 + 100
    assert await store.expire_leases(now, 0) == []
    # Ties (b and d) in scheduling order.
    assert await store.expire_leases(now, 2) == [lease(claimed["b"]), lease(claimed["d"])]
    assert await store.expire_leases(now, 2) == [lease(claimed["c"]), lease(claimed["a"])]
    assert await store.expire_leases(now, 2) == []
    page = await store.list_flows([], None, 10, None)
    assert [(r.flow_id, r.status) for r in page.flows] == [
        ("a", FlowStatus.PENDING),
        ("b", FlowStatus.PENDING),
        ("c", FlowStatus.PENDING),
        ("d", FlowStatus.PENDING),
        ("e", FlowStatus.RUNNING),
    ]


async def test_reattach_leases(store: Store) -> None:
    await store.schedule_flows([flow("live"), flow("late"), flow("wrong")], T0)
    claimed = await store.claim_flows("old", ["orders"], 3, T0 + 1_000, T0)
    live, late, wrong = claimed
    await store.renew_leases("old", T0 + 1_000)
    # Make "late" expire earlier than the others.
    assert await store.release_flows([lease(late)], T0) == [OK]
    (late,) = await store.claim_flows("old", ["orders"], 1, T0 + 500, T0)
    moved = await store.reattach_leases(
        "new",
        [
            lease(live),
            lease(late),
            Lease(wrong.flow_id, wrong.lease_token + 1),
            Lease("missing", 1),
            lease(live),
        ],
        T0 + 20_000,
        T0 + 600,
    )
    assert moved == ["live"]
    record = await store.get_flow("live")
    assert record is not None
    assert (record.lease_owner, record.lease_expires_at, record.lease_token) == (
        "new",
        T0 + 20_000,
        live.lease_token,
    )
    record = await store.get_flow("late")
    assert record is not None
    assert (record.lease_owner, record.lease_expires_at) == ("old", T0 + 500)
    # Valid up to and including lease_expires_at.
    assert await store.reattach_leases("new", [lease(wrong)], T0 + 20_000, T0 + 1_000) == ["wrong"]
    assert await store.renew_leases("new", T0 + 30_000) == 2
    assert await store.reattach_leases("new", [], T0 + 20_000, T0) == []


# --- cancellation --------------------------------------------------------------------------


async def test_cancel(store: Store) -> None:
    await store.schedule_flows([flow("pending")], T0)
    assert await cancelled(store, "pending", "not needed", T0 + 1) is CancelOutcome.CANCELLED
    record = await store.get_flow("pending")
    assert record is not None
    assert record.status is FlowStatus.CANCELLED
    assert record.error is not None
    assert record.error.message == "not needed"
    assert (record.completed_at, record.updated_at) == (T0 + 1, T0 + 1)
    assert await store.claim_flows("s", ["orders"], 10, T0 + TTL, T0 + 2) == []

    # A running flow is asked to stop; it ends CANCELLED when it finishes, whatever it asks.
    claimed = await claim_one(store, "running", now=T0 + 2)
    assert await cancelled(store, "running", "stop", T0 + 3) is CancelOutcome.CANCEL_REQUESTED
    record = await store.get_flow("running")
    assert record is not None
    assert (record.status, record.lease_owner, record.cancel_requested) == (
        FlowStatus.RUNNING,
        "s1",
        True,
    )
    assert await store.record_steps([step(claimed, "a")], T0 + 4) == [OK]
    done = FlowFinish("running", claimed.lease_token, FlowStatus.COMPLETED, result=b"")
    assert await finished(store, [done], T0 + 4) == [OK]
    record = await store.get_flow("running")
    assert record is not None
    assert (record.status, record.result, record.lease_owner, record.lease_expires_at) == (
        FlowStatus.CANCELLED,
        None,
        None,
        None,
    )
    assert record.error is not None
    assert record.error.message == "stop"
    assert await store.release_flows([lease(claimed)], T0 + 4) == [LEASE_LOST]

    assert await cancelled(store, "running", "again", T0 + 5) is CancelOutcome.CLOSED
    record = await store.get_flow("running")
    assert record is not None
    assert record.error is not None
    assert record.error.message == "stop"
    complete_flow = await claim_one(store, "finished", now=T0 + 5)
    complete = FlowFinish("finished", complete_flow.lease_token, FlowStatus.COMPLETED, result=b"")
    assert await finished(store, [complete], T0 + 6) == [OK]
    assert await cancelled(store, "finished", "late", T0 + 7) is CancelOutcome.CLOSED
    assert await cancelled(store, "missing", "?", T0 + 7) is CancelOutcome.NOT_FOUND


# --- listing -------------------------------------------------------------------------------


async def test_list_flows_paging_and_filters(store: Store) -> None:
    await store.schedule_flows(
        [flow(f"f{index:02d}", "even" if index % 2 == 0 else "odd") for index in range(25)], T0
    )
    seen: list[str] = []
    cursor: int | None = None
    pages = 0
    while True:
        page = await store.list_flows([], None, 10, cursor)
        seen += [record.flow_id for record in page.flows]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"f{index:02d}" for index in range(25)]
    assert pages == 3

    claimed = await store.claim_flows("s", ["even"], 3, T0 + TTL, T0)
    assert [c.flow_id for c in claimed] == ["f00", "f02", "f04"]
    running = await store.list_flows([FlowStatus.RUNNING], None, 10, None)
    assert [r.flow_id for r in running.flows] == ["f00", "f02", "f04"]
    assert running.next_cursor is None
    page = await store.list_flows([FlowStatus.PENDING], "even", 4, None)
    assert [r.flow_id for r in page.flows] == ["f06", "f08", "f10", "f12"]
    assert page.next_cursor is not None
    page = await store.list_flows([FlowStatus.PENDING], "even", 4, page.next_cursor)
    assert [r.flow_id for r in page.flows] == ["f14", "f16", "f18", "f20"]
    page = await store.list_flows([FlowStatus.PENDING], "even", 4, page.next_cursor)
    assert [r.flow_id for r in page.flows] == ["f22", "f24"]
    assert page.next_cursor is None
    both = await store.list_flows([FlowStatus.RUNNING, FlowStatus.PENDING], "odd", 100, None)
    assert len(both.flows) == 12
    # An exact fit ends without an empty extra page.
    exact = await store.list_flows([FlowStatus.RUNNING], None, 3, None)
    assert (len(exact.flows), exact.next_cursor) == (3, None)
    assert (await store.list_flows([FlowStatus.FAILED], None, 10, None)).flows == []
    assert (await store.list_flows([], "nothing", 10, None)).flows == []
    with pytest.raises(InvalidArgumentError):
        await store.list_flows([], None, 0, None)


# --- signals -------------------------------------------------------------------------------


async def test_signals(store: Store) -> None:
    delivered = SignalOutcome.DELIVERED
    await store.schedule_flows([flow("f1")], T0)
    assert await store.send_signal("f1", "approve", b"1", "", T0) == SignalResult(delivered, 1)
    assert await store.send_signal("f1", "approve", b"2", "", T0) == SignalResult(delivered, 2)
    assert await store.send_signal("f1", "reject", b"x", "r1", T0) == SignalResult(delivered, 1)
    # A known request id answers the first delivery and appends nothing.
    assert await store.send_signal("f1", "reject", b"x", "r1", T0) == SignalResult(delivered, 1)
    assert await store.send_signal("f1", "reject", b"y", "r2", T0) == SignalResult(delivered, 2)
    assert await store.send_signal("f1", "approve", b"3", "r3", T0) == SignalResult(delivered, 3)
    assert await store.send_signal("missing", "approve", b"", "", T0) == SignalResult(
        SignalOutcome.NOT_FOUND
    )
    await store.schedule_flows([flow("f2")], T0)
    assert await store.send_signal("f2", "approve", b"", "r1", T0) == SignalResult(delivered, 1)
    assert await cancelled(store, "f1", "done", T0) is CancelOutcome.CANCELLED
    assert await store.send_signal("f1", "approve", b"", "", T0) == SignalResult(
        SignalOutcome.CLOSED
    )
    # A retried delivery still gets its first answer after the flow closed.
    assert await store.send_signal("f1", "reject", b"x", "r1", T0) == SignalResult(delivered, 1)


async def test_signal_with_schedule(store: Store) -> None:
    delivered = SignalOutcome.DELIVERED
    new = flow("f1", request_id="req")
    assert await store.signal_with_schedule(new, "go", b"1", T0) == (
        ScheduleResult("f1", CREATED),
        SignalResult(delivered, 1),
    )
    record = await store.get_flow("f1")
    assert record is not None
    assert record.status is FlowStatus.PENDING
    # A retry of the same call is answered by its request id and delivers nothing new.
    assert await store.signal_with_schedule(new, "go", b"1", T0) == (
        ScheduleResult("f1", EXISTING),
        SignalResult(delivered, 1),
    )
    assert await store.signal_with_schedule(flow("f1"), "go", b"2", T0) == (
        ScheduleResult("f1", EXISTING),
        SignalResult(delivered, 2),
    )
    assert await store.signal_with_schedule(flow("f1", data=b"other"), "go", b"3", T0) == (
        ScheduleResult("f1", CONFLICT),
        SignalResult(SignalOutcome.NOT_FOUND),
    )
    assert await store.send_signal("f1", "go", b"4", "", T0) == SignalResult(delivered, 3)
    await cancelled(store, "f1", "stop", T0)
    assert await store.signal_with_schedule(flow("f1"), "go", b"5", T0) == (
        ScheduleResult("f1", EXISTING),
        SignalResult(SignalOutcome.CLOSED),
    )
    with pytest.raises(InvalidArgumentError):
        await store.signal_with_schedule(flow(""), "go", b"", T0)


# --- text the database cannot hold ----------------------------------------------------------

NUL = "a\x00b"


def _nul_calls(claimed: ClaimedFlow) -> dict[str, Callable[[Store], Awaitable[object]]]:
    """Every verb with a NUL in one of its text arguments, by name."""
    token = claimed.lease_token

    def record(**fields: Any) -> StepRecord:
        base = step(claimed, "s2")
        return StepRecord(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **fields})

    def signal_wait(**fields: Any) -> WaitRequest:
        base = {"flow_id": "f1", "lease_token": token, "key": "w", "kind": EntryKind.SIGNAL}
        return WaitRequest(**{**base, "signal_name": "go", **fields})

    done = FlowFinish("f1", token, FlowStatus.COMPLETED, result=b"")
    return {
        "register_flow_types": lambda s: s.register_flow_types(["orders", NUL], T0),
        "schedule_flows:flow_id": lambda s: s.schedule_flows([flow(NUL)], T0),
        "schedule_flows:flow_type": lambda s: s.schedule_flows([flow("f9", NUL)], T0),
        "schedule_flows:request_id": lambda s: s.schedule_flows([flow("f9", request_id=NUL)], T0),
        "claim_flows:session": lambda s: s.claim_flows(NUL, ["orders"], 1, T0 + TTL, T0),
        "claim_flows:type": lambda s: s.claim_flows("s2", [NUL], 1, T0 + TTL, T0),
        "record_steps:flow_id": lambda s: s.record_steps([record(flow_id=NUL)], T0),
        "record_steps:key": lambda s: s.record_steps([record(key=NUL)], T0),
        "record_steps:args_hash": lambda s: s.record_steps([record(args_hash=NUL)], T0),
        "finish_flows:flow_id": lambda s: s.finish_flows(
            [FlowFinish(NUL, token, FlowStatus.COMPLETED, result=b"")], T0
        ),
        "finish_flows:requires_keys": lambda s: s.finish_flows(
            [FlowFinish("f1", token, FlowStatus.COMPLETED, result=b"", requires_keys=(NUL,))],
            T0,
        ),
        "release_flows": lambda s: s.release_flows([Lease(NUL, token)], T0),
        "renew_leases:session": lambda s: s.renew_leases(NUL, T0 + TTL),
        "renew_leases:flow_ids": lambda s: s.renew_leases("s1", T0 + TTL, ["f1", NUL]),
        "reattach_leases:session": lambda s: s.reattach_leases(NUL, [lease(claimed)], T0, T0),
        "reattach_leases:flow_id": lambda s: s.reattach_leases("s2", [Lease(NUL, 1)], T0, T0),
        "cancel_flow": lambda s: s.cancel_flow(NUL, "why", T0),
        "send_signal:flow_id": lambda s: s.send_signal(NUL, "go", b"", "", T0),
        "send_signal:name": lambda s: s.send_signal("f1", NUL, b"", "", T0),
        "send_signal:request_id": lambda s: s.send_signal("f1", "go", b"", NUL, T0),
        "signal_with_schedule:flow_id": lambda s: s.signal_with_schedule(flow(NUL), "go", b"", T0),
        "signal_with_schedule:name": lambda s: s.signal_with_schedule(flow("f1"), NUL, b"", T0),
        "register_waits:flow_id": lambda s: s.register_waits([signal_wait(flow_id=NUL)], T0),
        "register_waits:key": lambda s: s.register_waits([signal_wait(key=NUL)], T0),
        "register_waits:signal_name": lambda s: s.register_waits(
            [signal_wait(signal_name=NUL)], T0
        ),
        "register_waits:child": lambda s: s.register_waits(
            [signal_wait(kind=EntryKind.CHILD, signal_name="", child=flow(NUL))], T0
        ),
        "suspend_flows:flow_id": lambda s: s.suspend_flows(
            [SuspendRequest(NUL, token, ("w",))], T0
        ),
        "suspend_flows:open_keys": lambda s: s.suspend_flows(
            [SuspendRequest("f1", token, (NUL,))], T0
        ),
        "suspend_flows:abandoned_keys": lambda s: s.suspend_flows(
            [SuspendRequest("f1", token, ("w",), (NUL,))], T0
        ),
        "park_flows": lambda s: s.park_flows([Park(NUL, token, BOOM)], T0, 10, 100),
        "get_flow": lambda s: s.get_flow(NUL),
        "list_flows": lambda s: s.list_flows([], NUL, 10, None),
        "get_history": lambda s: s.get_history(NUL, 0, 10),
        "get_entry:flow_id": lambda s: s.get_entry(NUL, "s1"),
        "get_entry:key": lambda s: s.get_entry("f1", NUL),
        "next_ready_at": lambda s: s.next_ready_at(["orders", NUL]),
        "known_flow_types": lambda s: s.known_flow_types([NUL]),
        # The one that is fine: a done flow's first finish, to check nothing else applied.
        "ok:finish": lambda s: s.finish_flows([done], T0 + 1),
    }


async def test_text_with_nul_is_refused_alike_by_every_verb(store: Store) -> None:
    """PostgreSQL cannot hold NUL: every store refuses it up front, and applies nothing."""
    claimed = await claim_one(store, "f1")
    assert await store.record_steps([step(claimed, "s1")], T0) == [OK]
    before = (await store.get_flow("f1"), await store.get_history("f1", 0, 10))
    calls = _nul_calls(claimed)
    applied: list[str] = []
    for name, call in calls.items():
        if name.startswith("ok:"):
            continue
        try:
            await call(store)
        except InvalidArgumentError as error:
            assert "NUL" in error.message, (name, error.message)
        else:
            applied.append(name)
    assert applied == []
    assert (await store.get_flow("f1"), await store.get_history("f1", 0, 10)) == before
    assert await store.get_flow("f9") is None
    assert (await calls["ok:finish"](store)) == ([OK], [])


async def test_a_nul_in_one_caller_s_write_fails_only_that_caller(store: Store) -> None:
    """Refused before it is queued: the other writes of its group commit apply as usual."""
    first = await claim_one(store, "f1")
    second = await claim_one(store, "f2")
    bad = StepRecord(
        flow_id="f2",
        lease_token=second.lease_token,
        key="s1",
        kind=EntryKind.STEP,
        args_hash="hash\x00",
        attempts=1,
        status=EntryStatus.COMPLETED,
        result=b"r",
    )
    results = await asyncio.gather(
        store.record_steps([step(first, "s1")], T0),
        store.record_steps([bad], T0),
        store.send_signal("f1", "go", b"p", "", T0),
        return_exceptions=True,
    )
    assert results[0] == [OK]
    assert isinstance(results[1], InvalidArgumentError)
    assert isinstance(results[2], SignalResult) and results[2].outcome is SignalOutcome.DELIVERED
    assert await store.get_history("f2", 0, 10) == []


async def test_failures_and_labels_keep_nul_and_control_characters(store: Store) -> None:
    """Stored as JSON, a failure's text and labels may hold any character, on every store."""
    text = "line 1\x00\x01\x1b[31m\r\n\u2028 end"
    failure = Failure(type="E\x00", message=text, stack_trace=text, reason="R\x00")
    await store.schedule_flows([flow("f1", labels={"k\x00": text})], T0)
    (claimed,) = await store.claim_flows("s1", ["orders"], 1, T0 + TTL, T0)
    records = [step(claimed, "s1", EntryStatus.FAILED, result=None, error=failure)]
    assert await store.record_steps(records, T0) == [OK]
    end = FlowFinish("f1", claimed.lease_token, FlowStatus.FAILED, error=failure)
    assert await finished(store, [end], T0 + 1) == [OK]
    record = await store.get_flow("f1")
    assert record is not None
    assert (record.error, record.labels) == (failure, {"k\x00": text})
    (entry,) = await store.get_history("f1", 0, 10)
    assert entry.error == failure


# --- group commit ------------------------------------------------------------------------


async def test_concurrent_record_steps_get_their_own_outcomes(store: Store) -> None:
    await store.schedule_flows([flow(f"f{index}") for index in range(20)], T0)
    claimed = await store.claim_flows("s", ["orders"], 20, T0 + TTL, T0)
    calls: list[list[StepRecord]] = []
    expected: list[list[WriteOutcome]] = []
    for index in range(400):
        target = claimed[index % 20]
        if index % 7 == 3:
            calls.append([step((target.flow_id, target.lease_token + 1), f"k{index}")])
            expected.append([LEASE_LOST])
        elif index % 11 == 5:
            calls.append([step(("ghost", 1), f"k{index}"), step(target, f"k{index}")])
            expected.append([NOT_FOUND, OK])
        else:
            calls.append([step(target, f"k{index}", result=str(index).encode())])
            expected.append([OK])
    outcomes = await asyncio.gather(*(store.record_steps(records, T0) for records in calls))
    assert outcomes == expected
    for position, target in enumerate(claimed):
        history = await store.get_history(target.flow_id, 0, 1_000)
        keys = [f"k{index}" for index in range(position, 400, 20) if expected[index][-1] is OK]
        assert [e.key for e in history] == keys
        assert [e.sequence for e in history] == list(range(1, len(keys) + 1))


async def test_concurrent_writes_apply_in_call_order(store: Store) -> None:
    a = await claim_one(store, "a")
    b = await claim_one(store, "b")
    await store.schedule_flows([flow("c")], T0)
    finish_a = FlowFinish("a", a.lease_token, FlowStatus.COMPLETED, result=b"")
    results = await asyncio.gather(
        store.record_steps([step(a, "1")], T0),
        store.record_steps([step(b, "1")], T0),
        store.finish_flows([finish_a], T0),
        store.record_steps([step(a, "2")], T0),
        store.record_steps([step(b, "2")], T0),
        store.cancel_flow("b", "stop", T0),
        store.record_steps([step(b, "3")], T0),
        store.send_signal("b", "s", b"", "", T0),
        store.schedule_flows([flow("d")], T0),
        store.claim_flows("s", ["orders"], 10, T0 + TTL, T0),
        store.record_steps([step(a, "3")], T0),
        store.schedule_flows([flow("e")], T0),
        store.send_signal("c", "s", b"", "", T0),
        store.finish_flows([finish_a], T0),
    )
    claimed = results[9]
    assert isinstance(claimed, list)
    assert results == [
        [OK],
        [OK],
        ([OK], []),
        [LEASE_LOST],
        [OK],
        (CancelOutcome.CANCEL_REQUESTED, []),
        [OK],
        SignalResult(SignalOutcome.DELIVERED, 1),
        [ScheduleResult("d", CREATED)],
        claimed,
        [LEASE_LOST],
        [ScheduleResult("e", CREATED)],
        SignalResult(SignalOutcome.DELIVERED, 1),
        ([OK], []),
    ]
    assert [c.flow_id for c in claimed] == ["c", "d"]
    assert [e.key for e in await store.get_history("a", 0, 10)] == ["1"]
    assert [e.key for e in await store.get_history("b", 0, 10)] == ["1", "2", "$cancel", "3"]
    page = await store.list_flows([], None, 10, None)
    assert [r.flow_id for r in page.flows] == ["a", "b", "c", "d", "e"]


Op = Callable[[Store], Awaitable[Any]]


def _random_op(rng: random.Random, now: int) -> Op:
    flow_id = f"f{rng.randrange(6)}"
    token = rng.randrange(4)
    choice = rng.randrange(12)
    if choice == 0:
        new = flow(
            flow_id,
            rng.choice(["x", "y"]),
            rng.choice([b"a", b"b"]),
            request_id=rng.choice(["", "", "r1", "r2"]),
            start_at=rng.choice([None, now - 5, now + 5]),
        )
        return lambda store: store.schedule_flows([new], now)
    if choice == 1:
        types = rng.choice([["x"], ["y"], ["x", "y"]])
        limit = rng.randrange(1, 4)
        session = rng.choice(["s1", "s2"])
        return lambda store: store.claim_flows(session, types, limit, now + 50, now)
    if choice in (2, 3, 4):
        records = [
            StepRecord(
                flow_id=rng.choice([flow_id, f"f{rng.randrange(6)}"]),
                lease_token=rng.randrange(4),
                key=f"k{rng.randrange(4)}",
                kind=EntryKind.STEP,
                args_hash="h",
                attempts=rng.randrange(1, 4),
                status=rng.choice(list(EntryStatus)),
                result=rng.choice([None, b"r1", b"r2"]),
                error=rng.choice([None, BOOM]),
            )
            for _ in range(rng.randrange(1, 4))
        ]
        return lambda store: store.record_steps(records, now)
    if choice == 5:
        finish = FlowFinish(
            flow_id,
            token,
            rng.choice([FlowStatus.COMPLETED, FlowStatus.FAILED]),
            result=b"out",
            error=BOOM,
            retry_delay_ms=rng.choice([0, 0, 3]),
        )
        return lambda store: store.finish_flows([finish, finish], now)
    if choice == 6:
        leases = [Lease(flow_id, token), Lease(f"f{rng.randrange(6)}", rng.randrange(4))]
        return lambda store: store.release_flows(leases, now)
    if choice == 7:
        return lambda store: store.cancel_flow(flow_id, "stop", now)
    if choice == 8:
        name = rng.choice(["a", "b"])
        request_id = rng.choice(["", "q1", "q2"])
        return lambda store: store.send_signal(flow_id, name, b"p", request_id, now)
    if choice == 9:
        new = flow(flow_id, "x", b"a", request_id=rng.choice(["", "r1", "r3"]))
        return lambda store: store.signal_with_schedule(new, "a", b"p", now)
    if choice == 10:
        return lambda store: store.expire_leases(now, 100)
    session = rng.choice(["s1", "s2", "s3"])
    if rng.random() < 0.5:
        return lambda store: store.renew_leases(session, now + 60)
    leases = [Lease(f"f{rng.randrange(6)}", rng.randrange(4)) for _ in range(2)]
    return lambda store: store.reattach_leases(session, leases, now + 60, now)


async def _snapshot(store: Store) -> list[Any]:
    page = await store.list_flows([], None, 1_000, None)
    return [(record, await store.get_history(record.flow_id, 0, 1_000)) for record in page.flows]


async def test_concurrent_calls_equal_sequential_calls(store: Store) -> None:
    """Random concurrent calls give the answers and state of the same calls made one by one."""
    reference = MemoryStore()
    await reference.open()
    rng = random.Random(20_240_601)
    for round_number in range(40):
        now = T0 + round_number * 10
        ops = [_random_op(rng, now) for _ in range(rng.randrange(1, 40))]
        concurrent = await asyncio.gather(*(op(store) for op in ops))
        sequential = [await op(reference) for op in ops]
        assert concurrent == sequential, f"round {round_number}"
        assert await _snapshot(store) == await _snapshot(reference), f"round {round_number}"
    await reference.close()


class _WaitOps:
    """Random calls of every verb, aimed at live leases so that most of them apply.

    Each round draws its calls from the reference store's state at the start of the round:
    a fenced call uses the flow's current lease token four times out of five. The flow ids
    slide forward with the rounds, so new flows keep arriving as old ones end.
    """

    KEYS = ("w0", "w1", "w2", "w3", "k0")

    def __init__(self, rng: random.Random, round_number: int, tokens: dict[str, int]) -> None:
        self.rng = rng
        self.now = T0 + round_number * 10
        self.flows = [f"f{index}" for index in range(round_number, round_number + 8)]
        self.children = [f"c{index}" for index in range(round_number // 2, round_number // 2 + 4)]
        self.tokens = tokens

    def flow_id(self) -> str:
        if self.tokens and self.rng.random() < 0.75:
            return self.rng.choice(sorted(self.tokens))
        return self.rng.choice(self.flows)

    def token(self, flow_id: str) -> int:
        if flow_id in self.tokens and self.rng.random() < 0.8:
            return self.tokens[flow_id]
        return self.rng.randrange(4)

    def wait(self) -> WaitRequest:
        rng = self.rng
        flow_id = self.flow_id()
        token = self.token(flow_id)
        # Mostly wait keys; sometimes a step key, whose entry may exist already.
        key = rng.choice(self.KEYS)
        kind = rng.choice([EntryKind.TIMER, EntryKind.SIGNAL, EntryKind.CHILD])
        if kind is EntryKind.TIMER:
            fire_at = self.now + rng.choice([-5, 0, 4, 15, 30])
            return WaitRequest(flow_id, token, key, kind, fire_at=fire_at)
        if kind is EntryKind.SIGNAL:
            return WaitRequest(flow_id, token, key, kind, signal_name=rng.choice(["a", "b"]))
        child_id = rng.choice([*self.children, *self.children, *self.flows])
        if child_id == flow_id:
            child_id = self.children[0]
        child = flow(
            child_id,
            rng.choice(["x", "y"]),
            rng.choice([b"a", b"b"]),
            request_id=rng.choice(["", "", "", "r1", "r4"]),
        )
        return WaitRequest(flow_id, token, key, kind, child=child)

    def op(self) -> Op:
        rng = self.rng
        now = self.now
        choice = rng.randrange(16)
        if choice == 0:
            new = [
                flow(flow_id, rng.choice(["x", "y"]), b"a", request_id=rng.choice(["", "r2"]))
                for flow_id in rng.sample(self.flows, 2)
            ]
            return lambda store: store.schedule_flows(new, now)
        if choice in (1, 2):
            types = rng.choice([["x"], ["y"], ["x", "y"]])
            limit = rng.randrange(1, 4)
            return lambda store: store.claim_flows("s1", types, limit, now + 50, now)
        if choice in (3, 4):
            flow_id = self.flow_id()
            records = [
                StepRecord(
                    flow_id,
                    self.token(flow_id),
                    f"k{rng.randrange(2)}",
                    EntryKind.STEP,
                    "h",
                    1,
                    rng.choice([EntryStatus.COMPLETED, EntryStatus.FAILED]),
                    b"r",
                    BOOM,
                )
            ]
            return lambda store: store.record_steps(records, now)
        if choice == 5:
            finishes = []
            for flow_id in (self.flow_id(), rng.choice(self.children)):
                finishes.append(
                    FlowFinish(
                        flow_id,
                        self.token(flow_id),
                        rng.choice([FlowStatus.COMPLETED, FlowStatus.FAILED]),
                        result=flow_id.encode(),
                        error=BOOM,
                        retry_delay_ms=rng.choice([0, 0, 0, 3]),
                    )
                )
            return lambda store: store.finish_flows(finishes, now)
        if choice == 6:
            flow_id = self.flow_id()
            leases = [Lease(flow_id, self.token(flow_id))]
            return lambda store: store.release_flows(leases, now)
        if choice == 7 and rng.random() < 0.25:
            flow_id = rng.choice([*self.flows, *self.children])
            return lambda store: store.cancel_flow(flow_id, "stop", now)
        if choice in (7, 8, 9):
            waits = [self.wait() for _ in range(rng.randrange(1, 4))]
            return lambda store: store.register_waits(waits, now)
        if choice in (10, 11):
            requests = []
            for _ in range(rng.randrange(1, 3)):
                flow_id = self.flow_id()
                keys = tuple(rng.sample(self.KEYS, rng.randrange(0, 3)))
                # The first key not waited for is given up (no draw: the sequence stays).
                abandoned = tuple(k for k in self.KEYS if k not in keys)[:1]
                requests.append(SuspendRequest(flow_id, self.token(flow_id), keys, abandoned))
            return lambda store: store.suspend_flows(requests, now)
        if choice == 12:
            limit = rng.randrange(1, 4)
            return lambda store: store.fire_timers(now, limit)
        if choice == 13:
            flow_id = self.flow_id()
            parks = [Park(flow_id, self.token(flow_id), BOOM)]
            return lambda store: store.park_flows(parks, now, 2, 8)
        if choice == 14:
            return lambda store: store.expire_leases(now, 100)
        flow_id = self.flow_id()
        name = rng.choice(["a", "b"])
        request_id = rng.choice(["", "", "q1", "q3"])
        return lambda store: store.send_signal(
            flow_id, name, b"s" + flow_id.encode(), request_id, now
        )


async def _wait_snapshot(store: Store) -> list[Any]:
    return [await store.next_timer_at(), *await _snapshot(store)]


@pytest.mark.parametrize("seed", [7, 20_250_101])
async def test_concurrent_wait_calls_equal_sequential_calls(store: Store, seed: int) -> None:
    """The same with every verb: waits, suspends, timers, parks, cancels and child flows."""
    reference = MemoryStore()
    await reference.open()
    rng = random.Random(seed)
    for round_number in range(80):
        now = T0 + round_number * 10
        # Keep flows coming and running: the same calls, one by one, on both stores.
        new = [
            flow(f"f{index}", "xy"[index % 2], b"a")
            for index in range(round_number, round_number + 8)
        ]
        for store_ in (store, reference):
            await store_.schedule_flows(new, now)
            await store_.claim_flows("s0", ["x", "y"], 6, now + 50, now)
        page = await reference.list_flows([FlowStatus.RUNNING], None, 1_000, None)
        tokens = {record.flow_id: record.lease_token for record in page.flows}
        maker = _WaitOps(rng, round_number, tokens)
        ops = [maker.op() for _ in range(rng.randrange(1, 40))]
        concurrent = await asyncio.gather(*(op(store) for op in ops))
        sequential = [await op(reference) for op in ops]
        assert concurrent == sequential, f"round {round_number}"
        if round_number % 5 == 4:
            assert await _wait_snapshot(store) == await _wait_snapshot(reference), (
                f"round {round_number}"
            )
    await reference.close()


async def test_close_commits_queued_writes(backend: Backend) -> None:
    if not backend.survives_reopen:
        pytest.skip(f"{backend.name} keeps nothing across close")
    first = backend.make()
    await first.open()
    pending = [
        asyncio.ensure_future(first.schedule_flows([flow(f"f{index}")], T0)) for index in range(50)
    ]
    await asyncio.sleep(0)
    await first.close()
    assert [result for task in pending for result in await task] == [
        ScheduleResult(f"f{index}", CREATED) for index in range(50)
    ]
    second = backend.make()
    await second.open()
    try:
        page = await second.list_flows([], None, 100, None)
        assert len(page.flows) == 50
    finally:
        await second.close()


async def test_a_failing_commit_observer_neither_fails_nor_repeats_a_write(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def observer(seconds: float, writes: int) -> None:
        seen.append(writes)
        raise RuntimeError("observer broke")

    store.observe_commits(observer)
    assert await store.schedule_flows([flow("f1")], T0) == [ScheduleResult("f1", CREATED)]
    assert await store.schedule_flows([flow("f2")], T0) == [ScheduleResult("f2", CREATED)]
    page = await store.list_flows([], None, 10, None)
    assert sorted(f.flow_id for f in page.flows) == ["f1", "f2"]
    # The memory store has no commits to report.
    if seen:
        assert seen == [1, 1]
        assert "the commit observer failed" in caplog.text


# --- SQLite machinery ----------------------------------------------------------------------


async def test_sqlite_failing_command_fails_alone(sqlite_store: SqliteStore) -> None:
    claimed = await claim_one(sqlite_store, "f1")
    poison = StepRecord(
        flow_id="f1",
        lease_token=claimed.lease_token,
        key="poison",
        kind=EntryKind.STEP,
        args_hash="h",
        attempts=1,
        status=EntryStatus.COMPLETED,
        result=object(),  # type: ignore[arg-type]
    )
    results = await asyncio.gather(
        sqlite_store.record_steps([step(claimed, "a")], T0),
        sqlite_store.record_steps([poison], T0),
        sqlite_store.record_steps([step(claimed, "b")], T0),
        return_exceptions=True,
    )
    assert results[0] == [OK]
    assert isinstance(results[1], StoreError)
    assert not isinstance(results[1], StoreUnavailableError)
    assert results[2] == [OK]
    assert [e.key for e in await sqlite_store.get_history("f1", 0, 10)] == ["a", "b"]


async def test_sqlite_locked_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ergon.db"
    store = SqliteStore(str(path), busy_timeout_ms=50)
    await store.open()
    try:
        await store.schedule_flows([flow("f1")], T0)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            results = await asyncio.gather(
                store.schedule_flows([flow("f2")], T0),
                store.cancel_flow("f1", "x", T0),
                return_exceptions=True,
            )
            assert all(isinstance(result, StoreUnavailableError) for result in results)
            # Reads do not wait for a writer in WAL mode.
            assert await store.get_flow("f1") is not None
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert await store.schedule_flows([flow("f2")], T0) == [ScheduleResult("f2", CREATED)]
        assert await store.get_flow("f2") is not None
    finally:
        await store.close()


async def test_sqlite_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        SqliteStore(str(tmp_path / "x.db"), synchronous="SOMETIMES")
    store = SqliteStore(str(tmp_path / "x.db"), synchronous="normal")
    await store.open()
    await store.close()


async def test_sqlite_open_twice_is_refused(sqlite_store: SqliteStore) -> None:
    with pytest.raises(StoreError):
        await sqlite_store.open()


async def test_an_sqlite_file_is_open_in_one_store_at_a_time(tmp_path: Path) -> None:
    path = (tmp_path / "ergon.db").resolve()
    first = SqliteStore(str(path))
    await first.open()
    try:
        # Another spelling of the same file is the same file.
        second = SqliteStore(f"{path.parent}/../{path.parent.name}/./{path.name}")
        try:
            with pytest.raises(StoreUnavailableError) as raised:
                await second.open()
        finally:
            await second.close()
        assert raised.value.message.startswith(
            f"sqlite store unavailable: {path} is in use by another ergon-server "
            f"(pid {os.getpid()}), which holds {path}.lock"
        ), raised.value.message
        assert await first.schedule_flows([flow("f1")], T0) == [ScheduleResult("f1", CREATED)]
    finally:
        await first.close()
    # Closing lets go of the file; in memory there is no file to hold.
    third = SqliteStore(str(path))
    await third.open()
    try:
        assert await third.get_flow("f1") is not None
    finally:
        await third.close()
    in_memory = [SqliteStore(":memory:"), SqliteStore(":memory:")]
    for store in in_memory:
        await store.open()
    for store in in_memory:
        await store.close()


# --- create_store --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "path"),
    [
        ("memory://", MemoryStore, None),
        ("sqlite:///relative/ergon.db", SqliteStore, "relative/ergon.db"),
        ("sqlite:////absolute/ergon.db", SqliteStore, "/absolute/ergon.db"),
        ("SQLite:///x.db", SqliteStore, "x.db"),
        ("sqlite://:memory:", SqliteStore, ":memory:"),
    ],
)
def test_create_store(url: str, kind: type, path: str | None) -> None:
    store = create_store(url)
    assert isinstance(store, kind)
    if path is not None:
        assert isinstance(store, SqliteStore)
        assert store.path == path


@pytest.mark.parametrize(
    "url",
    [
        "ergon.db",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/ergon.db",
        "memory://somewhere",
        "mysql://localhost/ergon",
    ],
)
def test_create_store_refuses(url: str) -> None:
    with pytest.raises(InvalidArgumentError):
        create_store(url)


async def test_create_store_opens_sqlite(tmp_path: Path) -> None:
    store = create_store(f"sqlite:///{tmp_path}/deep/dir/ergon.db", sqlite_synchronous="NORMAL")
    await store.open()
    try:
        assert await store.schedule_flows([flow("f")], T0) == [ScheduleResult("f", CREATED)]
    finally:
        await store.close()
    assert (tmp_path / "deep" / "dir" / "ergon.db").exists()


def test_sqlite_errors_are_translated() -> None:
    from ergon_server.storage.sqlite import _translate

    for message in ("database is locked", "disk I/O error", "database or disk is full"):
        error = _translate(sqlite3.OperationalError(message))
        assert isinstance(error, StoreUnavailableError), message
        assert message in error.message
    assert type(_translate(sqlite3.IntegrityError("UNIQUE constraint failed"))) is StoreError
    assert type(_translate(sqlite3.OperationalError("no such table: x"))) is StoreError
    assert type(_translate(RuntimeError("bug"))) is StoreError


async def test_sqlite_hot_statements_use_their_indexes(sqlite_store: SqliteStore) -> None:
    from ergon_server.storage.sqlite import _ClaimFlows

    def plan(sql: str, params: Sequence[object]) -> str:
        conn = sqlite3.connect(sqlite_store.path)
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        finally:
            conn.close()
        return " | ".join(str(row[3]) for row in rows)

    loop = asyncio.get_running_loop()
    for types in (["a"], ["a", "b"]):
        claim = _ClaimFlows(loop.create_future(), "s", types, 10, T0, T0)
        sql, params = claim._candidates()
        detail = plan(sql, params)
        assert "USING INDEX flows_pending" in detail, detail
        assert "SCAN flows" not in detail, detail
    from ergon_server.storage.sqlite import _EXPIRED

    expiry = plan(_EXPIRED, (T0, 500))
    assert "USING INDEX flows_lease_expiry" in expiry, expiry
    assert "SCAN flows" not in expiry and "TEMP B-TREE" not in expiry, expiry


async def test_sqlite_open_waits_migration_runs_again_harmlessly(
    sqlite_store: SqliteStore,
) -> None:
    from ergon_server.storage.migrate import load_migrations

    (migration,) = [m for m in load_migrations("sqlite") if m.version == 3]
    conn = sqlite3.connect(sqlite_store.path)
    try:
        conn.executescript(migration.sql)
        names = conn.execute("SELECT name FROM sqlite_master WHERE name = 'waits_open'").fetchall()
    finally:
        conn.close()
    assert names == [("waits_open",)]


@pytest.mark.parametrize("current", [0, 1, 2])
async def test_migration_runner(current: int) -> None:
    from ergon_server.storage.migrate import Migration, migrate

    class Target:
        def __init__(self) -> None:
            self.version = current
            self.applied: list[int] = []

        async def ensure_version_table(self) -> None:
            pass

        async def current_version(self) -> int:
            return self.version

        async def apply(self, migration: Migration) -> None:
            self.applied.append(migration.version)
            self.version = migration.version

    migrations = [Migration(1, "0001_a.sql", ""), Migration(2, "0002_b.sql", "")]
    target = Target()
    assert await migrate(target, migrations) == 2
    assert target.applied == list(range(current + 1, 3))
    target.version = 3
    with pytest.raises(SchemaVersionError, match=r"version 3 is newer than .* supports \(2\)"):
        await migrate(target, migrations)


def test_sqlite_migrations_are_shipped() -> None:
    from ergon_server.storage.migrate import load_migrations

    migrations = load_migrations("sqlite")
    assert [m.version for m in migrations] == [1, 2, 3]
    assert [m.name for m in migrations] == [
        "0001_initial.sql",
        "0002_waits.sql",
        "0003_open_waits.sql",
    ]


async def test_get_entry_returns_one_journal_entry(store: Store) -> None:
    from ergon_server.model import EntryKind, EntryStatus, NewFlow, StepRecord

    await store.schedule_flows([NewFlow("entry-flow", "T", b"")], 1)
    (claimed,) = await store.claim_flows("s", ["T"], 1, 10_000, 1)
    record = StepRecord(
        "entry-flow", claimed.lease_token, "a#1", EntryKind.STEP, "", 1, EntryStatus.COMPLETED, b"r"
    )
    await store.record_steps([record], 2)
    entry = await store.get_entry("entry-flow", "a#1")
    assert entry is not None and (entry.key, entry.result) == ("a#1", b"r")
    assert await store.get_entry("entry-flow", "b#1") is None
    assert await store.get_entry("no-flow", "a#1") is None
    await store.subscribe(lambda event: None)


async def test_count_flows_by_status_and_type(store: Store) -> None:
    await store.schedule_flows([flow("c1"), flow("c2"), flow("c3", "other")], T0)
    await store.claim_flows("s", ["other"], 1, T0 + TTL, T0)
    assert await store.count_flows() == {
        (FlowStatus.PENDING, "orders"): 2,
        (FlowStatus.RUNNING, "other"): 1,
    }
