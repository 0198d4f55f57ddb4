"""Every benchmark workload runs at a tiny size, so the harness never rots (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import cli


@pytest.mark.parametrize(
    "argv",
    [
        ["throughput", "--flows", "30"],
        ["latency", "--flows", "5"],
        ["timers", "--flows", "30", "--seconds", "0.2"],
        ["backlog", "--queued", "60", "--measured", "20"],
        ["latency", "--flows", "5", "--store", "memory"],
    ],
    ids=["throughput", "latency", "timers", "backlog", "latency-memory"],
)
async def test_workload_runs_at_a_tiny_size(argv: list[str], tmp_path: Path) -> None:
    import asyncio

    out = tmp_path / "result.json"
    # The harness runs its own event loop, as it does from the command line.
    code = await asyncio.to_thread(cli, [*argv, "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["machine"]["cores"] and document["machine"]["python"] == sys.version.split()[0]
    rows = document["results"]
    assert rows and all(row["system"] == "ergon" for row in rows)
    if argv[0] == "timers":
        assert rows[0]["fired_early"] == 0
    if argv[0] == "backlog":
        assert "ratio_to_small_backlog" in rows[-1]
