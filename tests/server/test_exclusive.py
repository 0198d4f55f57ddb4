"""One server per port, and one server per SQLite file: a second one refuses to start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def _second(servers: list[ServerProcess], server: ServerProcess) -> str:
    """Start `server`, which must exit at once with status 1; its log."""
    servers.append(server)
    with pytest.raises(RuntimeError, match="server exited early"):
        server.start()
    assert server.process is not None and server.process.wait(10) == 1
    return server.logs()


def test_a_second_server_on_a_port_in_use_refuses_to_start(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    first = ServerProcess("memory://", tmp_path)
    servers.append(first)
    first.start()
    (tmp_path / "second").mkdir()
    second = ServerProcess("memory://", tmp_path / "second")
    second.port = first.port
    log = _second(servers, second)
    assert (
        f"cannot listen on 127.0.0.1:{first.port}: the port is in use by another process" in log
    ), log
    assert first.process is not None and first.process.poll() is None


def test_a_second_server_on_an_sqlite_file_in_use_refuses_to_start(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    database = tmp_path / "ergon.db"
    first = ServerProcess(f"sqlite:///{database}", tmp_path)
    servers.append(first)
    first.start()
    (tmp_path / "second").mkdir()
    log = _second(servers, ServerProcess(f"sqlite:///{database}", tmp_path / "second"))
    assert first.process is not None
    assert (
        f"ergon-server cannot run: sqlite store unavailable: {database.resolve()} is in use by "
        f"another ergon-server (pid {first.process.pid})"
    ) in log, log
    assert first.process.poll() is None
    # Once the first has stopped, the file is free.
    assert first.stop() == 0
    third = ServerProcess(f"sqlite:///{database}", tmp_path / "second")
    servers.append(third)
    third.start()
