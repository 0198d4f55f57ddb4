"""The server's command line: parse the flags, run until SIGINT or SIGTERM (see `__main__`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence

from ergon_server import logs
from ergon_server.config import ServerConfig, parse_args
from ergon_server.errors import ErgonError
from ergon_server.server import ErgonServer

log = logging.getLogger("ergon_server")


async def serve(config: ServerConfig) -> None:
    """Run a server until a termination signal, then shut it down gracefully."""
    server = ErgonServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.shutdown()


def run(argv: Sequence[str] | None = None) -> int:
    """Run the server the flags describe; the process's exit status."""
    config = parse_args(argv)
    logs.configure(config.log_level, config.log_format)
    log.info("gRPC experiments: %s", os.environ.get("GRPC_EXPERIMENTS") or "gRPC's defaults")
    try:
        asyncio.run(serve(config))
    except (ErgonError, OSError) as error:
        log.error("ergon-server cannot run: %s", error)
        return 1
    return 0
