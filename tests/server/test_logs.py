"""Structured logs: JSON lines off a terminal, with the identifiers as fields."""

from __future__ import annotations

import io
import json
import logging

from ergon_server import logs


def test_json_lines_carry_flow_and_worker_ids() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "auto", stream)  # a StringIO is not a terminal: JSON
    try:
        logging.getLogger("ergon_server.test").info(
            "flow %s parked", "f-1", extra={"flow_id": "f-1", "worker_id": "w-1"}
        )
    finally:
        logging.getLogger().handlers.clear()
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "flow f-1 parked"
    assert (entry["flow_id"], entry["worker_id"], entry["level"]) == ("f-1", "w-1", "INFO")
    assert entry["ts"].endswith("+00:00")


def test_text_when_asked() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "text", stream)
    try:
        logging.getLogger("ergon_server.test").warning("plain %s", "text")
    finally:
        logging.getLogger().handlers.clear()
    assert "WARNING ergon_server.test: plain text" in stream.getvalue()
