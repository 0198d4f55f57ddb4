"""Fixtures of the fault tests: processes that are always killed, a seeded random source."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST_LEASES
from tests.support.processes import ServerProcess, WorkerProcess

# Under CI the machine is known to allow every fault (root, a local PostgreSQL cluster,
# tmpfs): a test that cannot break what it must break fails instead of skipping.
REQUIRE_ENV = "ERGON_REQUIRE_FAULTS"


def skip_or_fail(reason: str) -> None:
    """Skip the test for `reason`, or fail it when ERGON_REQUIRE_FAULTS=1."""
    if os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (required here: {REQUIRE_ENV}=1)")
    pytest.skip(f"{reason}; set {REQUIRE_ENV}=1 to fail instead")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Random kill points, reproducible: ERGON_FAULT_SEED=N replays a run (the seed is printed)."""
    seed = int(os.environ.get("ERGON_FAULT_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"{request.node.nodeid}: ERGON_FAULT_SEED={seed}")
    return random.Random(seed)


class Processes:
    """Servers and workers started by a test; `close` SIGKILLs whatever still runs."""

    def __init__(self, workdir: Path, events: Path) -> None:
        self.workdir = workdir
        self.events = events
        self.servers: list[ServerProcess] = []
        self.workers: list[WorkerProcess] = []

    def server(self, store_url: str, *extra: str, name: str = "server") -> ServerProcess:
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        server = ServerProcess(store_url, workdir, *FAST_LEASES, *extra)
        self.servers.append(server)
        server.start()
        return server

    def worker(self, address: str, worker_id: str, **options: object) -> WorkerProcess:
        worker = WorkerProcess(address, worker_id, self.events, self.workdir, **options)  # type: ignore[arg-type]
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        for server in self.servers:
            server.kill()


@pytest.fixture
def processes(tmp_path: Path, events: Path) -> Iterator[Processes]:
    started = Processes(tmp_path, events)
    yield started
    started.close()


StartWorker = Callable[..., WorkerProcess]
