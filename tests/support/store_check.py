"""Read a store's tables directly (SQLite file or PostgreSQL database) and check them whole.

Fault tests take a `snapshot` while the server is dead (right after a SIGKILL: what was
durable at that instant) and at the end, and `check_consistency` asserts the invariants every
store must hold once all flows have ended.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from tests.support.postgres import run_sync


@dataclass(frozen=True)
class Snapshot:
    """Rows of the tables that matter, as plain tuples of plain values."""

    flows: dict[str, dict[str, Any]]  # flow_id -> row
    journal: list[dict[str, Any]]  # every entry
    waits: list[dict[str, Any]]
    signals: list[dict[str, Any]]
    recorded: set[tuple[str, str]] = field(default_factory=set)  # (flow_id, key) COMPLETED

    @property
    def unfinished(self) -> int:
        """Flows not yet COMPLETED or FAILED."""
        return sum(1 for row in self.flows.values() if row["status"] not in ("COMPLETED", "FAILED"))

    @property
    def progress(self) -> int:
        """Entries recorded plus flows ended: it only grows while work goes on."""
        return len(self.recorded) + len(self.flows) - self.unfinished

    @property
    def completed_steps(self) -> set[tuple[str, str]]:
        """(flow_id, step name) of every step whose result is recorded."""
        return {
            (e["flow_id"], e["key"].split("#")[0])
            for e in self.journal
            if e["kind"] == "STEP" and e["status"] == "COMPLETED"
        }


_FLOWS = (
    "SELECT flow_id, flow_type, status, attempt, lease_owner, lease_expires_at, created_at "
    "FROM flows"
)
_JOURNAL = (
    "SELECT flow_id, key, sequence, kind, status, attempts, recorded_at FROM journal "
    "ORDER BY flow_id, sequence"
)
_WAITS = "SELECT flow_id, key, kind, status, fire_at, created_at FROM waits"
_SIGNALS = "SELECT flow_id, name, sequence, request_id, consumed_at FROM signals"


def snapshot(store_url: str) -> Snapshot:
    """Everything durable in the store now. Call it only while no server writes to it."""
    if store_url.startswith("sqlite:///"):
        rows = _sqlite(store_url.removeprefix("sqlite:///"))
    else:
        rows = run_sync(_postgres(store_url))
    flows, journal, waits, signals = rows
    return Snapshot(
        flows={row["flow_id"]: row for row in flows},
        journal=journal,
        waits=waits,
        signals=signals,
        recorded={(e["flow_id"], e["key"]) for e in journal if e["status"] == "COMPLETED"},
    )


def _sqlite(path: str) -> tuple[list[dict[str, Any]], ...]:
    # A normal (read-write) open: after a SIGKILL, SQLite replays the WAL left behind, exactly
    # as the next server will.
    conn = sqlite3.connect(path, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return tuple(
            [dict(row) for row in conn.execute(sql)] for sql in (_FLOWS, _JOURNAL, _WAITS, _SIGNALS)
        )
    finally:
        conn.close()


async def _postgres(dsn: str) -> tuple[list[dict[str, Any]], ...]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        out = []
        for sql in (_FLOWS, _JOURNAL, _WAITS, _SIGNALS):
            out.append([dict(row) for row in await conn.fetch(sql)])
        return tuple(out)
    finally:
        await conn.close()


def check_consistency(snap: Snapshot, expected_flow_ids: set[str]) -> None:
    """The whole store, once every flow has ended: nothing lost, nothing doubled, nothing left.

    - exactly the expected flows exist (none lost, none extra), each COMPLETED, no lease held;
    - journal keys are unique per flow and sequences strictly increase (the tables' keys
      already forbid duplicates; this also catches a store that dropped them);
    - every wait is SATISFIED and has its journal entry; no timer is left open;
    - every signal was consumed, each by one wait.
    """
    assert set(snap.flows) == expected_flow_ids, (
        f"lost: {sorted(expected_flow_ids - set(snap.flows))[:5]}, "
        f"extra: {sorted(set(snap.flows) - expected_flow_ids)[:5]}"
    )
    statuses = Counter(row["status"] for row in snap.flows.values())
    assert statuses == Counter({"COMPLETED": len(expected_flow_ids)}), statuses
    held = [f for f, row in snap.flows.items() if row["lease_owner"]]
    assert not held, f"finished flows still leased: {held[:5]}"
    keys = Counter((e["flow_id"], e["key"]) for e in snap.journal)
    assert max(keys.values(), default=1) == 1, [k for k, n in keys.items() if n > 1][:5]
    last: dict[str, int] = {}
    for entry in snap.journal:
        assert entry["sequence"] > last.get(entry["flow_id"], 0), entry
        last[entry["flow_id"]] = entry["sequence"]
        assert entry["status"] == "COMPLETED", entry
    open_waits = [w for w in snap.waits if w["status"] != "SATISFIED"]
    assert not open_waits, f"waits never satisfied: {open_waits[:5]}"
    for wait in snap.waits:
        assert (wait["flow_id"], wait["key"]) in snap.recorded, f"wait without outcome: {wait}"
    unconsumed = [s for s in snap.signals if s["consumed_at"] is None]
    assert not unconsumed, f"signals never consumed: {unconsumed[:5]}"
