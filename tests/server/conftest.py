"""Fixtures of the server's own tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ergon_server.storage import create_store
from ergon_server.storage.base import Store
from tests.support.postgres import temporary_database_sync


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open store of every backend (PostgreSQL: a database of its own), closed after."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(temporary_database_sync("ergon_engine"))
        else:
            url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 's.db'}"
        store = create_store(url)
        await store.open()
        yield store
        await store.close()
