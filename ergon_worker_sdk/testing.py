"""An in-process Ergon server on 127.0.0.1:0 for users' own tests and the quick start.

    async with ErgonTestServer() as server:
        async with server.client() as client:
            ...

Needs the `ergon_server` package (installed with the `ergon` distribution).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ergon_worker_sdk._client import Client


class ErgonTestServer:
    """A real Ergon server in this process, on a free port, with its own store.

    Args:
        db: a store URL; by default a SQLite file in a fresh temporary folder. `memory://`
            keeps nothing.
        tokens: require bearer tokens, as `ROLE:TOKEN,ROLE:TOKEN` (roles worker, client,
            admin); None accepts every call.
        tls_cert: serve TLS with this PEM certificate chain (and `tls_key`).
        tls_key: the PEM private key of `tls_cert`.
        tls_client_ca: require client certificates signed by this PEM CA (mutual TLS).
        engine_options: `EngineConfig` fields to override (lease_ttl_ms, ...).
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        tokens: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        **engine_options: Any,
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._tls = (tls_cert, tls_key, tls_client_ca)
        self._engine_options = engine_options
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: Any = None
        self.address = ""

    async def start(self) -> None:
        """Start serving."""
        from ergon_server.auth import Tokens
        from ergon_server.config import ServerConfig
        from ergon_server.engine import EngineConfig
        from ergon_server.server import ErgonServer

        db = self._db
        if db is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ergon-test-")
            db = f"sqlite:///{Path(self._tmp.name) / 'ergon.db'}"
        config = ServerConfig(
            listen="127.0.0.1:0",
            db=db,
            shutdown_grace_s=0.5,
            tls_cert=self._tls[0],
            tls_key=self._tls[1],
            tls_client_ca=self._tls[2],
            tokens=Tokens.parse([self._tokens], "tokens") if self._tokens else None,
            engine=EngineConfig(**self._engine_options),
        )
        self._server = ErgonServer(config)
        await self._server.start()
        self.address = self._server.address

    def client(self, **options: Any) -> Client:
        """A client connected to this server."""
        return Client(self.address, **options)

    async def shutdown(self) -> None:
        """Stop the server and remove its files. Idempotent."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            tmp.cleanup()

    async def __aenter__(self) -> ErgonTestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
