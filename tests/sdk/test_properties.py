"""Property-based tests of the converter and of journal replay (hypothesis).

Replay runs `FlowContext` itself, against an in-memory recorder that turns each step result
into the journal entry a server would store (sequence, key, kind, status, value, hash) and
adds nothing else: no server, no mock of the replay under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ergon_server.rpc import convert
from ergon_worker_sdk import (
    FlowCancelledError,
    FlowContext,
    HistoryMismatchError,
    JsonConverter,
    LeaseLostError,
    NonRetryableError,
    PickleConverter,
    StepFailedError,
    await_external_signal,
    flow,
    flow_type,
    schedule_timer,
    step,
)
from ergon_worker_sdk._context import SETTLE_S
from ergon_worker_sdk.errors import InvalidArgumentError
from ergon_worker_sdk.proto.ergon.v1 import common_pb2, worker_pb2

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ converter

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Leaf:
    name: str
    weight: float
    tags: list[str] = field(default_factory=list)


@dataclass
class Node:
    id: int
    color: Color
    level: Level
    leaf: Leaf
    maybe: Leaf | None
    children: list[Leaf]
    index: dict[str, Leaf]
    pair: tuple[int, str]
    many: tuple[int, ...]
    flags: set[int]
    extra: Any


finite = st.floats(allow_nan=False, allow_infinity=False)
leaves = st.builds(Leaf, name=st.text(), weight=finite, tags=st.lists(st.text(), max_size=3))
nodes = st.builds(
    Node,
    id=st.integers(min_value=-(2**63), max_value=2**63),
    color=st.sampled_from(Color),
    level=st.sampled_from(Level),
    leaf=leaves,
    maybe=st.none() | leaves,
    children=st.lists(leaves, max_size=3),
    index=st.dictionaries(st.text(max_size=5), leaves, max_size=3),
    pair=st.tuples(st.integers(), st.text()),
    many=st.lists(st.integers(), max_size=4).map(tuple),
    flags=st.sets(st.integers(min_value=-100, max_value=100), max_size=4),
    extra=json_values,
)


def accepted_by_server(payload: common_pb2.Payload) -> None:
    """The server's own wire check takes every payload the SDK makes."""
    convert.payload_bytes(payload, 1 << 30, "the value")


@SETTINGS
@given(json_values)
def test_json_values_round_trip(value: Any) -> None:
    converter = JsonConverter()
    payload = converter.to_payload(value)
    accepted_by_server(payload)
    assert converter.from_payload(payload) == value
    # As the wire carries it: serialized, parsed back.
    wire = common_pb2.Payload.FromString(payload.SerializeToString())
    assert converter.from_payload(wire) == value


@SETTINGS
@given(nodes)
def test_dataclasses_round_trip_with_their_type_hint(node: Node) -> None:
    converter = JsonConverter()
    payload = converter.to_payload(node)
    accepted_by_server(payload)
    back = converter.from_payload(payload, Node)
    assert back == node
    assert isinstance(back.color, Color) and isinstance(back.leaf, Leaf)
    assert all(isinstance(c, Leaf) for c in back.children)
    assert isinstance(back.many, tuple) and isinstance(back.flags, set)


@SETTINGS
@given(st.sets(st.text(max_size=5) | st.integers(), max_size=6))
def test_sets_encode_in_a_stable_order(values: set[Any]) -> None:
    """A set argument hashes the same whatever its iteration order (string hashing varies)."""
    from ergon_worker_sdk._context import args_hash

    converter = JsonConverter()
    shuffled = set(reversed(list(values)))
    assert converter.to_payload(values) == converter.to_payload(shuffled)
    assert args_hash(converter, (values,), {}) == args_hash(converter, (shuffled,), {})


@settings(SETTINGS, max_examples=40)
@given(st.lists(nodes, max_size=3), st.dictionaries(st.text(max_size=5), nodes, max_size=2))
def test_containers_of_dataclasses_round_trip(items: list[Node], index: dict[str, Node]) -> None:
    converter = JsonConverter()
    assert converter.from_payload(converter.to_payload(items), list[Node]) == items
    assert converter.from_payload(converter.to_payload(index), dict[str, Node]) == index


@SETTINGS
@given(leaves, st.integers(min_value=-(2**53), max_value=2**53))
def test_inline_json_payloads_decode_like_data_payloads(leaf: Leaf, number: int) -> None:
    """A grpcurl user's inline JSON (numbers are doubles there) decodes to the same value."""

    @dataclass
    class Holder:
        leaf: Leaf
        number: int

    holder = Holder(leaf, number)
    value = struct_pb2.Value()
    json_format.ParseDict(json.loads(json.dumps(dataclasses.asdict(holder))), value)
    payload = common_pb2.Payload(json=value)
    accepted_by_server(payload)
    assert JsonConverter().from_payload(payload, Holder) == holder


@SETTINGS
@given(st.binary())
def test_bytes_round_trip_as_binary(data: bytes) -> None:
    converter = JsonConverter()
    payload = converter.to_payload(data)
    assert payload.encoding == "binary/plain"
    accepted_by_server(payload)
    assert converter.from_payload(payload) == data


@SETTINGS
@given(st.one_of(nodes, json_values, st.frozensets(st.integers()), st.complex_numbers()))
def test_pickle_round_trips_anything_it_can(value: Any) -> None:
    assume(not (isinstance(value, complex) and any(map(math.isnan, (value.real, value.imag)))))
    converter = PickleConverter()
    payload = converter.to_payload(value)
    accepted_by_server(payload)
    assert converter.from_payload(payload) == value


@settings(SETTINGS, max_examples=10)
@given(st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_floats_are_refused_not_sent(value: float) -> None:
    from ergon_worker_sdk.errors import ConverterError

    with pytest.raises(ConverterError):
        JsonConverter().to_payload({"x": value})


# ------------------------------------------------------------------ replay


@dataclass
class Out:
    step: str
    arg: int


@flow_type
@dataclass
class Program:
    """A flow whose steps record how often they ran; the program is given to `run`."""

    runs: dict[str, int] = field(default_factory=dict)

    async def _body(self, name: str, arg: int) -> Out:
        self.runs[name] = self.runs.get(name, 0) + 1
        for _ in range(arg % 3):  # interleave gathered steps differently
            await asyncio.sleep(0)
        if arg % 7 == 0:
            raise NonRetryableError(f"{name} refuses {arg}")
        return Out(name, arg)

    @step
    async def alpha(self, arg: int) -> Out:
        return await self._body("alpha", arg)

    @step
    async def beta(self, arg: int) -> Out:
        return await self._body("beta", arg)

    @step(name="gamma")
    async def gamma_step(self, arg: int, *, scale: int = 1) -> dict[str, Any]:
        out = await self._body("gamma", arg)
        return {"out": dataclasses.asdict(out), "scaled": arg * scale}

    @flow
    async def run(self) -> None:  # pragma: no cover - the tests drive steps directly
        return None


Call = tuple[str, int]  # (step, arg)
Op = list[Call]  # one call, or an asyncio.gather group of several

STEPS = ("alpha", "beta", "gamma")
calls = st.tuples(st.sampled_from(STEPS), st.integers(min_value=-50, max_value=50))
programs = st.lists(st.lists(calls, min_size=1, max_size=4), min_size=1, max_size=8)


class MemoryJournal:
    """Stores step results as a server would: in recording order, one entry per key."""

    def __init__(self, entries: list[common_pb2.JournalEntry] | None = None) -> None:
        self.entries = list(entries or [])
        self.recorded = 0

    async def record(self, event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        assert event.WhichOneof("event") == "step_result", event
        result = event.step_result
        assert all(e.key != result.key for e in self.entries), f"{result.key} recorded twice"
        entry = common_pb2.JournalEntry(
            sequence=len(self.entries) + 1,
            key=result.key,
            kind=common_pb2.ENTRY_KIND_STEP,
            attempts=result.attempts,
            args_hash=result.args_hash,
        )
        if result.HasField("result"):
            entry.status = common_pb2.ENTRY_STATUS_COMPLETED
            entry.result.CopyFrom(result.result)
        else:
            assert result.HasField("failure"), result
            entry.status = common_pb2.ENTRY_STATUS_FAILED
            entry.error.CopyFrom(result.failure)
        self.entries.append(entry)
        self.recorded += 1
        await asyncio.sleep(0)  # the round trip to a server yields, so gathered steps interleave
        return worker_pb2.Ack()


def make_context(
    recorder: Any, flow_id: str, journal: list[common_pb2.JournalEntry] | None = None
) -> FlowContext:
    """A flow context on lease 1 whose events go to `recorder`."""
    return FlowContext(
        flow_id=flow_id,
        flow_type="Program",
        lease_token=1,
        attempt=1,
        journal=list(journal or []),
        converter=JsonConverter(),
        recorder=recorder,
        max_payload_bytes=1 << 20,
    )


async def invoke(instance: Program, name: str, arg: int) -> Any:
    try:
        if name == "gamma":
            return ("ok", await instance.gamma_step(arg, scale=2))
        return ("ok", await getattr(instance, name)(arg))
    except StepFailedError as error:
        return ("failed", error.step_key, error.error_type, error.message)


async def execute(
    program: list[Op], journal: MemoryJournal
) -> tuple[list[Any], FlowContext, Program]:
    context = make_context(journal.record, "prop-1", journal.entries)
    instance = Program()
    token = context.activate()
    try:
        results: list[Any] = []
        for op in program:
            if len(op) == 1:
                results.append(await invoke(instance, *op[0]))
            else:
                results.append(await asyncio.gather(*(invoke(instance, n, a) for n, a in op)))
        # As a worker does before it ends a flow: every result sent is stored.
        await context.settle()
    finally:
        FlowContext.deactivate(token)
    return results, context, instance


def total_calls(program: list[Op]) -> int:
    return sum(len(op) for op in program)


@SETTINGS
@given(programs)
def test_replay_against_a_full_journal_returns_the_same_results_and_runs_nothing(
    program: list[Op],
) -> None:
    async def main() -> None:
        journal = MemoryJournal()
        first, context, instance = await execute(program, journal)
        assert context.steps_run == total_calls(program) == sum(instance.runs.values())
        assert len(journal.entries) == total_calls(program)

        replay_journal = MemoryJournal(journal.entries)
        again, context, instance = await execute(program, replay_journal)
        assert again == first
        assert instance.runs == {} and context.steps_run == 0
        assert context.steps_replayed == total_calls(program)
        assert replay_journal.recorded == 0
        assert context.unreplayed_steps() == []

    asyncio.run(main())


@SETTINGS
@given(programs, st.data())
def test_replay_after_a_crash_runs_only_the_unrecorded_steps(
    program: list[Op], data: st.DataObject
) -> None:
    async def main() -> None:
        journal = MemoryJournal()
        first, _, _ = await execute(program, journal)
        kept = data.draw(st.integers(min_value=0, max_value=len(journal.entries)), label="kept")
        crashed = MemoryJournal(journal.entries[:kept])  # the worker died after `kept` records
        again, context, instance = await execute(program, crashed)
        assert again == first
        assert context.steps_run == total_calls(program) - kept == sum(instance.runs.values())
        assert context.steps_replayed == kept
        recorded = {e.key for e in journal.entries[:kept]}
        ran = {e.key for e in crashed.entries[kept:]}
        assert not recorded & ran, "a recorded step ran again"
        assert {e.key for e in crashed.entries} == {e.key for e in journal.entries}

    asyncio.run(main())


@SETTINGS
@given(programs, st.data())
def test_a_changed_argument_is_a_history_mismatch(program: list[Op], data: st.DataObject) -> None:
    async def main() -> None:
        journal = MemoryJournal()
        await execute(program, journal)
        where = data.draw(st.integers(min_value=0, max_value=len(program) - 1), label="op")
        which = data.draw(st.integers(min_value=0, max_value=len(program[where]) - 1), label="call")
        name, arg = program[where][which]
        new_arg = data.draw(st.integers(min_value=-50, max_value=50).filter(lambda a: a != arg))
        changed = [list(op) for op in program]
        changed[where][which] = (name, new_arg)
        replay = MemoryJournal(journal.entries)
        with pytest.raises(HistoryMismatchError):
            await execute(changed, replay)
        # Nothing of the changed call was recorded over the old history.
        assert replay.entries[: len(journal.entries)] == journal.entries

    asyncio.run(main())


@SETTINGS
@given(programs)
def test_a_dropped_call_leaves_its_recorded_step_unreplayed(program: list[Op]) -> None:
    async def main() -> None:
        journal = MemoryJournal()
        await execute(program, journal)
        name, _ = program[-1][-1]
        shorter = [list(op) for op in program]
        shorter[-1].pop()
        if not shorter[-1]:
            shorter.pop()
        _, context, instance = await execute(shorter, MemoryJournal(journal.entries))
        count = sum(1 for op in program for n, _ in op if n == name)
        assert context.unreplayed_steps() == [f"{name}#{count}"]
        assert instance.runs == {}

    asyncio.run(main())


async def next_step_waiting_on_an_ack(instance: Program) -> tuple[Any, asyncio.Future[Any]]:
    """Run `alpha` (it returns before its ack), start `beta`, and let the loop turn a while."""
    first = await instance.alpha(1)
    second = asyncio.ensure_future(instance.beta(2))
    for _ in range(10):
        await asyncio.sleep(0)
    return first, second


async def test_no_step_runs_on_a_result_the_server_has_not_stored() -> None:
    """The flow's code runs on past an unacknowledged result; the next step's body does not."""
    release = asyncio.Event()

    async def refuse_after_release(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        await release.wait()
        raise LeaseLostError(grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST", "gone")

    context = make_context(refuse_after_release, "prop-2")
    instance = Program()
    token = context.activate()
    try:
        first, second = await next_step_waiting_on_an_ack(instance)
        assert first == Out("alpha", 1) and context.unacked_keys() == ["alpha#1"]
        assert not second.done() and "beta" not in instance.runs
        release.set()
        with pytest.raises(LeaseLostError):
            await second
    finally:
        FlowContext.deactivate(token)
    assert instance.runs == {"alpha": 1}


async def test_a_cancel_heard_while_the_last_result_is_stored_stops_the_next_step() -> None:
    """The server sends a cancel ahead of the acks of results sent after it; the next step's
    body waits for those acks, so it must look for the cancel again before it runs."""
    release = asyncio.Event()

    async def slow_ack(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        await release.wait()
        return worker_pb2.Ack()

    context = make_context(slow_ack, "prop-cancel")
    instance = Program()
    token = context.activate()
    try:
        _, second = await next_step_waiting_on_an_ack(instance)
        assert not second.done()
        context.request_cancel()  # the cancel notice, then alpha's ack
        release.set()
        with pytest.raises(FlowCancelledError):
            await second
    finally:
        FlowContext.deactivate(token)
    assert instance.runs == {"alpha": 1}


async def test_a_new_wait_is_not_sent_while_a_suspend_is_in_flight() -> None:
    """A wait registered while a suspend is in flight could overtake it (the suspend sent again
    after a store outage, say); a suspend that cancelled the open waits it did not name then
    cancelled that newer wait and the flow slept forever. New waits wait for its answer."""
    sent: list[str] = []
    suspend_answer = asyncio.Event()

    async def recorder(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        kind = event.WhichOneof("event")
        if kind == "wait":
            sent.append(f"wait {event.wait.key}")
            return worker_pb2.Ack()
        assert kind == "suspend", event
        sent.append(f"suspend {list(event.suspend.open_keys)}")
        await suspend_answer.wait()  # slow: the store is down, the SDK keeps sending it
        sent.append("suspend answered")
        return worker_pb2.Ack()  # not suspended: the server found go#1 satisfied

    context = make_context(recorder, "prop-3")

    async def body() -> list[Any]:
        return [await await_external_signal("go"), await await_external_signal("go")]

    token = context.activate()
    try:
        flow_task = asyncio.ensure_future(body())
    finally:
        FlowContext.deactivate(token)
    await asyncio.sleep(SETTLE_S * 4)  # go#1 registered, then the flow tries to suspend
    assert sent == ["wait signal:go#1", "suspend ['signal:go#1']"]
    context.on_wakeup(
        common_pb2.JournalEntry(
            key="signal:go#1",
            kind=common_pb2.ENTRY_KIND_SIGNAL,
            status=common_pb2.ENTRY_STATUS_COMPLETED,
            result=JsonConverter().to_payload("a"),
        )
    )
    await asyncio.sleep(SETTLE_S * 4)
    assert sent[-1] == "suspend ['signal:go#1']", "go#2 went out while the suspend was in flight"
    suspend_answer.set()
    await asyncio.sleep(SETTLE_S * 4)
    # body() runs in a task of its own: its second wait is keyed under its first.
    assert sent[2:4] == ["suspend answered", "wait signal:go#1>signal:go#1"]
    flow_task.cancel()


# --- orderings the stream can produce ------------------------------------------------------


async def test_a_wakeup_read_before_its_wait_resumes_is_not_lost() -> None:
    """The stream's reader takes a wait's ack and, before the waiting task resumes, the wakeup
    right behind it: the wait returns that entry instead of waiting for ever."""
    satisfied = common_pb2.JournalEntry(
        key="signal:go#1",
        kind=common_pb2.ENTRY_KIND_SIGNAL,
        status=common_pb2.ENTRY_STATUS_COMPLETED,
        result=common_pb2.Payload(encoding="json/plain", data=b'"yes"'),
    )

    async def record(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        assert event.wait.key == "signal:go#1"
        context.on_wakeup(satisfied)
        return worker_pb2.Ack()

    context = make_context(record, "f")

    def fill(request: worker_pb2.WaitRequest) -> None:
        request.signal.name = "go"

    async with asyncio.timeout(5):
        entry = await context.wait("signal:go", fill, common_pb2.ENTRY_KIND_SIGNAL)
    assert entry == satisfied


@dataclass
@flow_type(type_id="TwoSteps")
class TwoSteps:
    bodies: list[str] = field(default_factory=list)

    @step
    async def first(self) -> int:
        self.bodies.append("first")
        return 1

    @step
    async def second(self) -> int:
        self.bodies.append("second started")
        await asyncio.sleep(0.05)
        self.bodies.append("second finished")
        return 2

    @flow
    async def run(self) -> None:  # pragma: no cover - the test drives the steps
        return None


async def test_no_suspend_under_a_step_waiting_for_the_previous_result() -> None:
    """One branch waits on a signal, the other calls a step while the result of its previous
    step is not yet stored: the flow is not idle, and must not suspend under that step."""
    sent: list[str] = []

    async def recorder(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        kind = event.WhichOneof("event")
        if kind == "step_result":
            sent.append(f"result {event.step_result.key}")
            await asyncio.sleep(SETTLE_S * 10)  # a slow store: acks come late
            return worker_pb2.Ack()
        if kind == "wait":
            sent.append(f"wait {event.wait.key}")
            return worker_pb2.Ack()
        assert kind == "suspend", event
        sent.append("suspend")
        suspended.set()
        return worker_pb2.Ack(suspended=True)

    suspended = asyncio.Event()
    context = make_context(recorder, "no-suspend")
    flow = TwoSteps()

    async def chain() -> int:
        return await flow.first() + await flow.second()

    token = context.activate()
    try:
        waiting = asyncio.ensure_future(await_external_signal("go"))
        chained = asyncio.ensure_future(chain())
    finally:
        FlowContext.deactivate(token)
    async with asyncio.timeout(5):
        assert await chained == 3
        await suspended.wait()  # once idle, the flow does suspend
    assert flow.bodies == ["first", "second started", "second finished"]
    # The suspend comes only once both steps' results are out (and stored).
    assert sent.index("suspend") > sent.index("result first#1>second#1")
    waiting.cancel()


async def test_a_wait_whose_key_was_recorded_as_another_kind_is_a_history_mismatch() -> None:
    """A step named "timer" once ran where the flow now sleeps: same key, another kind."""
    recorded = common_pb2.JournalEntry(
        key="timer#1", kind=common_pb2.ENTRY_KIND_STEP, status=common_pb2.ENTRY_STATUS_COMPLETED
    )

    async def recorder(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        raise AssertionError(f"nothing is sent for a replayed wait: {event}")

    context = make_context(recorder, "kinds", [recorded])
    token = context.activate()
    try:
        with pytest.raises(HistoryMismatchError, match="another kind"):
            await schedule_timer(5)
    finally:
        FlowContext.deactivate(token)


async def test_a_branch_cancelled_while_it_waits_for_a_result_leaves_that_result_due() -> None:
    """Cancelling a task waiting in `settle` must not cancel the shared ack it waits on: the
    result would be dropped from what the flow's end waits for, and never sent again."""
    log: list[str] = []

    async def recorder(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        key = event.step_result.key
        await asyncio.sleep(SETTLE_S * 4)
        log.append(f"stored {key}")
        return worker_pb2.Ack()

    context = make_context(recorder, "shielded")
    flow = TwoSteps()
    token = context.activate()
    try:
        assert await flow.first() == 1  # its result goes out; its ack comes later
        waiting = asyncio.ensure_future(flow.second())  # waits for first#1's ack
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert context.unacked_keys() == ["first#1"]
        await context.settle()
    finally:
        FlowContext.deactivate(token)
    assert log == ["stored first#1"]
    assert flow.bodies == ["first"]


async def test_a_task_the_flow_left_behind_cannot_run_a_step_after_the_flows_end() -> None:
    ran: list[str] = []

    async def recorder(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        ran.append(event.WhichOneof("event") or "")
        return worker_pb2.Ack()

    context = make_context(recorder, "closed")
    flow = TwoSteps()
    go = asyncio.Event()

    async def late() -> int:
        await go.wait()  # nothing durable yet: the flow's end does not know this task
        return await flow.first()

    token = context.activate()
    try:
        straggler = asyncio.ensure_future(late())
        await asyncio.sleep(0)
        await context.stop_branches()  # the flow's code ended
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await straggler
    finally:
        FlowContext.deactivate(token)
    assert (flow.bodies, ran) == ([], [])


async def test_a_refused_suspend_fails_the_waits_instead_of_holding_the_slot() -> None:
    refusal = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "NO_WAITS", "refused")

    async def recorder(event: worker_pb2.WorkerEvent) -> worker_pb2.Ack:
        if event.WhichOneof("event") == "suspend":
            raise refusal
        return worker_pb2.Ack()

    context = make_context(recorder, "refused-suspend")
    token = context.activate()
    try:
        async with asyncio.timeout(5):
            with pytest.raises(InvalidArgumentError):
                await await_external_signal("never")
    finally:
        FlowContext.deactivate(token)
