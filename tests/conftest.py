"""Fixtures shared by every suite: real servers and workers on ephemeral ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from ergon_worker_sdk import Client
from ergon_worker_sdk.testing import ErgonTestServer
from tests.support.postgres import temporary_database_sync
from tests.support.processes import ServerProcess, WorkerProcess


@pytest.fixture
async def test_server() -> AsyncIterator[ErgonTestServer]:
    """An in-process server on SQLite in a temporary folder."""
    async with ErgonTestServer() as server:
        yield server


@pytest.fixture
async def client(test_server: ErgonTestServer) -> AsyncIterator[Client]:
    async with test_server.client() as client:
        yield client


@pytest.fixture
def events(tmp_path: Path) -> Path:
    """The file worker processes append their step executions to."""
    return tmp_path / "events.log"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store for server processes: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ergon.db'}"
    else:
        with temporary_database_sync("ergon_e2e") as dsn:
            yield dsn


# Short leases, so crash tests move work quickly.
FAST_LEASES = ("--lease-ttl", "4", "--heartbeat-interval", "1")


@pytest.fixture
def server_process(store_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `ergon-server` process on every store."""
    server = ServerProcess(store_url, tmp_path, *FAST_LEASES)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def start_worker(
    server_process: ServerProcess, events: Path, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes against `server_process`; all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(worker_id: str, **options: object) -> WorkerProcess:
        worker = WorkerProcess(server_process.address, worker_id, events, tmp_path, **options)  # type: ignore[arg-type]
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.kill()
