"""The store goes away under load: PostgreSQL restarted, the SQLite file's disk full.

Clients get UNAVAILABLE meanwhile, nothing acknowledged is lost, and the same server process
recovers by itself when the store is back.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ergon_worker_sdk import Client, ServerUnavailableError
from tests.faults.conftest import Processes, skip_or_fail
from tests.faults.load import FaultPoint, MixedLoad, fault_point
from tests.support.postgres import temporary_database_sync
from tests.support.processes import eventually, read_events
from tests.support.worker_app import ThreeSteps

pytestmark = pytest.mark.faults

PG_CTL = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main"]


def _pg(action: str) -> None:
    subprocess.run([*PG_CTL, action], check=True, capture_output=True, timeout=60)


def _pg_online() -> bool:
    status = subprocess.run([*PG_CTL, "status"], capture_output=True, timeout=30)
    return status.returncode == 0


@pytest.fixture
def local_postgres() -> Iterator[None]:
    """The machine's PostgreSQL 15 cluster, which the test may stop: it is always restarted."""
    if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0 or not _pg_online():
        skip_or_fail("needs root and the local PostgreSQL 15 cluster 'main' running")
    try:
        yield
    finally:
        if not _pg_online():
            _pg("start")


def _done(events: Path) -> int:
    return sum(1 for e in read_events(events) if e[0] == "flow-end")


async def _assert_unavailable(address: str) -> None:
    """A client that does not retry for long sees UNAVAILABLE (not INTERNAL, not a hang)."""
    async with Client(address, retry_timeout_s=0.5) as impatient:
        with pytest.raises(ServerUnavailableError):
            await asyncio.wait_for(impatient.schedule_many([ThreeSteps(-1)] * 200), 30)


async def test_postgres_restarted_under_load_the_server_recovers_by_itself(
    local_postgres: None, processes: Processes, events: Path, rng: random.Random
) -> None:
    with temporary_database_sync("ergon_faults") as store_url:
        server = processes.server(store_url)
        for name in ("w1", "w2"):
            processes.worker(server.address, name, capacity=15, step_delay=0.1)
        faults: list[FaultPoint] = []
        async with Client(server.address, retry_timeout_s=60) as client:
            load = MixedLoad(client, rng, signal_delay_s=4.0)
            await load.schedule(150)
            await eventually(lambda: _done(events) >= 20, what="load under way")
            faults.append(await asyncio.to_thread(fault_point, "before stop", store_url, events))
            down_at = time.monotonic()
            await asyncio.to_thread(_pg, "stop")
            try:
                await _assert_unavailable(server.address)
                # Acknowledged later, while the store is still down for a moment: retried.
                late = asyncio.create_task(load.schedule(50))
                await asyncio.sleep(rng.uniform(0.5, 2.0))
            finally:
                await asyncio.to_thread(_pg, "start")
            outage = time.monotonic() - down_at
            await late
            await load.wait_all(within=90, store_url=store_url)
        figures = load.verify(store_url, events, faults)
        assert server.starts == 1 and server.process is not None
        assert server.process.poll() is None, "the server must ride the outage out, not die"
        print(f"postgres outage {outage:.1f}s survived by one server process; {figures}")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs: a disk the test can fill up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full (ENOSPC); returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 4096, 512):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
    finally:
        os.close(fd)
    return filler


async def test_sqlite_disk_full_under_load_clients_get_unavailable_and_nothing_is_lost(
    tiny_disk: Path, processes: Processes, events: Path, rng: random.Random
) -> None:
    store_url = f"sqlite:///{tiny_disk / 'ergon.db'}"
    server = processes.server(store_url)
    for name in ("w1", "w2"):
        processes.worker(server.address, name, capacity=15, step_delay=0.1)
    faults: list[FaultPoint] = []
    async with Client(server.address, retry_timeout_s=60) as client:
        load = MixedLoad(client, rng, signal_delay_s=4.0)
        await load.schedule(150)
        await eventually(lambda: _done(events) >= 20, what="load under way")
        filler = await asyncio.to_thread(_fill, tiny_disk)
        try:
            await _assert_unavailable(server.address)
            late = asyncio.create_task(load.schedule(50))
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            faults.append(await asyncio.to_thread(fault_point, "disk full", store_url, events))
        finally:
            filler.unlink()
        await late
        await load.wait_all(within=90, store_url=store_url)
    figures = load.verify(store_url, events, faults)
    assert server.starts == 1 and server.process is not None and server.process.poll() is None
    assert "unavailable" in server.logs().lower()
    print(f"sqlite disk full survived by one server process; {figures}")
