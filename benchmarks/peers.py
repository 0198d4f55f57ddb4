"""Peers run on the same workload in the same run, when installed: the ratio is what counts.

pyergon (the design Ergon descends from) pins dependencies Ergon's environment cannot hold, so
it lives in its own virtual environment, `benchmarks/.peers/pyergon/` (made by `python -m
benchmarks install-peers`), and runs `benchmarks/peer_pyergon.py` there, in a subprocess.
`ERGON_BENCH_PYERGON_PYTHON` may name another python that has pyergon installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / ".peers"
PYERGON_VERSION = "0.8.1"
PYERGON_VENV = PEERS_DIR / "pyergon"
PYERGON_SCRIPT = HERE / "peer_pyergon.py"
PEER_TIMEOUT = 900.0  # seconds, as the harness waits for Ergon's flows


@dataclass(frozen=True)
class Peer:
    """A system to compare with: `run(workload, flows)` returns a result row."""

    name: str
    run: Callable[[str, int], Awaitable[dict[str, Any]]]


def note(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def pyergon_python() -> Path | None:
    """The python that has pyergon: `ERGON_BENCH_PYERGON_PYTHON`, else the peer venv's."""
    named = os.environ.get("ERGON_BENCH_PYERGON_PYTHON")
    if named:
        return Path(named) if Path(named).exists() else None
    python = PYERGON_VENV / "bin" / "python"
    return python if python.exists() else None


def script_runner(name: str, python: Path, script: Path) -> Peer:
    """A peer whose workloads are `python script WORKLOAD --flows N --db PATH`, one JSON row."""

    async def run(workload: str, flows: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"{name}-bench-") as tmp:
            process = await asyncio.create_subprocess_exec(
                str(python),
                str(script),
                workload,
                "--flows",
                str(flows),
                "--db",
                str(Path(tmp) / "bench.db"),
                stdout=asyncio.subprocess.PIPE,
                cwd=tmp,
            )  # its progress goes straight to our stderr
            try:
                out, _ = await asyncio.wait_for(process.communicate(), PEER_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
                error = f"no result within {PEER_TIMEOUT:.0f} s"
            else:
                lines = out.decode(errors="replace").strip().splitlines()
                if process.returncode == 0 and lines:
                    row: dict[str, Any] = json.loads(lines[-1])
                    return {"workload": workload, **row}
                error = f"exit code {process.returncode} (its stderr is above)"
        # A peer failing should not cost the run Ergon's figures: report it in its row.
        note(f"peer {name} failed on {workload}: {error}")
        return {"workload": workload, "system": name, "error": error}

    return Peer(name, run)


def pyergon() -> Peer | None:
    python = pyergon_python()
    return None if python is None else script_runner("pyergon", python, PYERGON_SCRIPT)


KNOWN: dict[str, Callable[[], Peer | None]] = {"pyergon": pyergon}


def available(wanted: list[str]) -> list[Peer]:
    """The peers asked for (all known ones if none named) that are installed."""
    peers = []
    for name in dict.fromkeys(wanted or KNOWN):  # once each, in the order asked
        find = KNOWN.get(name)
        if find is None:
            note(f"unknown peer {name!r} (known: {', '.join(KNOWN)}): skipped")
            continue
        peer = find()
        if peer is not None:
            peers.append(peer)
        elif wanted:
            named = os.environ.get("ERGON_BENCH_PYERGON_PYTHON")
            where = (
                f"ERGON_BENCH_PYERGON_PYTHON={named} does not exist"
                if named
                else f"{PYERGON_VENV.relative_to(HERE.parent)} does not exist"
            )
            note(
                f"peer {name} is not installed ({where}): run `uv run python -m benchmarks "
                "install-peers` to install it; skipping it"
            )
        else:
            note(f"peer {name} not installed (python -m benchmarks install-peers): skipped")
    return peers


def install() -> int:
    """Make the peers' virtual environments: `benchmarks/.peers/pyergon/` with uv."""
    uv = shutil.which("uv")
    if uv is None:
        print("install-peers needs uv (https://docs.astral.sh/uv/) on PATH", file=sys.stderr)
        return 1
    python = PYERGON_VENV / "bin" / "python"
    # The same interpreter as Ergon's runs, so the peer's figures share the machine's facts.
    steps = [] if python.exists() else [[uv, "venv", "--python", sys.executable, PYERGON_VENV]]
    steps.append([uv, "pip", "install", "--python", python, f"pyergon=={PYERGON_VERSION}"])
    steps.append(
        [python, "-c", 'import pyergon, importlib.metadata as m; print(m.version("pyergon"))']
    )
    if python.exists():
        print(f"{PYERGON_VENV} exists: installing into it")
    for command in steps:
        print("$ " + shlex.join(str(part) for part in command), flush=True)
        # Not Ergon's environment: `uv run` points VIRTUAL_ENV at it, uv must not follow it.
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        result = subprocess.run([str(part) for part in command], env=env, check=False)
        if result.returncode != 0:
            print(f"install-peers failed (exit code {result.returncode})", file=sys.stderr)
            return result.returncode
    print(f"pyergon {PYERGON_VERSION} installed: {python}")
    return 0
