"""Polyglot, proved: a Node.js client and worker (@grpc/grpc-js reading protos/) with Python."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ergon_worker_sdk import Client, FlowStatus
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.processes import ROOT

NODE_DIR = ROOT / "examples" / "node"


async def run(*command: str, cwd: Path, within: float = 180) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), within)
    text = out.decode()
    assert process.returncode == 0, text
    return text


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("Node.js and npm are needed for the polyglot example")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        asyncio.run(
            run("npm", "install", "--no-package-lock", "--no-audit", "--no-fund", cwd=NODE_DIR)
        )
    return NODE_DIR / "node_modules"


@pytest.fixture
async def python_side() -> AsyncIterator[tuple[ErgonTestServer, Client]]:
    async with ErgonTestServer() as server, server.client() as client:
        # The Python worker the README tells people to start beside the demo.
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            str(NODE_DIR / "py_worker.py"),
            "--address",
            server.address,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert worker.stdout is not None
        try:
            async with asyncio.timeout(60):
                line = await worker.stdout.readline()
            assert line.strip() == b"python worker ready", line
            yield server, client
        finally:
            worker.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await worker.wait()
        assert code == 0


async def test_node_schedules_and_signals_a_python_flow_and_runs_its_own(
    node_modules: Path, python_side: tuple[ErgonTestServer, Client]
) -> None:
    server, _ = python_side
    out = await run("node", "demo.js", server.address, cwd=NODE_DIR)
    assert "signal approved #1 sent" in out
    assert 'FLOW_STATUS_COMPLETED: "lamp approved by node (run in Python)"' in out
    assert '"greeting":"Hello, Ergon!","shouted":"HELLO, ERGON!","language":"javascript"' in out


async def test_a_python_client_schedules_a_flow_type_run_by_a_node_worker(
    node_modules: Path, python_side: tuple[ErgonTestServer, Client]
) -> None:
    server, client = python_side
    process = await asyncio.create_subprocess_exec(
        "node", "worker.js", server.address, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"node worker ready" in line
        flow_id = await client.schedule_type("NodeGreeter", {"name": "Python"})
        outcome = await client.wait(flow_id, timeout=20)
        history = await client.history(flow_id)
    finally:
        process.terminate()
        await process.wait()
    assert outcome.status is FlowStatus.COMPLETED
    assert outcome.result == {
        "greeting": "Hello, Python!",
        "shouted": "HELLO, PYTHON!",
        "language": "javascript",
    }
    assert [(e.key, e.result) for e in history] == [
        ("greet#1", "Hello, Python!"),
        ("shout#1", "HELLO, PYTHON!"),
    ]
