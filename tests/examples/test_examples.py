"""Every example runs, as the README tells people to run it, against a real server process."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.support.processes import ROOT, ServerProcess


async def run_example(script: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = out.decode()
    assert process.returncode == 0, text
    return text


async def test_quickstart(server_process: ServerProcess) -> None:
    out = await run_example("quickstart.py", "--address", server_process.address)
    assert "COMPLETED, result 'payment-ORD-001'" in out
    assert "validate#1: COMPLETED -> True" in out


async def test_complex_multi_worker_load(server_process: ServerProcess, tmp_path: Path) -> None:
    out = await run_example(
        "complex_multi_worker_load.py",
        "--address",
        server_process.address,
        "--workers",
        "3",
        "--flows",
        "300",
    )
    assert "300 flows on 3 workers" in out and "each completed once: True" in out
    for worker in ("worker-1", "worker-2", "worker-3"):
        assert f"{worker}:" in out


async def test_make_demo_runs_the_quick_start_on_a_throwaway_server() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        "make",
        "--no-print-directory",
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "ERGON_DEMO_PORT": str(port)},
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = out.decode()
    assert process.returncode == 0, text
    assert "COMPLETED, result 'payment-ORD-001'" in text


async def test_simple_timer(server_process: ServerProcess) -> None:
    out = await run_example("simple_timer.py", "--address", server_process.address)
    assert out.count("fraud check complete") == 3
    assert out.count("COMPLETED 'completed'") == 3


async def test_dag_parallel(server_process: ServerProcess) -> None:
    out = await run_example("dag_parallel.py", "--address", server_process.address)
    assert "COMPLETED: invoice for Ada: $39.00" in out


async def test_child_flows(server_process: ServerProcess) -> None:
    out = await run_example("child_flows.py", "--address", server_process.address)
    assert "COMPLETED: charged 30.00 on 11-1; charged 30.00 on 22-2; charged 30.00 on 33-3" in out
    assert "COMPLETED: payment failed: card 0000-9 declined" in out


async def test_approval_signal_sent_with_grpcurl(server_process: ServerProcess) -> None:
    from tests.server.test_grpcurl import grpcurl

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "approval_signal.py"),
        "--address",
        server_process.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    assert process.stdout is not None
    command = ""
    while "grpcurl" not in command:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line, "the example ended before printing the grpcurl command"
        command = line
    payload = command.split("-d '", 1)[1].split("'", 1)[0]
    await grpcurl(
        "-plaintext", "-d", payload, server_process.address, "ergon.v1.SignalService/SendSignal"
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    assert "COMPLETED: EXP-1 paid, approved by ann" in out.decode()
