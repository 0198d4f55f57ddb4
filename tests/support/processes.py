"""Real server and worker processes for end-to-end and crash tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"ergon-server ready on (\S+):(\d+)")


class ServerProcess:
    """`python -m ergon_server` in a child process; restartable on the same port and store."""

    def __init__(self, db: str, workdir: Path, *extra_args: str) -> None:
        self.db = db
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ergon_server",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--db",
                self.db,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            match = READY.search(text)
            if match:
                self.port = int(match.group(2))
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait: a graceful shutdown."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def logs(self) -> str:
        return "\n".join(
            (self.workdir / f"server-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
        )


class WorkerProcess:
    """`tests/support/worker_app.py` in a child process."""

    def __init__(
        self,
        address: str,
        worker_id: str,
        events: Path,
        workdir: Path,
        *,
        capacity: int = 10,
        step_delay: float = 0.0,
    ) -> None:
        self.worker_id = worker_id
        self.output = workdir / f"{worker_id}.out"
        self._out: IO[bytes] = self.output.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "support" / "worker_app.py"),
                "--address",
                address,
                "--worker-id",
                worker_id,
                "--events",
                str(events),
                "--capacity",
                str(capacity),
                "--step-delay",
                str(step_delay),
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the worker has registered with the server."""
        deadline = time.monotonic() + timeout
        while "worker started" not in self.output.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker {self.worker_id} did not start:\n{self.output.read_text()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._out.close()

    def stop(self) -> str:
        """SIGTERM: the worker shuts down gracefully and prints its statistics."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._out.close()
        return self.output.read_text(errors="replace")


def read_events(path: Path) -> list[list[str]]:
    """Lines the worker app appended: `kind flow_id key worker_id`."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def step_runs(path: Path) -> Counter[tuple[str, str]]:
    """How many times each (flow_id, step key) finished running its body."""
    return Counter((e[1], e[2]) for e in read_events(path) if e[0] == "step-done")


async def eventually(
    check: Callable[[], Any], within: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll until `check()` is truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s: {what}")
        await asyncio.sleep(interval)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
