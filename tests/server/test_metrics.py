"""Prometheus metrics, scraped over HTTP after a real run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ergon_server.config import ServerConfig
from ergon_server.engine import EngineConfig
from ergon_server.server import ErgonServer
from ergon_worker_sdk import Client, Worker, flow, flow_type, schedule_timer, step


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
        assert value(body, "ergon_flows_dispatched_total") >= 40  # before and after the timer
        assert value(body, "ergon_timers_fired_total") == 20
        assert value(body, "ergon_step_duration_seconds_count") == 20
        assert value(body, "ergon_step_duration_seconds_sum") >= 20 * 0.01
        assert value(body, "ergon_dispatch_latency_seconds_count") >= 40
        assert value(body, "ergon_timer_lateness_seconds_count") == 20
        assert value(body, "ergon_store_commit_seconds_count") > 0
        assert value(body, "ergon_sessions") == 1
        assert value(body, "ergon_session_capacity") == 7
        assert value(body, 'ergon_flows{flow_type="Metered",status="COMPLETED"}') == 20
        head, _ = await scrape(server.metrics_port, "/nope")
        assert head.startswith("HTTP/1.1 404")
        await handle.shutdown()
