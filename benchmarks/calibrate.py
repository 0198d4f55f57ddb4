"""How fast the machine is at the moment of a run: the floors its figures stand on.

This project's machine is a shared VM whose speed drifts by up to 3x between sessions and
by 30% within minutes, so a figure alone says little. Each run records, before and after its
workloads:

- `commit_ms`: one SQLite commit of one row, WAL, `synchronous=FULL`, in the directory the
  run's database lives in (an fsync, mostly); a flow on SQLite waits for four in a row.
- `grpc_stream_rtt_ms`, `grpc_unary_rtt_ms`: a message's round trip to an echo server in
  another process, on a stream and as a unary call, on the run's gRPC I/O layer; a flow is one
  unary call and six stream messages in a row.
- `python_us`: a fixed piece of pure Python (JSON out and back of a small dict), for the
  speed of one core.

Each is the median of a few hundred tries and takes well under a second.

`python -m benchmarks.calibrate` is the echo server: it prints `echo ready on PORT` and
serves until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_SERVICE = "ergon.bench.Echo"
_TRIES = 300
_PAYLOAD = b"x" * 130  # about a step result's message


def _same(data: bytes) -> bytes:
    return data


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def commit_ms(directory: Path, tries: int = _TRIES) -> float:
    """Median one-row commit, WAL and `synchronous=FULL`, in `directory`."""
    path = directory / "calibrate.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        samples = []
        for n in range(tries):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (_PAYLOAD,))
            started = time.perf_counter()
            conn.execute("COMMIT")
            if n >= 10:
                samples.append(time.perf_counter() - started)
        return _median_ms(samples)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def python_us(tries: int = 2000) -> float:
    """Median microseconds of a small JSON round trip: one core's speed, in pure Python."""
    value = {"flow_id": "f-1", "key": "step:2", "result": [1, 2.5, "three"], "ok": True}
    samples = []
    for _ in range(tries):
        started = time.perf_counter()
        for _ in range(10):
            json.loads(json.dumps(value))
        samples.append((time.perf_counter() - started) / 10)
    return round(statistics.median(samples) * 1e6, 2)


async def grpc_rtt_ms(tries: int = _TRIES) -> dict[str, float]:
    """Median round trips to an echo server in another process: stream and unary."""
    import grpc

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.calibrate",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        if not line.startswith("echo ready on "):
            raise RuntimeError(f"the echo server did not start: {line!r}")
        port = int(line.split()[-1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary(f"/{_SERVICE}/Unary", _same, _same)
            streamed = channel.stream_stream(f"/{_SERVICE}/Stream", _same, _same)
            unary_samples = []
            for n in range(tries):
                started = time.perf_counter()
                await unary(_PAYLOAD)
                if n >= 10:
                    unary_samples.append(time.perf_counter() - started)
            call = streamed()
            stream_samples = []
            for n in range(tries):
                started = time.perf_counter()
                await call.write(_PAYLOAD)
                await call.read()
                if n >= 10:
                    stream_samples.append(time.perf_counter() - started)
            await call.done_writing()
        return {
            "grpc_stream_rtt_ms": _median_ms(stream_samples),
            "grpc_unary_rtt_ms": _median_ms(unary_samples),
        }
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def calibrate(directory: Path) -> dict[str, float]:
    """The machine's floors right now (see the module's docstring)."""
    figures: dict[str, float] = {"commit_ms": await asyncio.to_thread(commit_ms, directory)}
    figures.update(await grpc_rtt_ms())
    figures["python_us"] = python_us()
    return figures


def describe(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One line for the table's reader: each floor before / after the run."""
    names = {
        "commit_ms": "SQLite FULL commit {} ms",
        "grpc_stream_rtt_ms": "gRPC round trip {} ms on a stream",
        "grpc_unary_rtt_ms": "{} ms unary",
        "python_us": "Python probe {} us",
    }
    parts = [
        text.format(f"{before.get(key, '?')} / {after.get(key, '?')}")
        for key, text in names.items()
    ]
    return "machine before / after the run: " + ", ".join(parts)


async def _serve() -> None:
    import grpc

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
            "Stream": grpc.stream_stream_rpc_method_handler(stream, _same, _same),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo ready on {port}", flush=True)
    # Until the harness closes our stdin (or dies, which closes it too).
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(grace=None)


if __name__ == "__main__":
    # On the harness's gRPC I/O layer: GRPC_EXPERIMENTS comes with its environment.
    asyncio.run(_serve())
