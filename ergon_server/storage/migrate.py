"""Forward-only schema migrations, shared by the SQL dialects.

Each dialect ships numbered SQL files as package data in `migrations/<dialect>/`, named
`NNNN_description.sql` and numbered from 1 without gaps. A `schema_version` table holds one row
per applied file. At `open()` a store applies the pending files in order, each in its own
transaction, and refuses a database migrated by newer code (a version above the newest file
shipped here), because old code writing a newer schema could corrupt it silently.

The runner knows the order and the rules; a dialect supplies a `MigrationTarget` that knows how
to read the version and run one file in one transaction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from ergon_server.errors import SchemaVersionError, StoreError

# Plain SQL that both SQLite and PostgreSQL accept.
SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL)"
)

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file.

    Attributes:
        version: The file's number; the schema version once it is applied.
        name: The file name, recorded in `schema_version`.
        sql: The file's text.
    """

    version: int
    name: str
    sql: str


class MigrationTarget(Protocol):
    """A database connection as the runner needs it, implemented once per dialect."""

    async def ensure_version_table(self) -> None:
        """Create `schema_version` if it does not exist (`SCHEMA_VERSION_DDL`)."""
        ...

    async def current_version(self) -> int:
        """The highest applied version, 0 for an empty database."""
        ...

    async def apply(self, migration: Migration) -> None:
        """Run the file and record its version in `schema_version`, in one transaction.

        Applies nothing if the version was recorded meanwhile (another process migrated the
        same database first).
        """
        ...


def load_migrations(dialect: str) -> list[Migration]:
    """The migration files shipped for a dialect, in order.

    Args:
        dialect: The directory under `ergon_server/storage/migrations`, e.g. "sqlite".

    Raises:
        StoreError: The files are misnamed or their numbers have gaps (a packaging bug).
    """
    directory = resources.files("ergon_server.storage").joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise StoreError(f"migration file {dialect}/{entry.name} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise StoreError(
                f"{dialect} migrations must be numbered 1, 2, 3, ... without gaps; "
                f"found {migration.name} where version {expected} was expected"
            )
    return found


async def migrate(target: MigrationTarget, migrations: Sequence[Migration]) -> int:
    """Bring the database up to the newest migration.

    Args:
        target: The dialect's connection wrapper.
        migrations: All migrations this code ships, in order (from `load_migrations`).

    Returns:
        The schema version after migrating.

    Raises:
        SchemaVersionError: The database was migrated by a newer ergon-server.
    """
    await target.ensure_version_table()
    current = await target.current_version()
    supported = migrations[-1].version if migrations else 0
    if current > supported:
        raise SchemaVersionError(
            f"database schema version {current} is newer than this ergon-server supports "
            f"({supported}); upgrade ergon-server"
        )
    for migration in migrations:
        if migration.version > current:
            await target.apply(migration)
    return max(current, supported)
