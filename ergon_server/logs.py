"""Structured logs: JSON lines when stderr is not a terminal, readable text when it is.

Log calls pass identifiers as `extra={"flow_id": ..., "worker_id": ...}`; the JSON form
carries them as fields so log pipelines can filter on them.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO

FIELDS = ("flow_id", "worker_id", "session_id", "method", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the known identifiers."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, log_format: str = "auto", stream: IO[str] | None = None) -> None:
    """Set up the root logger: `json`, `text`, or `auto` (JSON unless on a terminal)."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    use_json = log_format == "json" or (log_format == "auto" and not out.isatty())
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
