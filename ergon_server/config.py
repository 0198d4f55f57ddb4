"""Server configuration from flags and `ERGON_*` environment variables."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ergon_server.auth import Tokens
from ergon_server.engine.config import EngineConfig
from ergon_server.errors import InvalidArgumentError
from ergon_server.storage import create_store

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "sqlite:///ergon.db"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `ergon-server` needs to run.

    Attributes:
        listen: host:port to bind (port 0 picks a free one).
        db: the store URL: `sqlite:///path.db` (default, relative to the working directory),
            `sqlite:////absolute/path.db`, `postgresql://user@host:5432/db`, or `memory://`
            (nothing kept; for tests).
        sqlite_synchronous: SQLite's `synchronous` pragma: FULL (default, durable on power
            loss) or NORMAL (durable across process crashes only).
        max_message_bytes: the largest gRPC message accepted or sent.
        shutdown_grace_s: how long in-flight calls get to finish on shutdown.
        tls_cert: PEM certificate chain: serve TLS instead of plaintext.
        tls_key: PEM private key of `tls_cert`.
        tls_client_ca: PEM CA bundle: require client certificates signed by it (mutual TLS).
        tokens: bearer tokens and their roles; None accepts every call.
        engine: the engine's tunables.
    """

    listen: str = DEFAULT_LISTEN
    db: str = DEFAULT_DB
    sqlite_synchronous: str = "FULL"
    max_message_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 5.0
    log_level: str = "INFO"
    log_format: str = "auto"
    metrics_listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tokens: Tokens | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgumentError(
                f"{_setting('tls-cert')} and {_setting('tls-key')} go together"
            )
        if self.max_message_bytes <= self.engine.max_payload_bytes:
            raise InvalidArgumentError(
                f"{_setting('max-message-bytes')} must exceed {_setting('max-payload-bytes')}, "
                f"got {self.max_message_bytes} and {self.engine.max_payload_bytes}"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgumentError(
                f"{_setting('tls-client-ca')} (mutual TLS) needs {_setting('tls-cert')} and "
                f"{_setting('tls-key')}"
            )


def _setting(flag: str) -> str:
    """How messages name a setting: its flag and its variable, `--lease-ttl (ERGON_LEASE_TTL)`.

    Either may have set it; the operator knows which.
    """
    return f"--{flag} (ERGON_{flag.upper().replace('-', '_')})"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _choice(*allowed: str, upper: bool = True) -> Callable[[str], str]:
    """A converter to one of `allowed`, in any case; argparse reports what it raises."""

    def convert(value: str) -> str:
        normal = value.upper() if upper else value.lower()
        if normal not in allowed:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(allowed)}")
        return normal

    return convert


def _number(kind: Callable[[str], _N], what: str, least: _N) -> Callable[[str], _N]:
    """A converter to a finite number of at least `least`; argparse reports what it raises."""

    def convert(value: str) -> _N:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
        if number < least:
            raise argparse.ArgumentTypeError(f"{value!r} is less than {least}")
        return number

    return convert


def _address(value: str) -> str:
    """A converter checking `host:port` (the host may be empty)."""
    _, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port (e.g. 127.0.0.1:9090)")
    return value


def _metrics_address(value: str) -> str | None:
    """A converter checking `host:port`; empty means off."""
    return _address(value) if value else None


def _listen_address(value: str) -> str:
    """A converter checking what gRPC may listen on: `host:port`, or a `unix:` socket."""
    return value if value.startswith(("unix:", "unix-abstract:")) else _address(value)


def _file(value: str) -> Path | None:
    """A converter to a file that can be read; empty means none."""
    if not value:
        return None
    path = Path(value)
    try:
        path.open("rb").close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {error.strerror}") from None
    return path


def _switch(value: str) -> bool:
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither on ({', '.join(_TRUE)}) nor off ({', '.join(_FALSE[:-1])})"
    )


class _Environment:
    """The `ERGON_*` variables as flag defaults, checked as strictly as the flags themselves."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ

    def get(self, name: str, convert: Callable[[str], _T], default: _T) -> _T:
        """`ERGON_<name>` converted, or `default` when unset; a bad value stops with usage."""
        raw = self._environ.get(f"ERGON_{name}")
        if raw is None:
            return default
        try:
            return convert(raw)
        except argparse.ArgumentTypeError as error:
            self._parser.error(f"ERGON_{name}: {error}")


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
        epilog="GRPC_EXPERIMENTS, if set, is left to gRPC; if not, the server asks gRPC for "
        "its iomgr socket layer (faster here than its EventEngine; set it empty for gRPC's "
        "defaults).",
    )
    variables = _Environment(parser, env)
    # At least a millisecond: the engine counts in them.
    seconds = _number(float, "a number of seconds", 0.001)
    count = _number(int, "a whole number", 1)
    synchronous = _choice("FULL", "NORMAL")
    log_level = _choice(*LOG_LEVELS)
    log_format = _choice("auto", "json", "text", upper=False)
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=variables.get("LISTEN", _listen_address, DEFAULT_LISTEN),
        help="host:port to serve on",
    )
    parser.add_argument(
        "--db",
        default=variables.get("DB", str, DEFAULT_DB),
        help="store URL: sqlite:///ergon.db (default; one server per file), "
        "sqlite:////abs/path.db, postgresql://user@host:5432/db (several replicas may share "
        "it), memory:// (nothing kept; for tests)",
    )
    parser.add_argument(
        "--sqlite-synchronous",
        type=synchronous,
        default=variables.get("SQLITE_SYNCHRONOUS", synchronous, "FULL"),
        help="SQLite durability: FULL survives power loss, NORMAL only process crashes",
    )
    parser.add_argument(
        "--lease-ttl",
        type=seconds,
        default=variables.get("LEASE_TTL", seconds, defaults.lease_ttl_ms / 1000),
        help="seconds a worker's leases outlive its last heartbeat",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=seconds,
        default=variables.get("HEARTBEAT_INTERVAL", seconds, defaults.heartbeat_interval_ms / 1000),
        help="seconds between worker heartbeats (at most half the lease TTL)",
    )
    parser.add_argument(
        "--max-payload-bytes",
        type=count,
        default=variables.get("MAX_PAYLOAD_BYTES", count, defaults.max_payload_bytes),
        help="largest input, result or signal payload accepted",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=count,
        default=variables.get("MAX_MESSAGE_BYTES", count, 16 * 1024 * 1024),
        help="largest gRPC message accepted or sent (keep it above --max-payload-bytes)",
    )
    parser.add_argument(
        "--max-page-size",
        type=count,
        default=variables.get("MAX_PAGE_SIZE", count, defaults.max_page_size),
        help="most flows or journal entries in one page of a listing",
    )
    parser.add_argument(
        "--max-streams-per-client",
        type=count,
        default=variables.get("MAX_STREAMS_PER_CLIENT", count, defaults.max_streams_per_client),
        help="most worker streams one client (token, or connection) may hold open",
    )
    parser.add_argument(
        "--allow-unregistered-flow-types",
        action="store_true",
        default=variables.get("ALLOW_UNREGISTERED_FLOW_TYPES", _switch, False),
        help="accept flows of types no worker has registered yet",
    )
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=variables.get("LOG_LEVEL", log_level, "INFO"),
        help=", ".join(LOG_LEVELS),
    )
    parser.add_argument(
        "--metrics-listen",
        type=_metrics_address,
        default=variables.get("METRICS_LISTEN", _metrics_address, None),
        help="host:port to serve Prometheus metrics on (GET /metrics); off by default",
    )
    parser.add_argument(
        "--log-format",
        type=log_format,
        default=variables.get("LOG_FORMAT", log_format, "auto"),
        help="json lines, or text; auto: JSON unless stderr is a terminal",
    )
    for name, what in (
        ("tls-cert", "PEM certificate chain: serve TLS"),
        ("tls-key", "PEM private key of --tls-cert"),
        ("tls-client-ca", "PEM CA bundle: require client certificates (mutual TLS)"),
        ("tokens-file", "file of ROLE:TOKEN lines (roles worker, client, admin)"),
    ):
        variable = name.upper().replace("-", "_")
        parser.add_argument(
            f"--{name}", type=_file, default=variables.get(variable, _file, None), help=what
        )
    args = parser.parse_args(argv)
    # Each setting is checked where it is read (above), so its error names the flag or the
    # variable that gave it; what is left are the settings that depend on one another.
    try:
        # Built only to check the URL now, by name, rather than when the server starts.
        create_store(args.db, sqlite_synchronous=args.sqlite_synchronous)
    except InvalidArgumentError as error:
        parser.error(f"{_setting('db')}: {error.message}")
    tokens = None
    if args.tokens_file is not None:
        try:
            tokens = Tokens.from_file(args.tokens_file)
        except InvalidArgumentError as error:
            parser.error(f"{_setting('tokens-file')}: {error.message}")
    elif env.get("ERGON_TOKENS"):
        try:
            tokens = Tokens.parse([env["ERGON_TOKENS"]], "ERGON_TOKENS")
        except InvalidArgumentError as error:
            parser.error(error.message)
    lease_ttl_ms = int(args.lease_ttl * 1000)
    heartbeat_interval_ms = int(args.heartbeat_interval * 1000)
    if heartbeat_interval_ms * 2 > lease_ttl_ms:
        parser.error(
            f"{_setting('heartbeat-interval')} must be at most half of {_setting('lease-ttl')}, "
            f"got {args.heartbeat_interval:g} s and {args.lease_ttl:g} s"
        )
    try:
        engine = EngineConfig(
            lease_ttl_ms=lease_ttl_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_payload_bytes=args.max_payload_bytes,
            max_streams_per_client=args.max_streams_per_client,
            max_page_size=args.max_page_size,
            allow_unregistered_flow_types=args.allow_unregistered_flow_types,
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        return ServerConfig(
            listen=args.listen,
            db=args.db,
            sqlite_synchronous=args.sqlite_synchronous,
            log_level=args.log_level,
            log_format=args.log_format,
            max_message_bytes=args.max_message_bytes,
            metrics_listen=args.metrics_listen,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tokens=tokens,
            engine=engine,
        )
    except InvalidArgumentError as error:
        parser.error(error.message)
