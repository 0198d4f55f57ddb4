"""`ergon-server` / `python -m ergon_server`: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ergon-server` console script."""
    config = parse_args(argv)
    logs.configure(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except (ErgonError, OSError) as error:
        log.error("ergon-server cannot run: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
