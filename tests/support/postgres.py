"""Throwaway PostgreSQL databases (and schemas) for tests.

Every user gets a database of its own with a random name, created on the server that
`ERGON_TEST_POSTGRES_DSN` names (default `postgresql://postgres@127.0.0.1:5432/postgres`, a role
allowed to CREATE DATABASE) and dropped afterwards, also when the test fails, so tests never see
each other's data and never depend on leftovers.

CREATE DATABASE copies a template (about 0.4 s on a small CI machine), so suites with many
short tests take a schema each instead, inside one database per session: the DSN then carries
`?search_path=<schema>`, which asyncpg passes to the server as a session setting, and
everything the store creates lands in that schema.

When no server answers, the test is skipped with the reason, unless `ERGON_REQUIRE_POSTGRES=1`
(CI sets it): then it fails, so a broken CI database cannot pass as "all skipped".

    async with temporary_database() as dsn:          # in async tests and fixtures
        store = PostgresStore(dsn)

    with temporary_database_sync() as dsn:           # in sync fixtures (e.g. server processes)
        server = ServerProcess(dsn, tmp_path)

    with temporary_schema_sync(database_dsn) as dsn:  # a schema in a (session) database
        store = PostgresStore(dsn)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DSN_ENV = "ERGON_TEST_POSTGRES_DSN"
REQUIRE_ENV = "ERGON_REQUIRE_POSTGRES"
CONNECT_TIMEOUT_S = 5.0

_T = TypeVar("_T")

# What a connection attempt raises when no usable server is there.
_UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def admin_dsn() -> str:
    """The server-level DSN that test databases are created through."""
    return os.environ.get(DSN_ENV) or DEFAULT_ADMIN_DSN


def postgres_required() -> bool:
    """Whether a missing server fails the tests instead of skipping them."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the current test for want of a server, or fail it when one is required."""
    where = f"{_redacted(admin_dsn())} ({DSN_ENV})"
    if postgres_required():
        pytest.fail(
            f"PostgreSQL is required ({REQUIRE_ENV}=1) but {where} is not usable: {reason}",
            pytrace=False,
        )
    pytest.skip(f"no PostgreSQL server at {where}: {reason}; set {REQUIRE_ENV}=1 to fail instead")


def dsn_for(database: str, base: str | None = None) -> str:
    """The DSN of `database` on the server of `base` (default: the admin DSN)."""
    parts = urlsplit(base or admin_dsn())
    return urlunsplit(parts._replace(path="/" + database))


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def _admin() -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(admin_dsn(), timeout=CONNECT_TIMEOUT_S)
    except _UNREACHABLE as exc:
        unavailable(f"{type(exc).__name__}: {exc}")
    return conn


async def create_database(prefix: str = "ergon_test") -> str:
    """Create a database with a random name; returns its DSN (skips if there is no server)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(name)


async def drop_database(dsn: str) -> None:
    """Drop a database made by `create_database`, disconnecting whoever still uses it."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await _admin()
    try:
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.PostgresSyntaxError:
            # Before PostgreSQL 13: no FORCE, so end the sessions first.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def temporary_database(prefix: str = "ergon_test") -> AsyncIterator[str]:
    """A fresh, empty database for the duration of the block; yields its DSN."""
    dsn = await create_database(prefix)
    try:
        yield dsn
    finally:
        await drop_database(dsn)


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion from sync code, even under a running event loop.

    It runs on a loop of its own in a helper thread, so sync fixtures of async tests can use it.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ergon-pg") as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def temporary_database_sync(prefix: str = "ergon_test") -> Iterator[str]:
    """`temporary_database` for sync code (fixtures that start server processes)."""
    dsn = run_sync(create_database(prefix))
    try:
        yield dsn
    finally:
        run_sync(drop_database(dsn))


def with_search_path(dsn: str, schema: str) -> str:
    """`dsn` with every session's search_path set to `schema` (and nothing else)."""
    parts = urlsplit(dsn)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


def search_path_of(dsn: str) -> str | None:
    """The schema a DSN made by `with_search_path` names."""
    return dict(parse_qsl(urlsplit(dsn).query)).get("search_path")


async def create_schema(database_dsn: str, prefix: str = "ergon_test") -> str:
    """Create a schema with a random name in a database; returns a DSN that works in it."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        await execute(database_dsn, f'CREATE SCHEMA "{name}"')
    except _UNREACHABLE as exc:
        unavailable(f"{type(exc).__name__}: {exc}")
    return with_search_path(database_dsn, name)


async def drop_schema(dsn: str) -> None:
    """Drop the schema of a DSN made by `create_schema`, with everything in it."""
    name = search_path_of(dsn)
    if name:
        await execute(dsn, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@contextlib.asynccontextmanager
async def temporary_schema(database_dsn: str, prefix: str = "ergon_test") -> AsyncIterator[str]:
    """A fresh, empty schema in `database_dsn` for the duration of the block; yields its DSN."""
    dsn = await create_schema(database_dsn, prefix)
    try:
        yield dsn
    finally:
        await drop_schema(dsn)


@contextlib.contextmanager
def temporary_schema_sync(database_dsn: str, prefix: str = "ergon_test") -> Iterator[str]:
    """`temporary_schema` for sync code."""
    dsn = run_sync(create_schema(database_dsn, prefix))
    try:
        yield dsn
    finally:
        run_sync(drop_schema(dsn))


async def execute(dsn: str, sql: str, *args: object) -> str:
    """Run one statement on `dsn` over a connection of its own."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


def execute_sync(dsn: str, sql: str, *args: object) -> str:
    """`execute` for sync code."""
    return run_sync(execute(dsn, sql, *args))
