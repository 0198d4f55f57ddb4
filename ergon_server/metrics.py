"""Prometheus metrics: one registry per server, served on `--metrics-listen`.

ergon_flows{status,flow_type}            flows by status (refreshed every few seconds)
ergon_queue_depth{flow_type}             PENDING flows by type
ergon_steps_total{outcome}               step outcomes recorded (completed, failed, retrying)
ergon_step_duration_seconds              how long step attempts ran, as workers report
ergon_flows_finished_total{status}       flows ended (completed, failed, cancelled) or retried
ergon_flows_dispatched_total             assignments made
ergon_dispatch_latency_seconds           from a flow being ready to its assignment
ergon_timers_fired_total                 durable timers fired
ergon_timer_lateness_seconds             how late timers fired (never negative: never early)
ergon_sessions                           connected worker sessions
ergon_session_capacity / _running        summed over sessions
ergon_store_commit_seconds               group-commit duration
ergon_store_commit_writes                writes per group commit
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ergon_server.model import FlowStatus

log = logging.getLogger(__name__)

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.001, 0.01, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600)


class Metrics:
    """The server's metrics; the engine and store feed them, `serve` exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.steps = Counter("ergon_steps", "Step outcomes recorded", ["outcome"], registry=r)
        # Children looked up once: a step is recorded on the hot path.
        self.step_outcomes = {
            outcome: self.steps.labels(outcome) for outcome in ("completed", "failed", "retrying")
        }
        self.step_duration = Histogram(
            "ergon_step_duration_seconds", "How long step attempts ran", buckets=_SLOW, registry=r
        )
        self.flows_finished = Counter(
            "ergon_flows_finished", "Flows ended, or re-queued for a retry", ["status"], registry=r
        )
        self.dispatched = Counter("ergon_flows_dispatched", "Assignments made", registry=r)
        self.dispatch_latency = Histogram(
            "ergon_dispatch_latency_seconds",
            "From a flow being ready to its assignment",
            buckets=_FAST,
            registry=r,
        )
        self.timers_fired = Counter("ergon_timers_fired", "Durable timers fired", registry=r)
        self.timer_lateness = Histogram(
            "ergon_timer_lateness_seconds", "How late timers fired", buckets=_FAST, registry=r
        )
        self.commit_seconds = Histogram(
            "ergon_store_commit_seconds", "Group-commit duration", buckets=_FAST, registry=r
        )
        self.commit_writes = Histogram(
            "ergon_store_commit_writes",
            "Writes per group commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.flow_counts: dict[tuple[FlowStatus, str], int] = {}
        self._sessions: Callable[[], list[tuple[int, int]]] = list

    def observe_commit(self, seconds: float, writes: int) -> None:
        """A store commit happened."""
        self.commit_seconds.observe(seconds)
        self.commit_writes.observe(writes)

    def watch_sessions(self, sessions: Callable[[], list[tuple[int, int]]]) -> None:
        """Where to read (capacity, running) of each live session at scrape time."""
        self._sessions = sessions
        self.registry.register(_Collector(self))

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class _Collector:
    """Gauges read at scrape time (on the event loop: the endpoint is asyncio)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        sessions = self._metrics._sessions()
        yield GaugeMetricFamily("ergon_sessions", "Connected worker sessions", len(sessions))
        yield GaugeMetricFamily(
            "ergon_session_capacity", "Capacity of all sessions", sum(c for c, _ in sessions)
        )
        yield GaugeMetricFamily(
            "ergon_session_running", "Flows held by all sessions", sum(r for _, r in sessions)
        )
        flows = GaugeMetricFamily("ergon_flows", "Flows by status", labels=["status", "flow_type"])
        depth = GaugeMetricFamily("ergon_queue_depth", "PENDING flows", labels=["flow_type"])
        for (status, flow_type), count in sorted(self._metrics.flow_counts.items()):
            flows.add_metric([status.value, flow_type], count)
            if status is FlowStatus.PENDING:
                depth.add_metric([flow_type], count)
        yield flows
        yield depth


async def serve(
    metrics: Metrics,
    host: str,
    port: int,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Server:
    """Serve `GET /metrics` over plain HTTP on the event loop (no threads).

    `refresh` runs before each exposition (to update what is read from the store).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            parts = request.split(b" ", 2)
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                if refresh is not None:
                    await refresh()
                body, status, kind = metrics.exposition(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, kind = b"not found; try /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics on http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])
    return server
