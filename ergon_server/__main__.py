"""`ergon-server` / `python -m ergon_server`: run the server until SIGINT or SIGTERM."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ergon_server.grpc_io import prefer_iomgr


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ergon-server` console script."""
    # gRPC reads GRPC_EXPERIMENTS once, when first imported: so before the rest of the server.
    prefer_iomgr(os.environ)
    from ergon_server.cli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
