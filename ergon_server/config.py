"""Server configuration from flags and `ERGON_*` environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ergon_server.engine.config import EngineConfig

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "sqlite:///ergon.db"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `ergon-server` needs to run.

    Attributes:
        listen: host:port to bind (port 0 picks a free one).
        db: the store URL: `sqlite:///path.db` (default, relative to the working directory),
            `sqlite:////absolute/path.db`, or `memory://` (nothing kept; for tests).
        sqlite_synchronous: SQLite's `synchronous` pragma: FULL (default, durable on power
            loss) or NORMAL (durable across process crashes only).
        max_message_bytes: the largest gRPC message accepted or sent.
        shutdown_grace_s: how long in-flight calls get to finish on shutdown.
        engine: the engine's tunables.
    """

    listen: str = DEFAULT_LISTEN
    db: str = DEFAULT_DB
    sqlite_synchronous: str = "FULL"
    max_message_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 5.0
    log_level: str = "INFO"
    engine: EngineConfig = field(default_factory=EngineConfig)


def _env(environ: Mapping[str, str], name: str, default: str) -> str:
    return environ.get(f"ERGON_{name}", default)


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build the configuration: flags win over `ERGON_*` variables, which win over defaults."""
    env = os.environ if environ is None else environ
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(
        prog="ergon-server",
        description="Ergon durable-execution server (gRPC). Each flag may also be set as "
        "an ERGON_* environment variable, e.g. ERGON_LISTEN, ERGON_DB.",
    )
    parser.add_argument(
        "--listen", default=_env(env, "LISTEN", DEFAULT_LISTEN), help="host:port to serve on"
    )
    parser.add_argument(
        "--db",
        default=_env(env, "DB", DEFAULT_DB),
        help="store URL: sqlite:///ergon.db (default), sqlite:////abs/path.db, memory://",
    )
    parser.add_argument(
        "--sqlite-synchronous",
        choices=["FULL", "NORMAL"],
        default=_env(env, "SQLITE_SYNCHRONOUS", "FULL"),
        help="SQLite durability: FULL survives power loss, NORMAL only process crashes",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=float(_env(env, "LEASE_TTL", str(defaults.lease_ttl_ms / 1000))),
        help="seconds a worker's leases outlive its last heartbeat",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=float(_env(env, "HEARTBEAT_INTERVAL", str(defaults.heartbeat_interval_ms / 1000))),
        help="seconds between worker heartbeats (at most half the lease TTL)",
    )
    parser.add_argument(
        "--max-payload-bytes",
        type=int,
        default=int(_env(env, "MAX_PAYLOAD_BYTES", str(defaults.max_payload_bytes))),
        help="largest input, result or signal payload accepted",
    )
    parser.add_argument(
        "--allow-unregistered-flow-types",
        action="store_true",
        default=_env(env, "ALLOW_UNREGISTERED_FLOW_TYPES", "") in ("1", "true", "yes"),
        help="accept flows of types no worker has registered yet",
    )
    parser.add_argument(
        "--log-level", default=_env(env, "LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING"
    )
    args = parser.parse_args(argv)
    try:
        engine = EngineConfig(
            lease_ttl_ms=int(args.lease_ttl * 1000),
            heartbeat_interval_ms=int(args.heartbeat_interval * 1000),
            max_payload_bytes=args.max_payload_bytes,
            allow_unregistered_flow_types=args.allow_unregistered_flow_types,
        )
    except ValueError as error:
        parser.error(str(error))
    return ServerConfig(
        listen=args.listen,
        db=args.db,
        sqlite_synchronous=args.sqlite_synchronous,
        log_level=args.log_level.upper(),
        engine=engine,
    )
