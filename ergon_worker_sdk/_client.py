"""`Client` (one channel to the server, every client call) and `Scheduler` (pyergon's name)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import ipaddress
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ergon_worker_sdk._definitions import RetryPolicy, flow_type_definition
from ergon_worker_sdk.converter import JsonConverter, PayloadConverter, to_jsonable
from ergon_worker_sdk.errors import (
    FlowAlreadyScheduledError,
    PayloadTooLargeError,
    ServerUnavailableError,
    translate,
)
from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    signal_pb2,
    signal_pb2_grpc,
)

log = logging.getLogger("ergon_worker_sdk.client")

DEFAULT_MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_SCHEDULE_BATCH_FLOWS = 1000
# The most one message of ours carries (or half the message limit, if less): well under the
# server's limit, which a deployment keeps equal to the client's.
MAX_BATCH_BYTES = 4 * 1024 * 1024
T = TypeVar("T")


class FlowStatus(enum.Enum):
    """The life cycle of a flow."""

    PENDING = common_pb2.FLOW_STATUS_PENDING
    RUNNING = common_pb2.FLOW_STATUS_RUNNING
    WAITING = common_pb2.FLOW_STATUS_WAITING
    COMPLETED = common_pb2.FLOW_STATUS_COMPLETED
    FAILED = common_pb2.FLOW_STATUS_FAILED
    CANCELLED = common_pb2.FLOW_STATUS_CANCELLED

    @property
    def terminal(self) -> bool:
        """Whether the flow has ended."""
        return self in (FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.CANCELLED)


@dataclass(frozen=True)
class FlowError:
    """Why a flow failed."""

    type: str
    message: str
    reason: str = ""
    stack_trace: str = ""


@dataclass(frozen=True)
class FlowOutcome:
    """A flow's state as the server reported it; `result` is decoded JSON (or the raw value)."""

    flow_id: str
    flow_type: str
    status: FlowStatus
    result: Any = None
    error: FlowError | None = None
    attempt: int = 1
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: datetime.datetime | None = None
    completed_at: datetime.datetime | None = None


@dataclass(frozen=True)
class JournalEntry:
    """One entry of a flow's history."""

    sequence: int
    key: str
    kind: str
    status: str
    result: Any
    error: FlowError | None
    attempts: int
    recorded_at: datetime.datetime
    # TIMER entries: when the timer was due (it fired at recorded_at).
    due_at: datetime.datetime | None = None


@dataclass(frozen=True)
class FlowPage:
    """One page of a flow listing, and the token of the next (empty after the last)."""

    flows: list[FlowOutcome]
    next_page_token: str


@dataclass(frozen=True)
class WorkerInfo:
    """A worker session connected to the server."""

    session_id: str
    worker_id: str
    flow_types: list[str]
    capacity: int
    running: int
    assigned_total: int
    connected_at: datetime.datetime
    peer: str


# gRPC targets whose scheme takes a comma-separated list itself.
_LIST_SCHEMES = ("ipv4:", "ipv6:", "unix:", "unix-abstract:")


def channel_target(address: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """A gRPC target (and options) for one address or several, round-robin.

    One address is any gRPC target (`host:port`, `dns:///name:port`, ...). Several are spread
    over round-robin, which gRPC does for IP literals only (`10.0.0.5:50051`, or
    `[fd00::5]:50051`), all of one family. Several are a list, or one string with commas
    between them (`"10.0.0.5:50051,10.0.0.6:50051"`, as `ergon --address` and `ERGON_ADDRESS`
    take them); a gRPC target of the schemes that take a list themselves (`ipv4:`, `ipv6:`,
    `unix:`) is left whole.

    Raises:
        ValueError: no address, or several, not all IP literals of one family with a port.
    """
    given = [address] if isinstance(address, str) else list(address)
    if len(given) == 1 and given[0].startswith(_LIST_SCHEMES):
        return given[0], []
    # gRPC would take "a:1,b:2" as one host name and fail to resolve it on every call.
    addresses = [piece.strip() for item in given for piece in item.split(",") if piece.strip()]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0], []
    families = {_ip_family(a) for a in addresses}
    if None in families or len(families) > 1:
        raise ValueError(
            f"several server addresses must be IP literals of one family with a port "
            f"(10.0.0.5:50051, [fd00::5]:50051), not {', '.join(map(repr, addresses))}: "
            "for host names, give one name that resolves to every replica, or a load balancer"
        )
    (family,) = families
    return f"{family}:" + ",".join(addresses), [("grpc.lb_policy_name", "round_robin")]


def _ip_family(address: str) -> str | None:
    """`ipv4` or `ipv6` for an IP literal with a port, else None."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    if ip.version == 6:
        return "ipv6" if bracketed else None
    return "ipv4"


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the connection to the server.

    Attributes:
        ca_cert: PEM CA bundle that signed the server's certificate (None: the system's roots).
        client_cert: PEM client certificate chain, for servers that require mutual TLS.
        client_key: PEM private key of `client_cert`.
        server_name: the name to check the server's certificate against, when it differs from
            the address's host.
    """

    ca_cert: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read the PEM files named."""

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        return cls(read(ca_cert), read(client_cert), read(client_key), server_name)


# The longest wait a server grants one WaitFlow or RunFlow call.
MAX_WAIT_MS = 60_000


def _wait_ms(loop: asyncio.AbstractEventLoop, deadline: float | None) -> int:
    """The timeout_ms of the next waiting call towards `deadline` (None: no deadline)."""
    if deadline is None:
        return MAX_WAIT_MS
    # Capped before int(): an infinite timeout means wait as long as the server allows.
    return int(max(0.0, min((deadline - loop.time()) * 1000, float(MAX_WAIT_MS))))


# The server's grpc.http2.min_recv_ping_interval_without_data_ms, in seconds.
MIN_KEEPALIVE_S = 5.0


class Client:
    """A connection to an Ergon server, for scheduling, reading, waiting, signalling, cancelling.

    Use as `async with Client("127.0.0.1:50051") as client:`. Several addresses (server
    replicas, as IP literals, in a list or a string with commas: see `channel_target`) are
    used round-robin. Calls that fail
    with UNAVAILABLE are retried with backoff for up to `retry_timeout_s` (scheduling is
    idempotent through a request id). `token` is sent as a bearer token with every call;
    `tls` (a `TlsConfig`, or True for the system's roots) switches to an encrypted channel.
    While calls are open (a worker's stream, a long `wait`), the channel pings the server
    every `keepalive_s` seconds and gives the connection up if a ping goes unanswered for
    min(keepalive_s, 10) s, so a dead route (no reset, no reply) fails the calls as
    UNAVAILABLE, which are retried, instead of hanging; None turns that off. The server
    refuses pings more often than every 5 s.
    """

    def __init__(
        self,
        address: str | Sequence[str] = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
        converter: PayloadConverter | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_timeout_s: float = 30.0,
        keepalive_s: float | None = 30.0,
    ) -> None:
        if keepalive_s is not None and keepalive_s < MIN_KEEPALIVE_S:
            raise ValueError(
                f"keepalive_s must be at least {MIN_KEEPALIVE_S} (the server refuses faster "
                "pings), or None"
            )
        self.keepalive_s = keepalive_s
        # Checked now rather than at the first call, which would only see it fail to resolve.
        channel_target(address)
        self.address = address
        self.call_metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.tls: TlsConfig | None = TlsConfig() if tls is True else (tls or None)
        self.converter: PayloadConverter = converter or JsonConverter()
        self.max_payload_bytes = max_payload_bytes
        self.max_message_bytes = max_message_bytes
        self.retry_timeout_s = retry_timeout_s
        self._channel: grpc.aio.Channel | None = None
        # A stub builds a callable per method: made once per channel, not once per call.
        self._stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The gRPC channel, opened on first use."""
        if self._channel is None:
            target, options = channel_target(self.address)
            options += [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # gRPC's own reconnect backoff grows to two minutes, and while it waits every
                # call fails at once: a server back from a restart would go unnoticed for that
                # long, and workers' leases would lapse. Retrying is the SDK's job; dial soon.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if self.keepalive_s is not None:
                options += [
                    ("grpc.keepalive_time_ms", round(self.keepalive_s * 1000)),
                    ("grpc.keepalive_timeout_ms", round(min(self.keepalive_s, 10.0) * 1000)),
                    ("grpc.http2.max_pings_without_data", 0),
                    # gRPC 1.85 gave up on an unanswered ping only with this one set too.
                    ("grpc.http2.ping_timeout_ms", round(min(self.keepalive_s, 10.0) * 1000)),
                ]
            if self.tls is None:
                self._channel = grpc.aio.insecure_channel(target, options=options)
            else:
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                credentials = grpc.ssl_channel_credentials(
                    self.tls.ca_cert, self.tls.client_key, self.tls.client_cert
                )
                self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        return self._channel

    async def close(self) -> None:
        """Close the channel. Idempotent."""
        self._stub = None
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, *, retry: bool = True
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout_s
        backoff = 0.05
        while True:
            try:
                return await method(request, metadata=self.call_metadata)
            except grpc.aio.AioRpcError as error:
                translated = translate(error)
                # CANCELLED here comes from the server or the transport (a connection reset
                # under the call), never from us (our own cancellation raises CancelledError);
                # every call made here is idempotent, so it is retried like UNAVAILABLE.
                transient = isinstance(translated, ServerUnavailableError) or (
                    error.code() is grpc.StatusCode.CANCELLED
                )
                if not retry or not transient or loop.time() + backoff > deadline:
                    raise translated from None
                log.debug("server unavailable (%s); retrying", error.details())
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    @property
    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerServiceAsyncStub:
        if self._stub is None:
            self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        return self._stub

    @property
    def batch_bytes(self) -> int:
        """The most one batched message of this client (or its worker's stream) carries."""
        return min(MAX_BATCH_BYTES, self.max_message_bytes // 2)

    def payload(self, value: Any) -> common_pb2.Payload:
        """Encode a value, refusing it here if it is over the payload limit."""
        payload = self.converter.to_payload(value)
        size = payload.ByteSize()
        if size > self.max_payload_bytes:
            raise PayloadTooLargeError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "PAYLOAD_TOO_LARGE",
                f"payload is {size} bytes; the limit is {self.max_payload_bytes} bytes",
            )
        return payload

    def schedule_request(
        self,
        flow: Any,
        *,
        flow_id: str | None = None,
        request_id: str | None = None,
        start_at: datetime.datetime | None = None,
        retry_policy: RetryPolicy | None = None,
        labels: dict[str, str] | None = None,
    ) -> scheduler_pb2.ScheduleFlowRequest:
        """The request that schedules a `@flow_type` instance."""
        definition = flow_type_definition(type(flow))
        request = scheduler_pb2.ScheduleFlowRequest(
            flow_id=flow_id or "",
            flow_type=definition.type_id,
            request_id=request_id or uuid.uuid4().hex,
            labels=labels or {},
        )
        fields = {f.name: getattr(flow, f.name) for f in dataclasses.fields(flow)}
        request.input.CopyFrom(self.payload(to_jsonable(fields)))
        if start_at is not None:
            if start_at.tzinfo is None:
                raise ValueError("start_at must be timezone-aware")
            request.start_at.FromDatetime(start_at)
        if retry_policy is not None:
            request.retry_policy.CopyFrom(retry_policy.to_proto())
        return request

    async def schedule_type(
        self, flow_type: str, input_value: Any = None, *, flow_id: str | None = None
    ) -> str:
        """Schedule a flow by type name with a JSON-able input (the CLI's way, no class needed)."""
        request = self._type_request(flow_type, input_value, flow_id)
        response = await self._call(self._scheduler.ScheduleFlow, request)
        return response.flow_id

    def _type_request(
        self, flow_type: str, input_value: Any, flow_id: str | None
    ) -> scheduler_pb2.ScheduleFlowRequest:
        return scheduler_pb2.ScheduleFlowRequest(
            flow_id=flow_id or "",
            flow_type=flow_type,
            request_id=uuid.uuid4().hex,
            input=self.payload(input_value if input_value is not None else {}),
        )

    async def workers(self) -> list[WorkerInfo]:
        """The worker sessions connected to the server (to this replica)."""
        response = await self._call(self._scheduler.ListWorkers, scheduler_pb2.ListWorkersRequest())
        return [
            WorkerInfo(
                session_id=w.session_id,
                worker_id=w.worker_id,
                flow_types=list(w.flow_types),
                capacity=w.capacity,
                running=w.running,
                assigned_total=w.assigned_total,
                connected_at=w.connected_at.ToDatetime(datetime.UTC),
                peer=w.peer,
            )
            for w in response.workers
        ]

    async def schedule(self, flow: Any, **options: Any) -> str:
        """Schedule a `@flow_type` instance; returns its flow id.

        Options: flow_id (the business key; scheduling it again returns the same flow),
        request_id, start_at (aware datetime), retry_policy, labels.
        """
        request = self.schedule_request(flow, **options)
        response = await self._call(self._scheduler.ScheduleFlow, request)
        return response.flow_id

    async def schedule_many(self, flows: Sequence[Any]) -> list[str]:
        """Schedule many flows, up to 1,000 (and a few MiB) per call; their ids, in order."""
        ids: list[str] = []
        # Large inputs take several calls instead of one that gRPC refuses.
        budget = self.batch_bytes
        batch: list[scheduler_pb2.ScheduleFlowRequest] = []
        size = 0
        for flow in flows:
            request = self.schedule_request(flow)
            length = request.ByteSize()
            if batch and (len(batch) == _SCHEDULE_BATCH_FLOWS or size + length > budget):
                ids += await self._schedule_batch(batch)
                batch, size = [], 0
            batch.append(request)
            size += length
        if batch:
            ids += await self._schedule_batch(batch)
        return ids

    async def _schedule_batch(self, requests: list[scheduler_pb2.ScheduleFlowRequest]) -> list[str]:
        batch = scheduler_pb2.ScheduleFlowsRequest(requests=requests)
        response = await self._call(self._scheduler.ScheduleFlows, batch)
        ids = []
        for result in response.results:
            if result.code:
                raise FlowAlreadyScheduledError(
                    grpc.StatusCode.ALREADY_EXISTS, result.reason, result.message
                )
            ids.append(result.flow_id)
        return ids

    def outcome(self, info: common_pb2.FlowInfo, hint: Any = None) -> FlowOutcome:
        """A `FlowOutcome` from the wire form of a flow."""
        status = FlowStatus(info.status)
        error = None
        if info.HasField("error"):
            error = FlowError(
                info.error.type, info.error.message, info.error.reason, info.error.stack_trace
            )
        result = None
        if info.HasField("result"):
            result = self.converter.from_payload(info.result, hint)
        return FlowOutcome(
            flow_id=info.flow_id,
            flow_type=info.flow_type,
            status=status,
            result=result,
            error=error,
            attempt=info.attempt,
            labels=dict(info.labels),
            created_at=info.created_at.ToDatetime(datetime.UTC),
            completed_at=(
                info.completed_at.ToDatetime(datetime.UTC)
                if info.HasField("completed_at")
                else None
            ),
        )

    async def get(self, flow_id: str) -> FlowOutcome:
        """The flow's current state."""
        request = scheduler_pb2.GetFlowRequest(flow_id=flow_id)
        response = await self._call(self._scheduler.GetFlow, request)
        return self.outcome(response.flow)

    async def wait(self, flow_id: str, timeout: float | None = None) -> FlowOutcome:  # noqa: ASYNC109 - pyergon's API
        """Wait for the flow to end and return its outcome.

        Raises:
            TimeoutError: the flow had not ended after `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        return await self._wait_until(flow_id, deadline, timeout)

    async def _wait_until(
        self, flow_id: str, deadline: float | None, asked: float | None
    ) -> FlowOutcome:
        loop = asyncio.get_running_loop()
        while True:
            request = scheduler_pb2.WaitFlowRequest(
                flow_id=flow_id, timeout_ms=_wait_ms(loop, deadline)
            )
            response = await self._call(self._scheduler.WaitFlow, request)
            if response.done:
                return self.outcome(response.flow)
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"flow {flow_id} has not ended after {asked} s")

    async def run(self, flow: Any, timeout: float | None = None, **options: Any) -> FlowOutcome:  # noqa: ASYNC109 - as `wait`
        """Schedule a `@flow_type` instance and wait for its outcome; `schedule`'s options apply.

        One call when the flow ends within the server's longest wait (60 s). A retry after a lost
        connection repeats the request id, so it waits for the same flow rather than scheduling
        another.

        Raises:
            TimeoutError: the flow had not ended after `timeout` seconds.
        """
        return await self._run(self.schedule_request(flow, **options), timeout)

    async def run_type(
        self,
        flow_type: str,
        input_value: Any = None,
        *,
        flow_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - as `run`
    ) -> FlowOutcome:
        """Run a flow by type name with a JSON-able input, as `schedule_type`; see `run`."""
        return await self._run(self._type_request(flow_type, input_value, flow_id), timeout)

    async def _run(
        self,
        schedule: scheduler_pb2.ScheduleFlowRequest,
        timeout: float | None,  # noqa: ASYNC109 - the caller's
    ) -> FlowOutcome:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        request = scheduler_pb2.RunFlowRequest(flow=schedule, timeout_ms=_wait_ms(loop, deadline))
        response = await self._call(self._scheduler.RunFlow, request)
        if response.done:
            return self.outcome(response.flow)
        return await self._wait_until(response.flow.flow_id, deadline, timeout)

    async def list_flows(
        self,
        *,
        status: FlowStatus | Sequence[FlowStatus] | None = None,
        flow_type: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[FlowOutcome]:
        """Every flow matching the filters, fetched page by page."""
        token = ""
        while True:
            page = await self.list_flows_page(
                status=status, flow_type=flow_type, page_size=page_size, page_token=token
            )
            for outcome in page.flows:
                yield outcome
            token = page.next_page_token
            if not token:
                return

    async def list_flows_page(
        self,
        *,
        status: FlowStatus | Sequence[FlowStatus] | None = None,
        flow_type: str | None = None,
        page_size: int = 100,
        page_token: str = "",
    ) -> FlowPage:
        """One page of the flows matching the filters, oldest first, from `page_token` on."""
        statuses = [] if status is None else [status] if isinstance(status, FlowStatus) else status
        request = scheduler_pb2.ListFlowsRequest(
            statuses=[s.value for s in statuses],
            flow_type=flow_type or "",
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(self._scheduler.ListFlows, request)
        return FlowPage([self.outcome(info) for info in response.flows], response.next_page_token)

    async def history(self, flow_id: str) -> list[JournalEntry]:
        """The flow's whole journal, in recording order."""
        entries: list[JournalEntry] = []
        token = ""
        while True:
            request = scheduler_pb2.GetFlowHistoryRequest(
                flow_id=flow_id, page_size=1000, page_token=token
            )
            response = await self._call(self._scheduler.GetFlowHistory, request)
            for entry in response.entries:
                error = None
                if entry.HasField("error"):
                    error = FlowError(entry.error.type, entry.error.message, entry.error.reason)
                entries.append(
                    JournalEntry(
                        sequence=entry.sequence,
                        key=entry.key,
                        kind=common_pb2.EntryKind.Name(entry.kind).removeprefix("ENTRY_KIND_"),
                        status=common_pb2.EntryStatus.Name(entry.status).removeprefix(
                            "ENTRY_STATUS_"
                        ),
                        result=(
                            self.converter.from_payload(entry.result)
                            if entry.HasField("result")
                            else None
                        ),
                        error=error,
                        attempts=entry.attempts,
                        recorded_at=entry.recorded_at.ToDatetime(datetime.UTC),
                        due_at=(
                            entry.due_at.ToDatetime(datetime.UTC)
                            if entry.HasField("due_at")
                            else None
                        ),
                    )
                )
            token = response.next_page_token
            if not token:
                return entries

    async def cancel(self, flow_id: str, reason: str = "") -> FlowOutcome:
        """Cancel a flow that has not ended."""
        request = scheduler_pb2.CancelFlowRequest(flow_id=flow_id, reason=reason)
        response = await self._call(self._scheduler.CancelFlow, request)
        return self.outcome(response.flow)

    async def signal(
        self, flow_id: str, name: str, payload: Any = None, *, request_id: str | None = None
    ) -> int:
        """Deliver a signal to the flow's mailbox `name`; returns its position there."""
        request = signal_pb2.SendSignalRequest(
            flow_id=flow_id,
            name=name,
            payload=self.payload(payload),
            request_id=request_id or uuid.uuid4().hex,
        )
        stub = signal_pb2_grpc.SignalServiceStub(self.channel)
        response = await self._call(stub.SendSignal, request)
        return response.sequence


class Scheduler:
    """Schedules flows (pyergon's `Scheduler`), over a `Client`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def schedule(self, flow: Any, **options: Any) -> str:
        """Schedule a `@flow_type` instance; see `Client.schedule` for the options."""
        return await self._client.schedule(flow, **options)

    async def schedule_many(self, flows: Sequence[Any]) -> list[str]:
        """Schedule many flows in few calls."""
        return await self._client.schedule_many(flows)
