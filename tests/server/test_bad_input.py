"""Hostile input on every RPC: precise statuses, a server that stays up, a store left unchanged.

Each RPC gets a table of bad requests, sent as raw bytes over a real channel (so requests that
protobuf itself refuses, like invalid UTF-8 in a string field, reach the server too). For each
case: the gRPC code and `ErrorInfo` reason (domain "ergon"), a readable message, a normal call
that still succeeds afterwards, and a full listing plus every flow's history equal to the one
taken before. Tables run against the SQLite store and the memory store.

Worker events are answered by acks (code, reason, message) on the stream, which stays open;
stream-level faults (no register first, an undecodable message) end the stream with a status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    signal_pb2,
    worker_pb2,
)
from ergon_worker_sdk.testing import ErgonTestServer

TYPE = "Bad"  # a flow type known to the server, that no worker runs
WTYPE = "BadWorker"  # the type the test's worker runs
LIMIT = 64 * 1024
HUGE = "x" * (1024 * 1024)  # a 1 MiB id: well under the message limit, far over the id limit
CONTROL = "bad\x00id"
INVALID_UTF8 = b"\xc3\x28\xff"
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

I = grpc.StatusCode.INVALID_ARGUMENT  # noqa: E741
NF = grpc.StatusCode.NOT_FOUND
FP = grpc.StatusCode.FAILED_PRECONDITION
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
AE = grpc.StatusCode.ALREADY_EXISTS

SCHEDULER = "/ergon.v1.SchedulerService/"
SIGNAL = "/ergon.v1.SignalService/"
CONNECT = "/ergon.v1.WorkerService/Connect"

# Bad inputs tried, by RPC (and worker event), filled as cases are built: the suite's figures.
TRIED: dict[str, int] = {}


def json_payload(data: bytes = b'{"a":1}') -> common_pb2.Payload:
    return common_pb2.Payload(encoding="json/plain", data=data)


def schedule(flow_id: str = "new-1", **kw: Any) -> scheduler_pb2.ScheduleFlowRequest:
    kw.setdefault("flow_type", TYPE)
    kw.setdefault("input", json_payload())
    return scheduler_pb2.ScheduleFlowRequest(flow_id=flow_id, **kw)


# ------------------------------------------------------------------ raw protobuf bytes


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number: int, body: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(body)) + body


def invalid_utf8_variants(message: Message) -> Iterable[tuple[str, bytes]]:
    """`message` serialized with invalid UTF-8 in each of its string fields, nested included.

    The bad field is appended after the valid bytes (a later occurrence of a field wins), so
    every other field stays as given. protobuf refuses to parse any of these.
    """

    def walk(desc: descriptor.Descriptor, depth: int) -> Iterable[tuple[str, bytes]]:
        for field in desc.fields:
            if field.type == descriptor.FieldDescriptor.TYPE_STRING:
                yield field.name, length_delimited(field.number, INVALID_UTF8)
            elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE and depth < 4:
                sub = field.message_type
                if sub.full_name.startswith("google.protobuf.") and sub.name != "Value":
                    continue
                if sub.GetOptions().map_entry:
                    # map<string,string>: the key, then the value, invalid.
                    for inner in sub.fields:
                        yield (
                            f"{field.name}.{inner.name}",
                            length_delimited(
                                field.number, length_delimited(inner.number, INVALID_UTF8)
                            ),
                        )
                    continue
                for path, inner_bytes in walk(sub, depth + 1):
                    yield f"{field.name}.{path}", length_delimited(field.number, inner_bytes)

    valid = message.SerializeToString()
    for path, extra in walk(message.DESCRIPTOR, 0):
        yield path, valid + extra


# ------------------------------------------------------------------ statuses and snapshots


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str
    domain: str
    message: str


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    reason = domain = ""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, domain = info.reason, info.domain
    return Refusal(error.code(), reason, domain, error.details() or "")


async def snapshot(channel: grpc.aio.Channel) -> list[tuple[bytes, list[bytes]]]:
    """Every flow (as stored) with its whole journal, in order."""
    list_flows = channel.unary_unary(
        SCHEDULER + "ListFlows",
        request_serializer=scheduler_pb2.ListFlowsRequest.SerializeToString,
        response_deserializer=scheduler_pb2.ListFlowsResponse.FromString,
    )
    history = channel.unary_unary(
        SCHEDULER + "GetFlowHistory",
        request_serializer=scheduler_pb2.GetFlowHistoryRequest.SerializeToString,
        response_deserializer=scheduler_pb2.GetFlowHistoryResponse.FromString,
    )
    out: list[tuple[bytes, list[bytes]]] = []
    token = ""
    while True:
        page = await list_flows(scheduler_pb2.ListFlowsRequest(page_size=1000, page_token=token))
        for flow in page.flows:
            entries: list[bytes] = []
            cursor = ""
            while True:
                part = await history(
                    scheduler_pb2.GetFlowHistoryRequest(
                        flow_id=flow.flow_id, page_size=1000, page_token=cursor
                    )
                )
                entries += [e.SerializeToString(deterministic=True) for e in part.entries]
                if not part.next_page_token:
                    break
                cursor = part.next_page_token
            out.append((flow.SerializeToString(deterministic=True), entries))
        if not page.next_page_token:
            return out
        token = page.next_page_token


async def still_serving(channel: grpc.aio.Channel) -> None:
    """A normal call succeeds."""
    get = channel.unary_unary(
        SCHEDULER + "GetFlow",
        request_serializer=scheduler_pb2.GetFlowRequest.SerializeToString,
        response_deserializer=scheduler_pb2.GetFlowResponse.FromString,
    )
    response = await get(scheduler_pb2.GetFlowRequest(flow_id="pending-1"), timeout=10)
    assert response.flow.status == common_pb2.FLOW_STATUS_PENDING


# ------------------------------------------------------------------ the seeded server

Call = grpc.aio.StreamStreamCall[worker_pb2.ConnectRequest, worker_pb2.ConnectResponse]


def worker_request(*events: worker_pb2.WorkerEvent) -> worker_pb2.ConnectRequest:
    return worker_pb2.ConnectRequest(events=list(events))


def register_event(**kw: Any) -> worker_pb2.WorkerEvent:
    fields: dict[str, Any] = {
        "worker_id": "bad-input",
        "flow_types": [WTYPE],
        "capacity": 1,
        "protocol_version": 1,
    }
    fields.update(kw)
    return worker_pb2.WorkerEvent(register=worker_pb2.Register(**fields))


def connect(channel: grpc.aio.Channel) -> Call:
    return channel.stream_stream(
        CONNECT,
        request_serializer=worker_pb2.ConnectRequest.SerializeToString,
        response_deserializer=worker_pb2.ConnectResponse.FromString,
    )()


class Worker:
    """A raw worker stream that reads server events in the background."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.acks: dict[int, worker_pb2.Ack] = {}
        self.assignments: list[worker_pb2.Assignment] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._seq = 1000

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in self.call:
                for event in response.events:
                    kind = event.WhichOneof("event")
                    if kind == "ack":
                        self.acks[event.ack.seq] = event.ack
                    elif kind == "assignment":
                        self.assignments.append(event.assignment)
                self._changed.set()

    async def until(self, ready: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not ready():
                self._changed.clear()
                await self._changed.wait()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def ask(self, **event: Any) -> worker_pb2.Ack:
        seq = self.next_seq()
        await self.call.write(worker_request(worker_pb2.WorkerEvent(seq=seq, **event)))
        await self.until(lambda: seq in self.acks)
        return self.acks[seq]

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._reader


@dataclass
class Seeded:
    server: ErgonTestServer
    channel: grpc.aio.Channel
    worker: Worker
    running_token: int  # the live lease on "running-1", held by `worker`
    done_token: int  # the old lease on "worked-1", which completed


@pytest.fixture(params=["sqlite", "memory"])
async def seeded(request: pytest.FixtureRequest) -> AsyncIterator[Seeded]:
    """A server holding flows in every shape: pending, cancelled, completed, running."""
    db = "memory://" if request.param == "memory" else None
    async with ErgonTestServer(db, max_payload_bytes=LIMIT) as server:
        await server._server.store.register_flow_types([TYPE, WTYPE], 0)
        async with grpc.aio.insecure_channel(server.address) as channel:
            unary = channel.unary_unary(
                SCHEDULER + "ScheduleFlow",
                request_serializer=scheduler_pb2.ScheduleFlowRequest.SerializeToString,
                response_deserializer=scheduler_pb2.ScheduleFlowResponse.FromString,
            )
            cancel = channel.unary_unary(
                SCHEDULER + "CancelFlow",
                request_serializer=scheduler_pb2.CancelFlowRequest.SerializeToString,
                response_deserializer=scheduler_pb2.CancelFlowResponse.FromString,
            )
            await unary(schedule("pending-1"))
            await unary(schedule("closed-1"))
            await cancel(scheduler_pb2.CancelFlowRequest(flow_id="closed-1", reason="seed"))
            worker = Worker(connect(channel))
            await worker.call.write(worker_request(register_event()))
            await unary(schedule("worked-1", flow_type=WTYPE))
            await worker.until(lambda: len(worker.assignments) == 1)
            done_token = worker.assignments[0].lease_token
            ack = await worker.ask(
                step_result=worker_pb2.StepResult(
                    flow_id="worked-1",
                    lease_token=done_token,
                    key="a#1",
                    attempts=1,
                    result=json_payload(b"1"),
                )
            )
            assert ack.code == 0, ack
            ack = await worker.ask(
                flow_completed=worker_pb2.FlowCompleted(
                    flow_id="worked-1", lease_token=done_token, result=json_payload(b"2")
                )
            )
            assert ack.code == 0, ack
            await unary(schedule("running-1", flow_type=WTYPE))
            await worker.until(lambda: len(worker.assignments) == 2)
            running_token = worker.assignments[1].lease_token
            ack = await worker.ask(
                step_result=worker_pb2.StepResult(
                    flow_id="running-1",
                    lease_token=running_token,
                    key="a#1",
                    attempts=1,
                    result=json_payload(b"3"),
                )
            )
            assert ack.code == 0, ack
            yield Seeded(server, channel, worker, running_token, done_token)
            await worker.close()


# ------------------------------------------------------------------ unary tables

UnaryCase = tuple[str, bytes, grpc.StatusCode, str]


def case(name: str, request: Message | bytes, code: grpc.StatusCode, reason: str) -> UnaryCase:
    data = request if isinstance(request, bytes) else request.SerializeToString()
    return (name, data, code, reason)


def utf8_cases(valid: Message) -> list[UnaryCase]:
    return [
        case(f"invalid-utf8:{path}", data, I, "MALFORMED_REQUEST")
        for path, data in invalid_utf8_variants(valid)
    ]


GARBAGE = [
    case("garbage:truncated-varint", b"\x08\xff\xff\xff", I, "MALFORMED_REQUEST"),
    case("garbage:length-past-end", b"\x0a\x7f" + b"a", I, "MALFORMED_REQUEST"),
    case("garbage:bad-wire-type", b"\x0f\x00", I, "MALFORMED_REQUEST"),
    case("garbage:field-zero", b"\x02\x01a", I, "MALFORMED_REQUEST"),
]


def bad_payloads(make: Callable[[common_pb2.Payload], Message], what: str) -> list[UnaryCase]:
    """Wrong encodings, malformed bodies and oversized payloads in one payload field."""
    inline_nan = struct_pb2.Value(number_value=float("nan"))
    inline_inf = struct_pb2.Value(number_value=float("inf"))
    text = struct_pb2.Value(string_value="x")
    big = b'"' + b"x" * (LIMIT + 10) + b'"'
    payloads = [
        ("unknown-encoding", common_pb2.Payload(encoding="x/y", data=b"1"), "UNKNOWN_ENCODING"),
        ("encoding-case", common_pb2.Payload(encoding="JSON/PLAIN", data=b"1"), "UNKNOWN_ENCODING"),
        ("long-encoding", common_pb2.Payload(encoding="j" * 10_000, data=b"1"), "UNKNOWN_ENCODING"),
        ("json-not-json", json_payload(b"{not json"), "MALFORMED_PAYLOAD"),
        ("json-binary", json_payload(b"\xff\xfe\x00"), "MALFORMED_PAYLOAD"),
        ("json-trailing", json_payload(b"{} {}"), "MALFORMED_PAYLOAD"),
        ("json-nan", json_payload(b"NaN"), "MALFORMED_PAYLOAD"),
        ("json-infinity", json_payload(b"[-Infinity]"), "MALFORMED_PAYLOAD"),
        ("default-encoding-bad", common_pb2.Payload(data=b"nope"), "MALFORMED_PAYLOAD"),
        ("inline-nan", common_pb2.Payload(json=inline_nan), "MALFORMED_PAYLOAD"),
        ("inline-inf", common_pb2.Payload(json=inline_inf), "MALFORMED_PAYLOAD"),
        (
            "inline-with-binary-encoding",
            common_pb2.Payload(encoding="binary/plain", json=text),
            "MALFORMED_PAYLOAD",
        ),
        ("over-limit", json_payload(big), "PAYLOAD_TOO_LARGE"),
        (
            "over-limit-binary",
            common_pb2.Payload(encoding="binary/plain", data=b"\x00" * (LIMIT + 1)),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "over-limit-metadata",
            common_pb2.Payload(encoding="binary/null", metadata={"k": "v" * (LIMIT + 1)}),
            "PAYLOAD_TOO_LARGE",
        ),
    ]
    return [
        case(
            f"{what}:{name}",
            make(payload),
            RE if reason == "PAYLOAD_TOO_LARGE" else I,
            reason,
        )
        for name, payload, reason in payloads
    ]


def bad_ids(
    make: Callable[[str], Message], what: str, *, empty_ok: bool = False
) -> list[UnaryCase]:
    cases = [
        case(f"{what}:huge", make(HUGE), I, "INVALID_ID"),
        case(f"{what}:257-chars", make("y" * 257), I, "INVALID_ID"),
        case(f"{what}:control-char", make(CONTROL), I, "INVALID_ID"),
        case(f"{what}:newline", make("a\nb"), I, "INVALID_ID"),
        case(f"{what}:bidi-override", make("a\u202eb"), I, "INVALID_ID"),
    ]
    if not empty_ok:
        cases.append(case(f"{what}:empty", make(""), I, "INVALID_ID"))
    return cases


def bad_schedules(wrap: Callable[[scheduler_pb2.ScheduleFlowRequest], Message]) -> list[UnaryCase]:
    """Bad ScheduleFlowRequests, wrapped into the RPC's own request."""

    def retry(**kw: Any) -> scheduler_pb2.ScheduleFlowRequest:
        return schedule(retry_policy=common_pb2.RetryPolicy(**kw))

    def start(seconds: int, nanos: int = 0) -> scheduler_pb2.ScheduleFlowRequest:
        return schedule(start_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))

    cases = [
        *bad_ids(lambda v: wrap(schedule(flow_id=v)), "flow_id", empty_ok=True),
        *bad_ids(lambda v: wrap(schedule(flow_type=v)), "flow_type"),
        *bad_ids(lambda v: wrap(schedule(request_id=v)), "request_id", empty_ok=True),
        case("missing-flow_type", wrap(scheduler_pb2.ScheduleFlowRequest()), I, "INVALID_ID"),
        case("unknown-type", wrap(schedule(flow_type="NoSuchType")), NF, "UNKNOWN_FLOW_TYPE"),
        case(
            "taken-id-other-input",
            wrap(schedule("pending-1", input=json_payload(b'{"other":2}'))),
            AE,
            "FLOW_ALREADY_SCHEDULED",
        ),
        case(
            "taken-id-other-type",
            wrap(schedule("worked-1", input=json_payload())),
            AE,
            "FLOW_ALREADY_SCHEDULED",
        ),
        case("retry-negative-attempts", wrap(retry(max_attempts=-1)), I, "INVALID_RETRY"),
        case("retry-negative-delay", wrap(retry(initial_delay_ms=-5)), I, "INVALID_RETRY"),
        case("retry-negative-max", wrap(retry(max_delay_ms=-(2**63))), I, "INVALID_RETRY"),
        case("retry-backoff-below-1", wrap(retry(backoff_multiplier=0.5)), I, "INVALID_RETRY"),
        case("retry-backoff-negative", wrap(retry(backoff_multiplier=-1)), I, "INVALID_RETRY"),
        case("retry-backoff-nan", wrap(retry(backoff_multiplier=float("nan"))), I, "INVALID_RETRY"),
        case("retry-backoff-inf", wrap(retry(backoff_multiplier=float("inf"))), I, "INVALID_RETRY"),
        case("start-after-9999", wrap(start(2**62)), I, "INVALID_TIMESTAMP"),
        case("start-before-year-1", wrap(start(-(2**62))), I, "INVALID_TIMESTAMP"),
        case("start-bad-nanos", wrap(start(0, nanos=-1)), I, "INVALID_TIMESTAMP"),
        case("start-nanos-overflow", wrap(start(0, nanos=10**9)), I, "INVALID_TIMESTAMP"),
        case("label-key-too-long", wrap(schedule(labels={"k" * 300: "v"})), I, "INVALID_ARGUMENT"),
        case(
            "label-value-too-long",
            wrap(schedule(labels={"k": "v" * 2000})),
            I,
            "INVALID_ARGUMENT",
        ),
        *bad_payloads(lambda p: wrap(schedule(input=p)), "input"),
    ]
    return cases


def schedule_flow_cases() -> list[UnaryCase]:
    return [
        *bad_schedules(lambda r: r),
        *utf8_cases(schedule(labels={"k": "v"}, retry_policy=common_pb2.RetryPolicy())),
        *GARBAGE,
    ]


def schedule_flows_cases() -> list[UnaryCase]:
    def batch(bad: scheduler_pb2.ScheduleFlowRequest) -> scheduler_pb2.ScheduleFlowsRequest:
        # A good item before the bad one: the batch is refused whole, nothing is written.
        return scheduler_pb2.ScheduleFlowsRequest(requests=[schedule("batch-good"), bad])

    cases = [
        c
        for c in bad_schedules(batch)
        # A taken id is answered per item (code 6 in the result), not as a refusal.
        if not c[0].startswith("taken-id")
    ]
    too_many = scheduler_pb2.ScheduleFlowsRequest(requests=[schedule(f"b{i}") for i in range(1001)])
    cases.append(case("batch-over-1000", too_many, I, "BATCH_TOO_LARGE"))
    cases += utf8_cases(batch(schedule(labels={"k": "v"})))
    return cases + GARBAGE


def flow_id_cases(make: Callable[[str], Message]) -> list[UnaryCase]:
    return [
        *bad_ids(make, "flow_id"),
        case("missing-flow", make("no-such-flow"), NF, "FLOW_NOT_FOUND"),
        *utf8_cases(make("pending-1")),
        *GARBAGE,
    ]


def list_flows_cases() -> list[UnaryCase]:
    def token(value: str) -> scheduler_pb2.ListFlowsRequest:
        return scheduler_pb2.ListFlowsRequest(page_token=value)

    return [
        case(
            "status-unspecified", scheduler_pb2.ListFlowsRequest(statuses=[0]), I, "INVALID_STATUS"
        ),
        case("status-99", scheduler_pb2.ListFlowsRequest(statuses=[99]), I, "INVALID_STATUS"),
        case(
            "status-negative", scheduler_pb2.ListFlowsRequest(statuses=[1, -1]), I, "INVALID_STATUS"
        ),
        case(
            "page-size-negative",
            scheduler_pb2.ListFlowsRequest(page_size=-1),
            I,
            "INVALID_PAGE_SIZE",
        ),
        case("token-garbage", token("garbage"), I, "INVALID_PAGE_TOKEN"),
        case("token-negative", token("-5"), I, "INVALID_PAGE_TOKEN"),
        case("token-over-int64", token(str(INT64_MAX + 1)), I, "INVALID_PAGE_TOKEN"),
        case("token-huge", token("9" * 5000), I, "INVALID_PAGE_TOKEN"),
        case("token-1MiB", token(HUGE), I, "INVALID_PAGE_TOKEN"),
        case("token-unicode-digits", token("١٢"), I, "INVALID_PAGE_TOKEN"),
        case("token-whitespace", token(" 1"), I, "INVALID_PAGE_TOKEN"),
        case("token-underscore", token("1_0"), I, "INVALID_PAGE_TOKEN"),
        *bad_ids(lambda v: scheduler_pb2.ListFlowsRequest(flow_type=v), "flow_type", empty_ok=True),
        *utf8_cases(scheduler_pb2.ListFlowsRequest(flow_type=TYPE, page_token="1")),
        *GARBAGE,
    ]


def history_cases() -> list[UnaryCase]:
    def req(**kw: Any) -> scheduler_pb2.GetFlowHistoryRequest:
        kw.setdefault("flow_id", "worked-1")
        return scheduler_pb2.GetFlowHistoryRequest(**kw)

    return [
        *flow_id_cases(lambda v: scheduler_pb2.GetFlowHistoryRequest(flow_id=v)),
        case("page-size-negative", req(page_size=-1), I, "INVALID_PAGE_SIZE"),
        case("token-garbage", req(page_token="x"), I, "INVALID_PAGE_TOKEN"),
        case("token-over-int64", req(page_token=str(INT64_MAX + 1)), I, "INVALID_PAGE_TOKEN"),
        case("token-huge", req(page_token="9" * 5000), I, "INVALID_PAGE_TOKEN"),
    ]


def wait_flow_cases() -> list[UnaryCase]:
    return [
        *flow_id_cases(lambda v: scheduler_pb2.WaitFlowRequest(flow_id=v)),
        case(
            "timeout-negative",
            scheduler_pb2.WaitFlowRequest(flow_id="pending-1", timeout_ms=-1),
            I,
            "INVALID_TIMEOUT",
        ),
        case(
            "timeout-int64-min",
            scheduler_pb2.WaitFlowRequest(flow_id="pending-1", timeout_ms=-(2**63)),
            I,
            "INVALID_TIMEOUT",
        ),
    ]


def run_flow_cases() -> list[UnaryCase]:
    def run(
        flow: scheduler_pb2.ScheduleFlowRequest, timeout_ms: int = 10
    ) -> scheduler_pb2.RunFlowRequest:
        return scheduler_pb2.RunFlowRequest(flow=flow, timeout_ms=timeout_ms)

    return [
        *bad_schedules(run),
        # Refused before the flow is scheduled: the snapshot shows no "run-new".
        case("timeout-negative", run(schedule("run-new"), -1), I, "INVALID_TIMEOUT"),
        case("timeout-int64-min", run(schedule("run-new"), -(2**63)), I, "INVALID_TIMEOUT"),
        *utf8_cases(run(schedule(labels={"k": "v"}))),
        *GARBAGE,
    ]


def cancel_cases() -> list[UnaryCase]:
    return [
        *flow_id_cases(lambda v: scheduler_pb2.CancelFlowRequest(flow_id=v)),
        case(
            "completed-flow",
            scheduler_pb2.CancelFlowRequest(flow_id="worked-1"),
            FP,
            "FLOW_CLOSED",
        ),
        case(
            "reason-too-long",
            scheduler_pb2.CancelFlowRequest(flow_id="pending-1", reason="r" * 2000),
            I,
            "INVALID_ARGUMENT",
        ),
    ]


def send_signal_cases() -> list[UnaryCase]:
    def req(**kw: Any) -> signal_pb2.SendSignalRequest:
        kw.setdefault("flow_id", "pending-1")
        kw.setdefault("name", "go")
        return signal_pb2.SendSignalRequest(**kw)

    return [
        *bad_ids(lambda v: req(flow_id=v), "flow_id"),
        *bad_ids(lambda v: req(name=v), "name"),
        *bad_ids(lambda v: req(request_id=v), "request_id", empty_ok=True),
        case("missing-flow", req(flow_id="no-such-flow"), NF, "FLOW_NOT_FOUND"),
        case("closed-flow", req(flow_id="closed-1"), FP, "FLOW_CLOSED"),
        case("completed-flow", req(flow_id="worked-1"), FP, "FLOW_CLOSED"),
        *bad_payloads(lambda p: req(payload=p), "payload"),
        *utf8_cases(req(payload=json_payload(), request_id="r")),
        *GARBAGE,
    ]


def signal_with_schedule_cases() -> list[UnaryCase]:
    def req(sched: scheduler_pb2.ScheduleFlowRequest | None = None, **kw: Any) -> Message:
        kw.setdefault("name", "go")
        return signal_pb2.SignalWithScheduleRequest(schedule=sched or schedule("sws-1"), **kw)

    return [
        *[c for c in bad_schedules(lambda r: req(r))],
        *bad_ids(lambda v: req(name=v), "name"),
        case("missing-schedule", signal_pb2.SignalWithScheduleRequest(name="go"), I, "INVALID_ID"),
        case(
            "closed-flow",
            req(schedule("closed-1")),
            FP,
            "FLOW_CLOSED",
        ),
        case(
            "completed-flow",
            req(schedule("worked-1", flow_type=WTYPE)),
            FP,
            "FLOW_CLOSED",
        ),
        *bad_payloads(lambda p: req(payload=p), "payload"),
        *utf8_cases(req(schedule("sws-1", labels={"k": "v"}), payload=json_payload())),
        *GARBAGE,
    ]


UNARY_TABLES: dict[str, Callable[[], list[UnaryCase]]] = {
    "ScheduleFlow": schedule_flow_cases,
    "ScheduleFlows": schedule_flows_cases,
    "GetFlow": lambda: flow_id_cases(lambda v: scheduler_pb2.GetFlowRequest(flow_id=v)),
    "WaitFlow": wait_flow_cases,
    "RunFlow": run_flow_cases,
    "ListFlows": list_flows_cases,
    "GetFlowHistory": history_cases,
    "CancelFlow": cancel_cases,
    "SendSignal": send_signal_cases,
    "SignalWithSchedule": signal_with_schedule_cases,
}


def path_of(rpc: str) -> str:
    return (SIGNAL if rpc in ("SendSignal", "SignalWithSchedule") else SCHEDULER) + rpc


@pytest.mark.parametrize("rpc", list(UNARY_TABLES))
async def test_bad_unary_requests_get_precise_statuses_and_change_nothing(
    seeded: Seeded, rpc: str
) -> None:
    cases = UNARY_TABLES[rpc]()
    TRIED[rpc] = len(cases)
    assert len(cases) >= 10
    call = seeded.channel.unary_unary(path_of(rpc))  # raw bytes both ways
    before = await snapshot(seeded.channel)
    wrong: list[str] = []
    for name, data, code, reason in cases:
        try:
            await call(data, timeout=10)
        except grpc.aio.AioRpcError as error:
            got = refusal_of(error)
            if (got.code, got.reason, got.domain) != (code, reason, "ergon") or len(
                got.message
            ) < 10:
                wrong.append(f"{name}: got {got}, want {code.name} {reason}")
        else:
            wrong.append(f"{name}: accepted, want {code.name} {reason}")
        await still_serving(seeded.channel)
        if await snapshot(seeded.channel) != before:
            wrong.append(f"{name}: the store changed")
            before = await snapshot(seeded.channel)
    assert not wrong, "\n".join(wrong)


async def test_messages_over_the_grpc_limit_are_refused_by_grpc_and_change_nothing(
    seeded: Seeded,
) -> None:
    """A 17 MiB message is over the server's 16 MiB message limit: gRPC refuses it itself.

    That status carries no ErrorInfo (no handler ran); the code is precise and the message
    says why.
    """
    before = await snapshot(seeded.channel)
    big = length_delimited(1, b"x" * (17 * 1024 * 1024))
    for rpc in UNARY_TABLES:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await seeded.channel.unary_unary(path_of(rpc))(big, timeout=20)
        assert caught.value.code() is RE, rpc
        assert "larger than max" in (caught.value.details() or ""), caught.value.details()
    call = connect_raw(seeded.channel)
    await call.write(big)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() is RE
    await still_serving(seeded.channel)
    assert await snapshot(seeded.channel) == before


async def test_an_unknown_method_is_unimplemented(seeded: Seeded) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await seeded.channel.unary_unary(SCHEDULER + "DropAllFlows")(b"")
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    await still_serving(seeded.channel)


# ------------------------------------------------------------------ worker stream: events


def worker_event_cases(s: Seeded) -> dict[str, list[tuple[str, dict[str, Any], int, str]]]:
    """Bad events by kind: (name, WorkerEvent fields, ack code, ack reason)."""
    run, done = s.running_token, s.done_token
    ok = json_payload(b"1")
    stale_tokens = [("token-0", 0), ("token+1", run + 1), ("token-uint64-max", UINT64_MAX)]
    if run > 1:
        stale_tokens.append(("token-1", run - 1))
    lost = (FP.value[0], "LEASE_LOST")
    invalid = I.value[0]

    def fenced(
        kind: str, build: Callable[[str, int], Message]
    ) -> list[tuple[str, dict[str, Any], int, str]]:
        out = [(f"{n}", {kind: build("running-1", t)}, *lost) for n, t in stale_tokens]
        if kind == "flow_completed":
            # A completion resent under the lease that completed the flow is acked OK (it is
            # idempotent by flow and lease: the worker may not have seen the first ack); the
            # flow keeps its first result, which the snapshot checks.
            out.append(("replayed-old-lease", {kind: build("worked-1", done)}, 0, ""))
        else:
            out.append(("replayed-old-lease", {kind: build("worked-1", done)}, *lost))
        out.append(
            ("no-such-flow", {kind: build("no-such-flow", run)}, NF.value[0], "FLOW_NOT_FOUND")
        )
        # A flow id no schedule accepts is refused before it reaches the store.
        for name, flow_id in [("empty", ""), ("huge", HUGE), ("control", CONTROL)]:
            out.append((f"{name}-flow_id", {kind: build(flow_id, run)}, invalid, "INVALID_ID"))
        return out

    def step(**kw: Any) -> worker_pb2.StepResult:
        fields: dict[str, Any] = {
            "flow_id": "running-1",
            "lease_token": run,
            "key": "b#1",
            "attempts": 1,
            "result": ok,
        }
        fields.update(kw)
        return worker_pb2.StepResult(**fields)

    def wait(**kw: Any) -> worker_pb2.WaitRequest:
        fields: dict[str, Any] = {"flow_id": "running-1", "lease_token": run, "key": "w#1"}
        fields.update(kw)
        return worker_pb2.WaitRequest(**fields)

    timer = worker_pb2.TimerWait(fire_in_ms=60_000)
    return {
        "step_result": [
            *fenced("step_result", lambda f, t: step(flow_id=f, lease_token=t)),
            ("empty-key", {"step_result": step(key="")}, invalid, "INVALID_ID"),
            ("huge-key", {"step_result": step(key=HUGE)}, invalid, "INVALID_ID"),
            ("reserved-key", {"step_result": step(key="$cancel")}, invalid, "INVALID_ID"),
            ("control-key", {"step_result": step(key=CONTROL)}, invalid, "INVALID_ID"),
            ("control-args_hash", {"step_result": step(args_hash=CONTROL)}, invalid, "INVALID_ID"),
            ("newline-args_hash", {"step_result": step(args_hash="a\nb")}, invalid, "INVALID_ID"),
            ("huge-args_hash", {"step_result": step(args_hash=HUGE)}, invalid, "INVALID_ID"),
            ("no-outcome", {"step_result": step(result=None)}, invalid, "MISSING_OUTCOME"),
            ("unknown-kind", {"step_result": step(kind=99)}, invalid, "INVALID_KIND"),
            *[
                (f"payload:{c[0]}", {"step_result": step(result=p)}, code, reason)
                for c, p, code, reason in _step_payloads()
            ],
        ],
        "flow_completed": [
            *fenced(
                "flow_completed",
                lambda f, t: worker_pb2.FlowCompleted(flow_id=f, lease_token=t, result=ok),
            ),
            (
                "over-limit",
                {
                    "flow_completed": worker_pb2.FlowCompleted(
                        flow_id="running-1",
                        lease_token=run,
                        result=common_pb2.Payload(encoding="binary/plain", data=b"x" * (LIMIT + 1)),
                    )
                },
                RE.value[0],
                "PAYLOAD_TOO_LARGE",
            ),
            (
                "unknown-encoding",
                {
                    "flow_completed": worker_pb2.FlowCompleted(
                        flow_id="running-1",
                        lease_token=run,
                        result=common_pb2.Payload(encoding="zip", data=b"x"),
                    )
                },
                invalid,
                "UNKNOWN_ENCODING",
            ),
        ],
        "flow_failed": [
            *fenced(
                "flow_failed",
                lambda f, t: worker_pb2.FlowFailed(
                    flow_id=f, lease_token=t, failure=common_pb2.Failure(type="E")
                ),
            ),
            (
                "retry-delay-after-9999",
                {
                    "flow_failed": worker_pb2.FlowFailed(
                        flow_id="running-1", lease_token=run, retry_delay_ms=INT64_MAX
                    )
                },
                invalid,
                "INVALID_RETRY",
            ),
        ],
        "release": fenced("release", lambda f, t: worker_pb2.Release(flow_id=f, lease_token=t)),
        "capacity_update": [
            (
                "negative",
                {"capacity_update": worker_pb2.CapacityUpdate(capacity=-1)},
                invalid,
                "INVALID_ARGUMENT",
            ),
            (
                "int32-min",
                {"capacity_update": worker_pb2.CapacityUpdate(capacity=-(2**31))},
                invalid,
                "INVALID_ARGUMENT",
            ),
        ],
        "wait": [
            *fenced("wait", lambda f, t: wait(flow_id=f, lease_token=t, timer=timer)),
            ("no-kind", {"wait": wait()}, invalid, "MISSING_WAIT"),
            ("empty-key", {"wait": wait(key="", timer=timer)}, invalid, "INVALID_ID"),
            ("huge-key", {"wait": wait(key=HUGE, timer=timer)}, invalid, "INVALID_ID"),
            ("reserved-key", {"wait": wait(key="$cancel", timer=timer)}, invalid, "INVALID_ID"),
            ("control-key", {"wait": wait(key=CONTROL, timer=timer)}, invalid, "INVALID_ID"),
            (
                "timer-in-past",
                {"wait": wait(timer=worker_pb2.TimerWait(fire_in_ms=-1))},
                invalid,
                "INVALID_TIMER",
            ),
            (
                "timer-after-9999",
                {"wait": wait(timer=worker_pb2.TimerWait(fire_in_ms=INT64_MAX))},
                invalid,
                "INVALID_TIMER",
            ),
            (
                "signal-no-name",
                {"wait": wait(signal=worker_pb2.SignalWait())},
                invalid,
                "INVALID_ID",
            ),
            *[
                (
                    f"signal-{name}-name",
                    {"wait": wait(signal=worker_pb2.SignalWait(name=bad))},
                    invalid,
                    "INVALID_ID",
                )
                for name, bad in [("control", CONTROL), ("huge", HUGE), ("bidi", "a\u202eb")]
            ],
            *[
                (
                    f"child-{name}-type",
                    {
                        "wait": wait(
                            child=worker_pb2.ChildWait(child_flow_id="c1", flow_type=bad, input=ok)
                        )
                    },
                    invalid,
                    "INVALID_ID",
                )
                for name, bad in [("empty", ""), ("control", CONTROL), ("huge", HUGE)]
            ],
            (
                "child-empty-id",
                {"wait": wait(child=worker_pb2.ChildWait(flow_type=WTYPE, input=ok))},
                invalid,
                "INVALID_ID",
            ),
            (
                "child-huge-id",
                {
                    "wait": wait(
                        child=worker_pb2.ChildWait(child_flow_id=HUGE, flow_type=WTYPE, input=ok)
                    )
                },
                invalid,
                "INVALID_ID",
            ),
            (
                "child-unknown-type",
                {
                    "wait": wait(
                        child=worker_pb2.ChildWait(child_flow_id="c1", flow_type="Nope", input=ok)
                    )
                },
                NF.value[0],
                "UNKNOWN_FLOW_TYPE",
            ),
            (
                "child-bad-input",
                {
                    "wait": wait(
                        child=worker_pb2.ChildWait(
                            child_flow_id="c1", flow_type=WTYPE, input=json_payload(b"{")
                        )
                    )
                },
                invalid,
                "MALFORMED_PAYLOAD",
            ),
        ],
        "suspend": [
            *fenced(
                "suspend",
                lambda f, t: worker_pb2.Suspend(flow_id=f, lease_token=t, open_keys=["w#1"]),
            ),
            (
                "no-open-keys",
                {"suspend": worker_pb2.Suspend(flow_id="running-1", lease_token=run)},
                invalid,
                "NO_WAITS",
            ),
        ],
        "park": fenced(
            "park",
            lambda f, t: worker_pb2.Park(
                flow_id=f, lease_token=t, failure=common_pb2.Failure(reason="HISTORY_MISMATCH")
            ),
        ),
        "register": [
            ("register-twice", {"register": register_event().register}, invalid, "REGISTER_TWICE"),
        ],
        "empty": [("no-event", {}, invalid, "UNKNOWN_EVENT")],
    }


def _step_payloads() -> list[tuple[tuple[str], common_pb2.Payload, int, str]]:
    return [
        (
            ("unknown-encoding",),
            common_pb2.Payload(encoding="x/y", data=b"1"),
            I.value[0],
            "UNKNOWN_ENCODING",
        ),
        (
            ("over-limit",),
            common_pb2.Payload(encoding="binary/plain", data=b"x" * (LIMIT + 1)),
            RE.value[0],
            "PAYLOAD_TOO_LARGE",
        ),
        (
            ("inline-nan",),
            common_pb2.Payload(json=struct_pb2.Value(number_value=float("nan"))),
            I.value[0],
            "MALFORMED_PAYLOAD",
        ),
    ]


async def test_bad_worker_events_are_acked_with_precise_refusals_and_change_nothing(
    seeded: Seeded,
) -> None:
    worker = seeded.worker
    before = await snapshot(seeded.channel)
    wrong: list[str] = []
    table = worker_event_cases(seeded)
    for kind, cases in table.items():
        TRIED[f"Connect.{kind}"] = len(cases)
        for name, fields, code, reason in cases:
            ack = await worker.ask(**fields)
            if (ack.code, ack.reason) != (code, reason) or (code and len(ack.message) < 10):
                wrong.append(f"{kind}:{name}: got {ack.code} {ack.reason} {ack.message!r}")
            # The stream stays up: a heartbeat is acked OK.
            beat = await worker.ask(heartbeat=worker_pb2.Heartbeat())
            assert beat.code == 0, beat
            await still_serving(seeded.channel)
            if await snapshot(seeded.channel) != before:
                wrong.append(f"{kind}:{name}: the store changed")
                before = await snapshot(seeded.channel)
    # The live lease still works after all that: the flow completes.
    ack = await worker.ask(
        flow_completed=worker_pb2.FlowCompleted(
            flow_id="running-1", lease_token=seeded.running_token, result=json_payload(b"4")
        )
    )
    assert ack.code == 0, ack
    assert not wrong, "\n".join(wrong)


async def test_several_bad_events_in_one_message_each_get_their_ack(seeded: Seeded) -> None:
    worker = seeded.worker
    before = await snapshot(seeded.channel)
    seqs = [worker.next_seq() for _ in range(4)]
    await worker.call.write(
        worker_request(
            worker_pb2.WorkerEvent(seq=seqs[0]),
            worker_pb2.WorkerEvent(seq=seqs[1], register=register_event().register),
            worker_pb2.WorkerEvent(
                seq=seqs[2],
                release=worker_pb2.Release(flow_id="running-1", lease_token=UINT64_MAX),
            ),
            worker_pb2.WorkerEvent(seq=seqs[3], heartbeat=worker_pb2.Heartbeat()),
        )
    )
    await worker.until(lambda: all(s in worker.acks for s in seqs))
    assert [worker.acks[s].reason for s in seqs] == [
        "UNKNOWN_EVENT",
        "REGISTER_TWICE",
        "LEASE_LOST",
        "",
    ]
    assert await snapshot(seeded.channel) == before


# ------------------------------------------------------------------ worker stream: openings


def connect_raw(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[bytes, bytes]:
    return channel.stream_stream(CONNECT)()


def opening_cases() -> list[tuple[str, list[bytes], grpc.StatusCode, str]]:
    """Bad stream openings: (name, raw messages sent, code, reason)."""

    def msg(*events: worker_pb2.WorkerEvent) -> bytes:
        return worker_request(*events).SerializeToString()

    good = register_event()
    cases: list[tuple[str, list[bytes], grpc.StatusCode, str]] = [
        ("closed-at-once", [], I, "REGISTER_FIRST"),
        ("empty-message", [b""], I, "REGISTER_FIRST"),
        ("empty-event", [msg(worker_pb2.WorkerEvent())], I, "REGISTER_FIRST"),
        (
            "heartbeat-first",
            [msg(worker_pb2.WorkerEvent(heartbeat=worker_pb2.Heartbeat()))],
            I,
            "REGISTER_FIRST",
        ),
        (
            "step-before-register",
            [
                msg(
                    worker_pb2.WorkerEvent(
                        seq=1,
                        step_result=worker_pb2.StepResult(
                            flow_id="running-1", lease_token=1, key="z#1", result=json_payload()
                        ),
                    )
                )
            ],
            I,
            "REGISTER_FIRST",
        ),
        (
            "register-second-in-message",
            [msg(worker_pb2.WorkerEvent(heartbeat=worker_pb2.Heartbeat()), good)],
            I,
            "REGISTER_FIRST",
        ),
        ("version-0", [msg(register_event(protocol_version=0))], FP, "PROTOCOL_VERSION"),
        ("version-99", [msg(register_event(protocol_version=99))], FP, "PROTOCOL_VERSION"),
        ("version-negative", [msg(register_event(protocol_version=-1))], FP, "PROTOCOL_VERSION"),
        ("capacity-negative", [msg(register_event(capacity=-(2**31)))], I, "INVALID_ARGUMENT"),
        ("no-flow-types", [msg(register_event(flow_types=[]))], I, "INVALID_ARGUMENT"),
        ("empty-flow-type", [msg(register_event(flow_types=[WTYPE, ""]))], I, "INVALID_ID"),
        ("huge-flow-type", [msg(register_event(flow_types=[HUGE]))], I, "INVALID_ID"),
        ("control-flow-type", [msg(register_event(flow_types=[CONTROL]))], I, "INVALID_ID"),
        ("empty-worker-id", [msg(register_event(worker_id=""))], I, "INVALID_ID"),
        ("huge-worker-id", [msg(register_event(worker_id=HUGE))], I, "INVALID_ID"),
        ("garbage", [b"\xff\xff\xff"], I, "MALFORMED_REQUEST"),
    ]
    for path, data in invalid_utf8_variants(
        worker_request(
            register_event(held_leases=[worker_pb2.HeldLease(flow_id="running-1", lease_token=1)])
        )
    ):
        cases.append((f"invalid-utf8:{path}", [data], I, "MALFORMED_REQUEST"))
    # Mid-stream: a good register, then a message that does not parse ends the stream.
    after = worker_request(
        worker_pb2.WorkerEvent(
            seq=9,
            step_result=worker_pb2.StepResult(
                flow_id="running-1",
                key="k#1",
                args_hash="h",
                result=json_payload(),
                failure=common_pb2.Failure(type="t", message="m", stack_trace="s", reason="r"),
            ),
        ),
        worker_pb2.WorkerEvent(
            wait=worker_pb2.WaitRequest(key="k", signal=worker_pb2.SignalWait(name="n"))
        ),
        worker_pb2.WorkerEvent(suspend=worker_pb2.Suspend(flow_id="f", open_keys=["a"])),
        worker_pb2.WorkerEvent(
            wait=worker_pb2.WaitRequest(
                key="c", child=worker_pb2.ChildWait(child_flow_id="c", flow_type="t")
            )
        ),
    )
    for path, data in invalid_utf8_variants(after):
        cases.append((f"mid-stream-invalid-utf8:{path}", [msg(good), data], I, "MALFORMED_REQUEST"))
    cases.append(("mid-stream-garbage", [msg(good), b"\x0a\x05\x0a"], I, "MALFORMED_REQUEST"))
    return cases


async def test_bad_stream_openings_end_the_stream_with_precise_statuses(seeded: Seeded) -> None:
    before = await snapshot(seeded.channel)
    wrong: list[str] = []
    cases = opening_cases()
    TRIED["Connect.opening"] = len(cases)
    for name, messages, code, reason in cases:
        call = connect_raw(seeded.channel)
        for data in messages:
            await call.write(data)
        await call.done_writing()
        try:
            async with asyncio.timeout(10):
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as error:
            got = refusal_of(error)
            if (got.code, got.reason, got.domain) != (code, reason, "ergon") or len(
                got.message
            ) < 10:
                wrong.append(f"{name}: got {got}")
        else:
            wrong.append(f"{name}: the stream ended OK")
        await still_serving(seeded.channel)
        if await snapshot(seeded.channel) != before:
            wrong.append(f"{name}: the store changed")
            before = await snapshot(seeded.channel)
    # The seeded worker's own stream was not disturbed.
    beat = await seeded.worker.ask(heartbeat=worker_pb2.Heartbeat())
    assert beat.code == 0
    assert not wrong, "\n".join(wrong)


async def test_held_leases_no_server_gave_are_not_reattached(seeded: Seeded) -> None:
    call = connect(seeded.channel)
    held = [
        worker_pb2.HeldLease(flow_id="running-1", lease_token=UINT64_MAX),
        worker_pb2.HeldLease(flow_id="running-1", lease_token=seeded.running_token + 1),
        worker_pb2.HeldLease(flow_id="no-such-flow", lease_token=1),
        worker_pb2.HeldLease(flow_id=HUGE, lease_token=1),
        worker_pb2.HeldLease(flow_id=CONTROL, lease_token=seeded.running_token),
        worker_pb2.HeldLease(flow_id="", lease_token=seeded.running_token),
    ]
    await call.write(worker_request(register_event(worker_id="other", held_leases=held)))
    response = await call.read()
    assert isinstance(response, worker_pb2.ConnectResponse)
    assert list(response.events[0].registered.reattached_flow_ids) == []
    call.cancel()
    beat = await seeded.worker.ask(heartbeat=worker_pb2.Heartbeat())
    assert beat.code == 0


# ------------------------------------------------------------------ many streams


async def test_a_client_opening_1000_streams_does_not_take_the_server_down(
    seeded: Seeded,
) -> None:
    """1,000 streams on one connection: the first 200 (the default limit) are served, the rest
    refused with RESOURCE_EXHAUSTED / TOO_MANY_STREAMS; the server stays up, answers other
    clients and keeps dispatching to a new worker."""
    limit = seeded.server._server.engine.config.max_streams_per_client
    # A connection of its own: channels to one target otherwise share their connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(seeded.server.address, options=own_connection) as hog:
        calls = [connect(hog) for _ in range(1000)]
        for i, call in enumerate(calls):
            # A refused stream may already be over: its status is read below.
            with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await call.write(
                    worker_request(register_event(worker_id=f"hog-{i}", flow_types=["HogType"]))
                )
        registered = refused = 0
        async with asyncio.timeout(60):
            for call in calls:
                try:
                    first = await call.read()
                except grpc.aio.AioRpcError as error:
                    assert refusal_of(error).reason == "TOO_MANY_STREAMS"
                    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
                    continue
                assert isinstance(first, worker_pb2.ConnectResponse)
                assert first.events[0].WhichOneof("event") == "registered"
                registered += 1
        assert (registered, refused) == (limit, 1000 - limit)
        # Others are still served, on their own channel.
        async with grpc.aio.insecure_channel(seeded.server.address) as other:
            await still_serving(other)
            worker = Worker(connect(other))
            await worker.call.write(
                worker_request(register_event(worker_id="newcomer", flow_types=["Fresh"]))
            )
            schedule_call = other.unary_unary(
                SCHEDULER + "ScheduleFlow",
                request_serializer=scheduler_pb2.ScheduleFlowRequest.SerializeToString,
                response_deserializer=scheduler_pb2.ScheduleFlowResponse.FromString,
            )
            async with asyncio.timeout(10):
                while True:
                    try:
                        await schedule_call(schedule("fresh-1", flow_type="Fresh"))
                        break
                    except grpc.aio.AioRpcError as error:
                        # The newcomer's register may not have landed yet.
                        assert refusal_of(error).reason == "UNKNOWN_FLOW_TYPE"
                        await asyncio.sleep(0.05)
            await worker.until(lambda: bool(worker.assignments))
            assert worker.assignments[0].flow_id == "fresh-1"
            await worker.close()
        for call in calls:
            call.cancel()
    # The hog's sessions are gone once its streams are.
    engine = seeded.server._server.engine
    async with asyncio.timeout(10):
        while len(engine.dispatcher.sessions) > 1:  # noqa: ASYNC110 - polling engine state
            await asyncio.sleep(0.05)
    await still_serving(seeded.channel)


def test_zz_report_bad_inputs_tried() -> None:
    """Prints how many bad inputs were tried per RPC (run with -s to see)."""
    for rpc, count in sorted(TRIED.items()):
        print(f"bad inputs tried: {rpc}: {count}")
