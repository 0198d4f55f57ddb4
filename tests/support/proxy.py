"""A TCP proxy for fault tests: put it between a worker and the server, then break the link.

It listens on 127.0.0.1 only and forwards to one upstream address. Three modes:

- `PASS`: bytes flow both ways.
- `STALL`: connections stay open but nothing is forwarded either way (held bytes are delivered,
  in order, if the mode goes back to `PASS`), like a black-holed route; new connections are
  accepted and stall too.
- `DROP`: every open connection is reset at once and new ones are reset on accept, like a
  peer that vanished.

The proxy runs its own event loop in a daemon thread, so it keeps forwarding while the test
blocks (`WorkerProcess.wait_ready` sleeps) and works from sync and async tests alike:

    with TcpProxy(server.address) as proxy:
        worker = WorkerProcess(proxy.address, ...)
        proxy.set_mode(Mode.STALL)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
CHUNK = 64 * 1024


class Mode(enum.Enum):
    """What the proxy does with the traffic."""

    PASS = "pass"
    STALL = "stall"
    DROP = "drop"


class TcpProxy:
    """A one-upstream TCP proxy on 127.0.0.1 whose link the test can stall or drop."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the test proxy forwards to 127.0.0.1 only, not {upstream}")
        self.upstream_port = int(port)
        self.port = 0
        self.mode = Mode.PASS
        self.accepted = 0
        self.resets = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- control, from any thread

    def start(self) -> TcpProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._open())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="test-tcp-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test proxy did not start")
        return self

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; returns once open connections are reset (DROP) or released (PASS)."""
        self._call(self._apply(mode))

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._loop = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None, "the proxy is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ---- on the proxy's loop

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: Mode) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode is Mode.PASS:
            self._flowing.set()
            return
        self._flowing.clear()
        if mode is Mode.DROP:
            for link in list(self._links):
                self._reset(link)

    def _reset(self, link: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._links.discard(link)
        self.resets += 1
        for writer in link:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is Mode.DROP:
            self.resets += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        if self.mode is Mode.DROP:  # dropped while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, link))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await source.read(CHUNK)
                if not data:
                    break
                # Stalled: hold the bytes (and stop reading, so TCP backs up) until PASS.
                await self._flowing.wait()
                if link not in self._links:
                    return
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        if link in self._links:
            # One side closed: close the other politely, as a real path would.
            self._links.discard(link)
            for writer in link:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._reset(link)
        for task in list(self._pumps):
            task.cancel()
        for task in list(self._pumps):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
