"""A time-bounded fuzz run of every RPC against a live server, with raw bytes.

Requests start from valid messages and are mutated twice over: structurally (a random field
set to a hostile value: empty, huge, control characters, int extremes, NaN, unknown enum
values, real flow ids and lease tokens) and at the byte level (bit flips, cuts, splices,
random fields appended). They go out as raw bytes (`channel.unary_unary(method)` with no
serializer), and worker streams carry mutated messages after a register.

Every answer must be a proper status: never INTERNAL or UNKNOWN (a bug), and a refusal by
Ergon carries an ErrorInfo of domain "ergon"; every ack on a worker stream likewise. The server
must keep answering a normal call throughout.

    ERGON_FUZZ_SECONDS   how long to fuzz (default 8)
    ERGON_FUZZ_SEED      the seed, to replay a run (default: random, printed and in failures)
    ERGON_FUZZ_DB        the store (default: SQLite in a temporary folder; `memory://`)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    signal_pb2,
    worker_pb2,
)
from ergon_worker_sdk.testing import ErgonTestServer

SECONDS = float(os.environ.get("ERGON_FUZZ_SECONDS", "8"))
SEED = int(os.environ.get("ERGON_FUZZ_SEED", str(random.SystemRandom().randrange(2**32))))
DB = os.environ.get("ERGON_FUZZ_DB") or None
LANES = 6
TYPE = "Fz"
LIMIT = 64 * 1024

BUGS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
# Statuses gRPC itself gives (no Ergon handler ran, so no ErrorInfo).
TRANSPORT = {
    grpc.StatusCode.DEADLINE_EXCEEDED,  # our client-side deadline on long polls
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # only when over the message limit (checked below)
    grpc.StatusCode.CANCELLED,
}


def payload(data: bytes = b'{"a":1}') -> common_pb2.Payload:
    return common_pb2.Payload(encoding="json/plain", data=data)


def schedule(flow_id: str) -> scheduler_pb2.ScheduleFlowRequest:
    return scheduler_pb2.ScheduleFlowRequest(
        flow_id=flow_id,
        flow_type=TYPE,
        input=payload(),
        request_id="r-" + flow_id,
        labels={"k": "v"},
        retry_policy=common_pb2.RetryPolicy(max_attempts=2, backoff_multiplier=2.0),
    )


UNARY: dict[str, list[Message]] = {
    "/ergon.v1.SchedulerService/ScheduleFlow": [schedule("fz-1"), schedule("")],
    "/ergon.v1.SchedulerService/ScheduleFlows": [
        scheduler_pb2.ScheduleFlowsRequest(requests=[schedule("fz-2"), schedule("fz-3")])
    ],
    "/ergon.v1.SchedulerService/GetFlow": [scheduler_pb2.GetFlowRequest(flow_id="fz-1")],
    "/ergon.v1.SchedulerService/WaitFlow": [
        scheduler_pb2.WaitFlowRequest(flow_id="fz-1", timeout_ms=10)
    ],
    "/ergon.v1.SchedulerService/RunFlow": [
        scheduler_pb2.RunFlowRequest(flow=schedule("fz-5"), timeout_ms=10)
    ],
    "/ergon.v1.SchedulerService/ListFlows": [
        scheduler_pb2.ListFlowsRequest(statuses=[1, 2], flow_type=TYPE, page_size=5),
        scheduler_pb2.ListFlowsRequest(page_token="3"),
    ],
    "/ergon.v1.SchedulerService/GetFlowHistory": [
        scheduler_pb2.GetFlowHistoryRequest(flow_id="fz-1", page_size=2, page_token="1")
    ],
    "/ergon.v1.SchedulerService/CancelFlow": [
        scheduler_pb2.CancelFlowRequest(flow_id="fz-2", reason="fuzz")
    ],
    "/ergon.v1.SignalService/SendSignal": [
        signal_pb2.SendSignalRequest(flow_id="fz-1", name="go", payload=payload(), request_id="s")
    ],
    "/ergon.v1.SignalService/SignalWithSchedule": [
        signal_pb2.SignalWithScheduleRequest(
            schedule=schedule("fz-4"), name="go", payload=payload()
        )
    ],
}
CONNECT = "/ergon.v1.WorkerService/Connect"


def worker_events(token: int) -> list[worker_pb2.WorkerEvent]:
    flow = "fz-1"
    return [
        worker_pb2.WorkerEvent(seq=1, heartbeat=worker_pb2.Heartbeat()),
        worker_pb2.WorkerEvent(
            seq=2,
            step_result=worker_pb2.StepResult(
                flow_id=flow,
                lease_token=token,
                key="a#1",
                args_hash="h",
                attempts=1,
                result=payload(),
            ),
        ),
        worker_pb2.WorkerEvent(
            seq=3,
            flow_completed=worker_pb2.FlowCompleted(
                flow_id=flow, lease_token=token, result=payload()
            ),
        ),
        worker_pb2.WorkerEvent(
            seq=4,
            flow_failed=worker_pb2.FlowFailed(
                flow_id=flow,
                lease_token=token,
                failure=common_pb2.Failure(type="E", message="m"),
                retry_delay_ms=5,
            ),
        ),
        worker_pb2.WorkerEvent(seq=5, release=worker_pb2.Release(flow_id=flow, lease_token=token)),
        worker_pb2.WorkerEvent(seq=6, capacity_update=worker_pb2.CapacityUpdate(capacity=3)),
        worker_pb2.WorkerEvent(
            seq=7,
            wait=worker_pb2.WaitRequest(
                flow_id=flow, lease_token=token, key="t#1", timer=worker_pb2.TimerWait(fire_in_ms=5)
            ),
        ),
        worker_pb2.WorkerEvent(
            seq=8,
            wait=worker_pb2.WaitRequest(
                flow_id=flow, lease_token=token, key="s#1", signal=worker_pb2.SignalWait(name="go")
            ),
        ),
        worker_pb2.WorkerEvent(
            seq=9,
            wait=worker_pb2.WaitRequest(
                flow_id=flow,
                lease_token=token,
                key="c#1",
                child=worker_pb2.ChildWait(child_flow_id="fz-c", flow_type=TYPE, input=payload()),
            ),
        ),
        worker_pb2.WorkerEvent(
            seq=10, suspend=worker_pb2.Suspend(flow_id=flow, lease_token=token, open_keys=["s#1"])
        ),
        worker_pb2.WorkerEvent(
            seq=11,
            park=worker_pb2.Park(
                flow_id=flow,
                lease_token=token,
                failure=common_pb2.Failure(reason="HISTORY_MISMATCH"),
            ),
        ),
    ]


def register(rng: random.Random) -> worker_pb2.ConnectRequest:
    return worker_pb2.ConnectRequest(
        events=[
            worker_pb2.WorkerEvent(
                register=worker_pb2.Register(
                    worker_id=f"fz-{rng.randrange(100)}",
                    flow_types=[TYPE],
                    capacity=rng.choice([1, 2, 5]),
                    protocol_version=1,
                )
            )
        ]
    )


class Mutator:
    """Hostile values and byte-level mutations, from one seeded generator."""

    def __init__(self, rng: random.Random, tokens: list[int]) -> None:
        self.rng = rng
        self.tokens = tokens  # lease tokens seen in assignments

    def string(self) -> str:
        rng = self.rng
        return rng.choice(
            [
                "",
                "fz-1",
                "fz-2",
                "fz-c",
                TYPE,
                "$cancel",
                "a#1",
                "x" * rng.choice([255, 256, 257, 513, 5000]),
                "bad\x00id",
                "\u202e\ufeff",
                "日本語",
                "\U0001f600" * 3,
                "json/plain",
                "binary/plain",
                "binary/null",
                "python/pickle",
                "9" * rng.randrange(1, 40),
                "-1",
                str(rng.randrange(2**64)),
                "".join(chr(rng.randrange(0x20, 0xD7FF)) for _ in range(rng.randrange(1, 12))),
            ]
        )

    def integer(self, field: descriptor.FieldDescriptor) -> int:
        rng = self.rng
        unsigned = field.type in (
            descriptor.FieldDescriptor.TYPE_UINT64,
            descriptor.FieldDescriptor.TYPE_UINT32,
        )
        bits = (
            64
            if field.type
            in (
                descriptor.FieldDescriptor.TYPE_INT64,
                descriptor.FieldDescriptor.TYPE_UINT64,
            )
            else 32
        )
        pool = [0, 1, 2, 3, 7, rng.randrange(1000), *self.tokens[-5:]]
        if unsigned:
            pool += [2**bits - 1, 2 ** (bits - 1), 2 ** (bits - 1) - 1]
        else:
            pool += [-1, 2 ** (bits - 1) - 1, -(2 ** (bits - 1)), -rng.randrange(1000)]
        return rng.choice(pool)

    def value(self, field: descriptor.FieldDescriptor) -> Any:
        kind = field.type
        t = descriptor.FieldDescriptor
        if kind == t.TYPE_STRING:
            return self.string()
        if kind == t.TYPE_BYTES:
            return self.rng.choice(
                [
                    b"",
                    b"{",
                    b"null",
                    b"NaN",
                    b'"x"',
                    b"\xff\xfe",
                    b"1" * self.rng.choice([1, LIMIT + 1]),
                ]
            )
        if kind == t.TYPE_BOOL:
            return self.rng.random() < 0.5
        if kind in (t.TYPE_DOUBLE, t.TYPE_FLOAT):
            return self.rng.choice([0.0, -0.0, 0.5, 1.0, 1e308, float("nan"), float("inf"), -1.0])
        if kind == t.TYPE_ENUM:
            return self.rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 99, -1, 2**31 - 1])
        return self.integer(field)

    def mutate_fields(self, message: Message, depth: int = 0) -> None:
        """Set a few random fields, anywhere in the message, to hostile values."""
        for _ in range(self.rng.randrange(1, 4)):
            fields = message.DESCRIPTOR.fields
            if not fields:  # Heartbeat, Ping: nothing to set
                return
            field = self.rng.choice(fields)
            if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry:
                    getattr(message, field.name)[self.string()] = self.string()
                    continue
                if field.message_type.full_name == "google.protobuf.Value":
                    value = struct_pb2.Value()
                    choice = self.rng.randrange(4)
                    if choice == 0:
                        value.number_value = self.rng.choice([float("nan"), float("inf"), 1.5])
                    elif choice == 1:
                        value.string_value = self.string()
                    elif choice == 2:
                        value.struct_value.update({"a": 1})
                    target = getattr(message, field.name)
                    if field.is_repeated:
                        target.add().CopyFrom(value)
                    else:
                        target.CopyFrom(value)
                    continue
                if depth > 3:
                    continue
                if field.is_repeated:
                    target = getattr(message, field.name)
                    sub = target.add() if len(target) == 0 or self.rng.random() < 0.5 else target[0]
                else:
                    sub = getattr(message, field.name)
                if self.rng.random() < 0.2:
                    sub.Clear()
                    if not field.is_repeated:
                        sub.SetInParent()
                else:
                    self.mutate_fields(sub, depth + 1)
                continue
            value = self.value(field)
            try:
                if field.is_repeated:
                    getattr(message, field.name).append(value)
                else:
                    setattr(message, field.name, value)
            except (ValueError, TypeError):
                pass  # out of the field's range for protobuf itself: the byte level covers it

    def mutate_bytes(self, data: bytes, others: list[bytes]) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            choice = rng.randrange(8)
            if choice == 0 and buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif choice == 1 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif choice == 2:
                i = rng.randrange(len(buf) + 1)
                buf[i:i] = rng.randbytes(rng.randrange(1, 8))
            elif choice == 3 and buf:
                i = rng.randrange(len(buf))
                del buf[i : i + rng.randrange(1, 8)]
            elif choice == 4 and buf:
                del buf[rng.randrange(len(buf)) :]
            elif choice == 5:
                number = rng.randrange(1, 20)
                wire = rng.choice([0, 1, 2, 5])
                tag = (
                    bytes([number << 3 | wire])
                    if number < 16
                    else bytes([(number << 3 | wire) | 0x80, 1])
                )
                body = {
                    0: bytes([rng.randrange(128)]),
                    1: rng.randbytes(8),
                    2: bytes([3]) + rng.randbytes(3),
                    5: rng.randbytes(4),
                }[wire]
                buf += tag + body
            elif choice == 6 and others:
                other = rng.choice(others)
                cut = rng.randrange(len(other) + 1)
                buf = buf[: rng.randrange(len(buf) + 1)] + bytearray(other[cut:])
            else:
                buf += buf[: rng.randrange(len(buf) + 1)]
        return bytes(buf)

    def request(self, seeds: list[Message], others: list[bytes]) -> bytes:
        message = self.rng.choice(seeds).__deepcopy__()
        mode = self.rng.random()
        if mode < 0.6:
            self.mutate_fields(message)
            data = message.SerializeToString()
            if self.rng.random() < 0.2:
                data = self.mutate_bytes(data, others)
            return data
        data = message.SerializeToString()
        return (
            self.mutate_bytes(data, others)
            if mode < 0.95
            else self.rng.randbytes(self.rng.randrange(64))
        )


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.domain, info.reason
    return "", ""


class Tally:
    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.acks: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def status(self, method: str, data: bytes, error: grpc.aio.AioRpcError | None) -> None:
        name = method.rsplit("/", 1)[-1]
        if error is None:
            self.statuses[f"{name} OK"] += 1
            return
        code = error.code()
        domain, reason = error_info(error)
        self.statuses[f"{name} {code.name} {reason}".rstrip()] += 1
        if code in BUGS:
            self.problems.append(f"{name}: {code.name} {error.details()!r} for {data.hex()[:400]}")
        elif code not in TRANSPORT and domain != "ergon":
            self.problems.append(f"{name}: {code.name} without ErrorInfo for {data.hex()[:400]}")

    def ack(self, ack: worker_pb2.Ack, data: bytes) -> None:
        code = grpc.StatusCode.OK
        for candidate in grpc.StatusCode:
            if candidate.value[0] == ack.code:
                code = candidate
        self.acks[f"{code.name} {ack.reason}".rstrip()] += 1
        if ack.code in (13, 2, 15) or (ack.code and not ack.reason):
            self.problems.append(
                f"ack {ack.code} {ack.reason} {ack.message!r} for {data.hex()[:400]}"
            )


async def unary_lane(
    channel: grpc.aio.Channel, rng: random.Random, tokens: list[int], deadline: float, tally: Tally
) -> None:
    mutator = Mutator(rng, tokens)
    methods = list(UNARY)
    everything = [m.SerializeToString() for seeds in UNARY.values() for m in seeds]
    while time.monotonic() < deadline:
        method = rng.choice(methods)
        data = mutator.request(UNARY[method], everything)
        tally.requests[method.rsplit("/", 1)[-1]] += 1
        try:
            await channel.unary_unary(method)(data, timeout=2)
        except grpc.aio.AioRpcError as error:
            tally.status(method, data, error)
        else:
            tally.status(method, data, None)


async def read_stream(
    call: grpc.aio.StreamStreamCall[bytes, bytes],
    sent: dict[int, bytes],
    tokens: list[int],
    tally: Tally,
) -> None:
    async for raw in call:
        response = worker_pb2.ConnectResponse.FromString(raw)
        for event in response.events:
            kind = event.WhichOneof("event")
            if kind == "assignment":
                tokens.append(event.assignment.lease_token)
            elif kind == "ack":
                tally.ack(event.ack, sent.get(event.ack.seq, b""))


async def stream_lane(
    channel: grpc.aio.Channel, rng: random.Random, tokens: list[int], deadline: float, tally: Tally
) -> None:
    mutator = Mutator(rng, tokens)
    while time.monotonic() < deadline:
        call = channel.stream_stream(CONNECT)()
        sent: dict[int, bytes] = {}
        opening = register(rng)
        if rng.random() < 0.15:
            mutator.mutate_fields(opening)
        first = opening.SerializeToString()
        if rng.random() < 0.05:
            first = mutator.mutate_bytes(first, [])
        tally.requests["Connect"] += 1

        reader = asyncio.create_task(read_stream(call, sent, tokens, tally))
        try:
            await call.write(first)
            for _ in range(rng.randrange(1, 25)):
                token = rng.choice(tokens) if tokens else 1
                events = rng.sample(worker_events(token), rng.randrange(1, 4))
                request = worker_pb2.ConnectRequest(events=events)
                if rng.random() < 0.7:
                    mutator.mutate_fields(request)
                seq = rng.randrange(1, 2**20)
                for event in request.events:
                    seq += 1
                    event.seq = seq
                data = request.SerializeToString()
                if rng.random() < 0.05:
                    data = mutator.mutate_bytes(data, [])
                for event in request.events:
                    sent[event.seq] = data
                tally.requests["Connect.message"] += 1
                await call.write(data)
                await asyncio.sleep(0)
            await call.done_writing()
            # The server ends the stream once it has answered everything.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(reader)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the server ended the stream (the status is read below)
        finally:
            if not reader.done():
                call.cancel()
            with contextlib.suppress(BaseException):
                await reader
        # The server's answer is what the reader saw; call.code() may instead hold the client's
        # own failure to write after the server had already ended the stream.
        error = None if reader.cancelled() else reader.exception()
        if reader.cancelled():
            tally.statuses["Connect CANCELLED (by the fuzzer)"] += 1
        elif error is None:
            tally.statuses["Connect OK"] += 1
        elif isinstance(error, grpc.aio.AioRpcError):
            if "execute_batch" in (error.debug_error_string() or ""):
                # A write raced the server's end of the stream: a client-side INTERNAL, with
                # the server's status lost. The server-side log check below still holds.
                tally.statuses["Connect (client wrote after the server ended it)"] += 1
            else:
                tally.status(CONNECT, first, error)
        else:
            raise error


async def watchdog(channel: grpc.aio.Channel, deadline: float, tally: Tally) -> None:
    get = channel.unary_unary(
        "/ergon.v1.SchedulerService/GetFlow",
        request_serializer=scheduler_pb2.GetFlowRequest.SerializeToString,
        response_deserializer=scheduler_pb2.GetFlowResponse.FromString,
    )
    while time.monotonic() < deadline:
        try:
            await get(scheduler_pb2.GetFlowRequest(flow_id="anchor"), timeout=5)
        except grpc.aio.AioRpcError as error:
            tally.problems.append(
                f"the server stopped answering: {error.code().name} {error.details()}"
            )
            return
        await asyncio.sleep(0.5)


class ServerErrors(logging.Handler):
    """Collects what the server logs at ERROR: a handler that failed with a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


async def test_fuzzed_requests_always_get_a_proper_status() -> None:
    tally = Tally()
    server_errors = ServerErrors()
    logging.getLogger("ergon_server").addHandler(server_errors)
    try:
        await fuzz(tally)
    finally:
        logging.getLogger("ergon_server").removeHandler(server_errors)
    total = sum(tally.requests.values())
    print(f"\nfuzz seed {SEED}: {total} requests in {SECONDS:g} s: {dict(tally.requests)}")
    print(f"statuses: {dict(sorted(tally.statuses.items()))}")
    print(f"acks: {dict(sorted(tally.acks.items()))}")
    assert total > 100, f"only {total} requests sent (seed {SEED})"
    problems = sorted(set(tally.problems)) + server_errors.records
    assert not problems, f"fuzz seed {SEED} (ERGON_FUZZ_SEED={SEED} to replay):\n" + "\n".join(
        problems[:30]
    )


async def fuzz(tally: Tally) -> None:
    async with ErgonTestServer(DB, max_payload_bytes=LIMIT) as server:
        await server._server.store.register_flow_types([TYPE], 0)
        async with grpc.aio.insecure_channel(server.address) as channel:
            anchor = channel.unary_unary(
                "/ergon.v1.SchedulerService/ScheduleFlow",
                request_serializer=scheduler_pb2.ScheduleFlowRequest.SerializeToString,
                response_deserializer=scheduler_pb2.ScheduleFlowResponse.FromString,
            )
            for flow_id in ("anchor", "fz-1", "fz-2"):
                await anchor(schedule(flow_id))
            tokens: list[int] = []
            deadline = time.monotonic() + SECONDS
            lanes: list[Callable[..., Any]] = [unary_lane] * (LANES - 2) + [stream_lane] * 2
            await asyncio.gather(
                watchdog(channel, deadline, tally),
                *(
                    lane(channel, random.Random(SEED + i), tokens, deadline, tally)
                    for i, lane in enumerate(lanes)
                ),
            )
            # Still up, and still working: a normal schedule and read succeed.
            await anchor(schedule("after-fuzz"), timeout=10)
            get = channel.unary_unary(
                "/ergon.v1.SchedulerService/GetFlow",
                request_serializer=scheduler_pb2.GetFlowRequest.SerializeToString,
                response_deserializer=scheduler_pb2.GetFlowResponse.FromString,
            )
            got = await get(scheduler_pb2.GetFlowRequest(flow_id="after-fuzz"), timeout=10)
            assert got.flow.flow_type == TYPE
