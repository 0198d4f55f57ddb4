"""Prometheus metrics, scraped over HTTP after a real run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc

from ergon_server.config import ServerConfig
from ergon_server.engine import EngineConfig
from ergon_server.server import ErgonServer
from ergon_worker_sdk import Client, Worker, flow, flow_type, schedule_timer, step
from ergon_worker_sdk.proto.ergon.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)


@dataclass
@flow_type(type_id="Metered")
class Metered:
    n: int

    @step
    async def work(self) -> int:
        await asyncio.sleep(0.01)
        return self.n

    @flow
    async def run(self) -> int:
        value = await self.work()
        await schedule_timer(0.05)
        return value


async def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return head, body


def value(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics:\n{body}")


async def test_metrics_after_a_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = ServerConfig(
        listen="127.0.0.1:0",
        db=f"sqlite:///{tmp_path / 'm.db'}",
        metrics_listen="127.0.0.1:0",
        engine=EngineConfig(allow_unregistered_flow_types=True),
    )
    async with ErgonServer(config) as server, Client(server.address) as client:
        worker = Worker(client, "metered", max_concurrency=7)
        await worker.register(Metered)
        handle = await worker.start()
        ids = await client.schedule_many([Metered(n) for n in range(20)])
        await asyncio.gather(*(client.wait(f, timeout=20) for f in ids))
        head, body = await scrape(server.metrics_port)
        assert head.startswith("HTTP/1.1 200") and "text/plain" in head
        assert value(body, 'ergon_steps_total{outcome="completed"}') == 20
        assert value(body, 'ergon_flows_finished_total{status="completed"}') == 20
        # Before the timer, and again after it unless the timer had fired by the time the
        # flow would suspend (a loaded machine): the worker then carries on in memory.
        dispatched = value(body, "ergon_flows_dispatched_total")
        assert 20 <= dispatched <= 40
        assert value(body, "ergon_timers_fired_total") == 20
        assert value(body, "ergon_step_duration_seconds_count") == 20
        assert value(body, "ergon_step_duration_seconds_sum") >= 20 * 0.01
        assert value(body, "ergon_dispatch_latency_seconds_count") == dispatched
        assert value(body, "ergon_timer_lateness_seconds_count") == 20
        assert value(body, "ergon_store_commit_seconds_count") > 0
        assert value(body, "ergon_sessions") == 1
        assert value(body, "ergon_session_capacity") == 7
        assert value(body, 'ergon_flows{flow_type="Metered",status="COMPLETED"}') == 20
        head, _ = await scrape(server.metrics_port, "/nope")
        assert head.startswith("HTTP/1.1 404")
        await handle.shutdown()


async def test_steps_under_a_millisecond_count_in_the_step_durations(tmp_path: Path) -> None:
    """A step attempt the worker reports as 0 ms long is a duration like any other."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        db=f"sqlite:///{tmp_path / 'm.db'}",
        metrics_listen="127.0.0.1:0",
        engine=EngineConfig(allow_unregistered_flow_types=True),
    )
    async with ErgonServer(config) as server, grpc.aio.insecure_channel(server.address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        data = common_pb2.Payload(encoding="json/plain", data=b"{}")
        await scheduler.ScheduleFlow(
            scheduler_pb2.ScheduleFlowRequest(flow_id="f1", flow_type="Fast", input=data)
        )
        polled = await worker.PollTask(
            worker_pb2.PollTaskRequest(
                worker_id="w", flow_types=["Fast"], timeout_ms=5_000, protocol_version=1
            )
        )
        assignment = polled.assignment
        retrying = common_pb2.Failure(type="Flaky", message="again")
        for key, duration_ms, outcome in [
            ("a", 0, {"result": data}),
            ("b", 0, {"retrying": retrying}),
            ("b", 0, {"result": data}),
            ("c", 3, {"result": data}),
        ]:
            result = worker_pb2.StepResult(
                flow_id=assignment.flow_id,
                lease_token=assignment.lease_token,
                key=key,
                attempts=1,
                duration_ms=duration_ms,
                **outcome,
            )
            await worker.RecordStep(worker_pb2.RecordStepRequest(step=result))
        _, body = await scrape(server.metrics_port)
        assert value(body, 'ergon_steps_total{outcome="completed"}') == 3
        assert value(body, 'ergon_steps_total{outcome="retrying"}') == 1
        assert value(body, "ergon_step_duration_seconds_count") == 4
        assert value(body, 'ergon_step_duration_seconds_bucket{le="0.001"}') == 3
        assert value(body, "ergon_step_duration_seconds_sum") == 0.003
