"""Backends for the storage conformance suite.

Every test that takes `store` (or `backend`) runs once per backend in `BACKENDS`. A backend is
a factory of store instances over one database: calling `make()` again gives a fresh instance
on the same data (a restart), which the durability tests use. To add a backend, add a function
returning a `Backend` to `BACKENDS`; it registers the cleanup of what it creates on the exit
stack it is given, and skips inside when its server is absent (PostgreSQL: each test gets a
schema of its own in a database of the session, see tests/support/postgres.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ergon_server.storage.base import Store
from ergon_server.storage.memory import MemoryStore
from ergon_server.storage.postgres import PostgresStore
from ergon_server.storage.sqlite import SqliteStore
from tests.support.postgres import execute_sync, temporary_database_sync, temporary_schema_sync


@dataclass
class Backend:
    """One store implementation under test.

    Attributes:
        name: The pytest id.
        make: A new, unopened store instance over this backend's database.
        survives_reopen: Whether data outlives `close()` and a new instance.
        set_schema_version: Records a schema version directly in the database, or None when
            the backend has no schema.
        schema_version: The newest schema version the backend's migrations reach.
    """

    name: str
    make: Callable[[], Store]
    survives_reopen: bool
    set_schema_version: Callable[[int], None] | None = None
    schema_version: int = 0


def _memory(
    request: pytest.FixtureRequest, tmp_path: Path, cleanup: contextlib.ExitStack
) -> Backend:
    shared = MemoryStore()
    # A restart of the memory store is the same instance opened again.
    return Backend("memory", lambda: shared, survives_reopen=True)


def _sqlite(
    request: pytest.FixtureRequest, tmp_path: Path, cleanup: contextlib.ExitStack
) -> Backend:
    # A directory that does not exist yet: open() must create it.
    path = tmp_path / "state" / "ergon.db"

    def set_schema_version(version: int) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)",
                (version, f"{version:04d}_future.sql"),
            )
        conn.close()

    return Backend(
        "sqlite",
        lambda: SqliteStore(str(path)),
        survives_reopen=True,
        set_schema_version=set_schema_version,
        schema_version=3,
    )


def _sqlite_in_memory(
    request: pytest.FixtureRequest, tmp_path: Path, cleanup: contextlib.ExitStack
) -> Backend:
    return Backend("sqlite_memory", lambda: SqliteStore(":memory:"), survives_reopen=False)


def _postgres(
    request: pytest.FixtureRequest, tmp_path: Path, cleanup: contextlib.ExitStack
) -> Backend:
    # A schema of the test's own, dropped after it (skips when no server answers).
    database: str = request.getfixturevalue("postgres_database")
    dsn = cleanup.enter_context(temporary_schema_sync(database))

    def set_schema_version(version: int) -> None:
        execute_sync(
            dsn,
            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
            version,
            f"{version:04d}_future.sql",
        )

    # A small pool: a test opens a few stores at most, and a server allows 100 connections.
    return Backend(
        "postgres",
        lambda: PostgresStore(dsn, min_size=1, max_size=4),
        survives_reopen=True,
        set_schema_version=set_schema_version,
        schema_version=3,
    )


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path, contextlib.ExitStack], Backend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "sqlite_memory": _sqlite_in_memory,
    "postgres": _postgres,
}


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database for the session's PostgreSQL tests, each in a schema of its own."""
    with temporary_database_sync() as dsn:
        yield dsn


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn."""
    factory = BACKENDS[request.param]
    with contextlib.ExitStack() as cleanup:
        yield factory(request, tmp_path, cleanup)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """An open store of the current backend, closed after the test."""
    instance = backend.make()
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open file-backed SQLite store, for tests of SQLite's own machinery."""
    instance = SqliteStore(str(tmp_path / "ergon.db"))
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()
