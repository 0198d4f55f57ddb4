"""Durable state behind the `Store` protocol, and `create_store` to pick a backend by URL.

URLs:
    sqlite:///relative/path.db     a file relative to the working directory
    sqlite:////absolute/path.db    an absolute path (four slashes)
    sqlite://:memory:              SQLite in memory (lost on close)
    memory://                      the dictionary store, for tests
    postgresql://user@host:5432/db PostgreSQL (also postgres://); any libpq-style URL asyncpg
                                   accepts, e.g. with a password or ?sslmode=require
"""

from __future__ import annotations

from ergon_server.errors import InvalidArgumentError
from ergon_server.storage.base import Store

__all__ = ["Store", "create_store"]

_SQLITE_PREFIX = "sqlite://"


def create_store(url: str, *, sqlite_synchronous: str = "FULL") -> Store:
    """Build the store a URL names; the caller opens and closes it.

    Args:
        url: Where the state lives (see the module docstring for the forms).
        sqlite_synchronous: SQLite's `synchronous` pragma (OFF, NORMAL, FULL or EXTRA).

    Raises:
        InvalidArgumentError: The URL is malformed, or names a backend this build lacks.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise InvalidArgumentError(
            f"store URL {url!r} has no scheme; use sqlite:///path/to/ergon.db, "
            "postgresql://user@host:5432/db or memory://"
        )
    if scheme == "memory":
        if rest:
            raise InvalidArgumentError(f"store URL {url!r}: memory:// takes no path")
        from ergon_server.storage.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from ergon_server.storage.sqlite import MEMORY_PATH, SqliteStore

        if rest in (MEMORY_PATH, "/" + MEMORY_PATH):
            return SqliteStore(MEMORY_PATH, sqlite_synchronous)
        if not rest.startswith("/") or rest == "/":
            raise InvalidArgumentError(
                f"store URL {url!r}: a sqlite URL has three slashes and a path, "
                "e.g. sqlite:///ergon.db (relative) or sqlite:////var/lib/ergon.db (absolute)"
            )
        return SqliteStore(rest[1:], sqlite_synchronous)
    if scheme in ("postgresql", "postgres"):
        from ergon_server.storage.postgres import PostgresStore

        # asyncpg wants the scheme in lower case; the rest is its to parse (at open()).
        return PostgresStore(f"{scheme}://{rest}")
    raise InvalidArgumentError(
        f"store URL {url!r}: unknown scheme {scheme!r}; use sqlite:///path/to/ergon.db, "
        "postgresql://user@host:5432/db or memory://"
    )
