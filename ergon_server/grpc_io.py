"""Which of gRPC's socket layers the server's process uses; set before grpc is imported.

grpcio 1.80 made its EventEngine the default for Python. Each message read or written on it
crosses one more thread than on the older poller (iomgr), which grpcio still ships and used
by default until 1.79: on this project's 2-core benchmark machine a stream round trip between
two processes took 0.29 ms on the EventEngine and 0.16 ms on iomgr, and a whole 3-step flow
about 0.6 ms less (README, "Running workers"). gRPC reads the choice once, from
`GRPC_EXPERIMENTS`, when it is first imported; so the entry point calls `prefer_iomgr` before
anything imports it.

This module imports nothing that imports grpc.
"""

from __future__ import annotations

from collections.abc import MutableMapping

# Both the server's accepted connections (listener) and any channel it opens (client).
IOMGR_EXPERIMENTS = "-event_engine_listener,-event_engine_client"


def prefer_iomgr(environ: MutableMapping[str, str]) -> bool:
    """Ask gRPC for iomgr unless the operator chose (GRPC_EXPERIMENTS set); True if asked.

    Has no effect once grpc is imported, and none on a grpcio that no longer has the
    experiments (it logs that it does not know them, and uses its default).
    """
    if "GRPC_EXPERIMENTS" in environ:
        return False
    environ["GRPC_EXPERIMENTS"] = IOMGR_EXPERIMENTS
    return True
