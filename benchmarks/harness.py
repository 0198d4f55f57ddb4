"""Workloads against real server and worker processes, with the machine's facts recorded."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import re
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ergon_worker_sdk import Client, FlowStatus

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"ergon-server ready on \S+:(\d+)")
ADMIN_DSN = os.environ.get(
    "ERGON_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def progress(message: str) -> None:
    """Show progress on stderr, so stdout keeps only the results."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at `fraction` (0..1) of the sorted values (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Server:
    """One `ergon-server` process."""

    db: str
    workdir: Path
    extra: list[str] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = self.workdir / f"server-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ergon_server",
                "--listen",
                "127.0.0.1:0",
                "--db",
                self.db,
                *self.extra,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = READY.search(log.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return
            if self.process.returncode is not None:
                raise RuntimeError(f"server failed:\n{log.read_text()}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{log.read_text()}")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@dataclass
class WorkerProcess:
    """`benchmarks/worker.py`, reporting completions."""

    addresses: list[str]
    capacity: int
    process: asyncio.subprocess.Process | None = None
    done: int = 0
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "benchmarks" / "worker.py"),
            "--address",
            ",".join(self.addresses),
            "--capacity",
            str(self.capacity),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"worker did not start: {line!r}")
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            if line.startswith(b"done "):
                self.done = int(line.split()[1])
                self._changed.set()

    async def wait_done(self, count: int, label: str, within: float = 900) -> None:
        deadline = time.monotonic() + within
        last_report = 0.0
        while self.done < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: only {self.done}/{count} flows completed")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._changed.wait()
            if time.monotonic() - last_report > 2:
                progress(f"{label}: {self.done:,}/{count:,} flows done")
                last_report = time.monotonic()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[tuple[str, str]]:
    """A fresh PostgreSQL database for one run; yields (dsn, server version)."""
    import asyncpg  # the benchmark's PostgreSQL mode needs the server's own driver

    name = f"ergon_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        version = await admin.fetchval("SHOW server_version")
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}", str(version)
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass
class Deployment:
    """Servers (replicas) on one store, and one worker process."""

    store: str = "sqlite"
    replicas: int = 1
    capacity: int = 200
    synchronous: str = "FULL"
    facts: dict[str, Any] = field(default_factory=dict)
    servers: list[Server] = field(default_factory=list)
    worker: WorkerProcess | None = None

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]


@contextlib.asynccontextmanager
async def deploy(
    store: str = "sqlite", replicas: int = 1, capacity: int = 200, synchronous: str = "FULL"
) -> AsyncIterator[Deployment]:
    """Start servers on a fresh store (SQLite file, PostgreSQL database, memory); stop after."""
    deployment = Deployment(store, replicas, capacity, synchronous)
    with tempfile.TemporaryDirectory(prefix="ergon-bench-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            if store == "postgres":
                dsn, version = await stack.enter_async_context(postgres_database())
                deployment.facts["postgres"] = version
                db = dsn
            else:
                if replicas != 1:
                    raise ValueError(f"{store} is served by one server; replicas need PostgreSQL")
                db = "memory://" if store == "memory" else f"sqlite:///{workdir / 'bench.db'}"
            extra = ["--allow-unregistered-flow-types", "--sqlite-synchronous", synchronous]
            for _ in range(replicas):
                server = Server(db, workdir, extra)
                await server.start()
                deployment.servers.append(server)
                stack.push_async_callback(server.stop)
            yield deployment
            if deployment.worker is not None:
                await deployment.worker.stop()


def machine_facts() -> dict[str, Any]:
    """What the figures depend on."""
    return {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        # Which of gRPC's I/O layers this process and its children used (ergon_server/grpc_io).
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
        "grpcio": importlib.metadata.version("grpcio"),
    }


async def start_worker(deployment: Deployment) -> WorkerProcess:
    worker = WorkerProcess(deployment.addresses, deployment.capacity)
    await worker.start()
    deployment.worker = worker
    return worker


async def schedule_all(client: Client, flows: Sequence[Any], label: str) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(flows), 1000):
        ids += await client.schedule_many(flows[start : start + 1000])
        if len(flows) > 10_000 and start % 10_000 == 0:
            progress(f"{label}: scheduled {start + 1000:,}/{len(flows):,}")
    return ids


async def completion_latencies(client: Client, flow_type: str) -> list[float]:
    """Schedule-to-complete of every completed flow of a type, in ms (server clock)."""
    values = []
    async for flow in client.list_flows(
        status=FlowStatus.COMPLETED, flow_type=flow_type, page_size=1000
    ):
        assert flow.created_at is not None and flow.completed_at is not None
        values.append((flow.completed_at - flow.created_at).total_seconds() * 1000)
    return values
