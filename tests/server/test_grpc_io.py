"""The server's process picks gRPC's I/O layer before grpc is imported (ergon_server/grpc_io)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ergon_server.grpc_io import IOMGR_EXPERIMENTS, prefer_iomgr
from tests.support.processes import ROOT, ServerProcess


def test_iomgr_is_asked_for_unless_the_operator_chose() -> None:
    environ: dict[str, str] = {}
    assert prefer_iomgr(environ)
    assert environ == {"GRPC_EXPERIMENTS": IOMGR_EXPERIMENTS}
    for chosen in ("", "-event_engine_client"):
        environ = {"GRPC_EXPERIMENTS": chosen}
        assert not prefer_iomgr(environ)
        assert environ == {"GRPC_EXPERIMENTS": chosen}


def test_the_entry_points_import_no_grpc_before_choosing() -> None:
    # gRPC reads GRPC_EXPERIMENTS when first imported; an entry point that imports it at module
    # level makes the choice come too late, silently.
    code = (
        "import sys, ergon_server.__main__, benchmarks.__main__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("environ", "logged"),
    [(None, IOMGR_EXPERIMENTS), ("", "gRPC's defaults")],
    ids=["default", "operator-chose-grpc-defaults"],
)
def test_the_server_process_runs_with_the_choice(
    environ: str | None, logged: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if environ is None:
        monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    else:
        monkeypatch.setenv("GRPC_EXPERIMENTS", environ)
    server = ServerProcess("memory://", tmp_path)
    server.start()
    try:
        assert f"gRPC experiments: {logged}" in server.logs()
    finally:
        assert server.stop() == 0
