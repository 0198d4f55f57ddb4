"""Backends for the storage conformance suite.

Every test that takes `store` (or `backend`) runs once per backend in `BACKENDS`. A backend is
a factory of store instances over one database: calling `make()` again gives a fresh instance
on the same data (a restart), which the durability tests use. To add a backend (PostgreSQL),
add a function returning a `Backend` to `BACKENDS`; skip inside it when its server is absent.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ergon_server.storage.base import Store
from ergon_server.storage.memory import MemoryStore
from ergon_server.storage.sqlite import SqliteStore


@dataclass
class Backend:
    """One store implementation under test.

    Attributes:
        name: The pytest id.
        make: A new, unopened store instance over this backend's database.
        survives_reopen: Whether data outlives `close()` and a new instance.
        set_schema_version: Records a schema version directly in the database, or None when
            the backend has no schema.
    """

    name: str
    make: Callable[[], Store]
    survives_reopen: bool
    set_schema_version: Callable[[int], None] | None = None


def _memory(tmp_path: Path) -> Backend:
    shared = MemoryStore()
    # A restart of the memory store is the same instance opened again.
    return Backend("memory", lambda: shared, survives_reopen=True)


def _sqlite(tmp_path: Path) -> Backend:
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
    )


def _sqlite_in_memory(tmp_path: Path) -> Backend:
    return Backend("sqlite_memory", lambda: SqliteStore(":memory:"), survives_reopen=False)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "sqlite_memory": _sqlite_in_memory,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn."""
    factory: Callable[[Path], Backend] = BACKENDS[request.param]
    return factory(tmp_path)


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
