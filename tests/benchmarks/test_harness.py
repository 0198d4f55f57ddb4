"""Every benchmark workload runs at a tiny size, so the harness never rots (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import cli
from benchmarks.runner import add_peer_speedups


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
    calibration = document["machine"]["calibration"]
    for moment in ("before", "after"):
        assert set(calibration[moment]) == {
            "commit_ms",
            "grpc_stream_rtt_ms",
            "grpc_unary_rtt_ms",
            "python_us",
        }
        assert all(value > 0 for value in calibration[moment].values())
    rows = document["results"]
    assert rows and all(row["system"] == "ergon" for row in rows)
    if argv[0] == "timers":
        assert rows[0]["fired_early"] == 0
    if argv[0] == "backlog":
        assert "ratio_to_small_backlog" in rows[-1]


def test_peer_rows_carry_ergons_speedup_over_them() -> None:
    rows: list[dict[str, Any]] = [
        {"workload": "throughput", "system": "ergon", "flows_per_s": 1200.0},
        {"workload": "latency", "system": "ergon", "p50_ms": 8.0},
        {"workload": "throughput", "system": "ergon", "store": "postgres", "flows_per_s": 1.0},
        {"workload": "throughput", "system": "pyergon 0.8.1", "flows_per_s": 300.0},
        {"workload": "latency", "system": "pyergon 0.8.1", "p50_ms": 10.0},
        {"workload": "latency", "system": "other", "p50_ms": float("nan")},
        {"workload": "timers", "system": "other"},
    ]
    add_peer_speedups(rows)
    assert [row.get("ergon_speedup") for row in rows] == [None, None, None, 4.0, 1.25, None, None]
