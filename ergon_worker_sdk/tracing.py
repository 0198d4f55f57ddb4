"""OpenTelemetry spans, when the `otel` extra is installed (`pip install 'ergon[otel]'`).

Without `opentelemetry-api` every span is a no-op. With it, spans go to whatever tracer
provider the application configured (OpenTelemetry's own global, set by the app's start-up
code); Ergon configures nothing itself. The server emits `ergon.schedule`, `ergon.dispatch`
and `ergon.record_steps`; workers emit `ergon.flow` and `ergon.step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace as _otel
except ImportError:  # the extra is not installed
    _otel = None  # type: ignore[assignment]


class Tracer:
    """Makes spans, or nothing when OpenTelemetry is absent."""

    def __init__(self, name: str) -> None:
        self._tracer = None if _otel is None else _otel.get_tracer(name)

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        """A span around the block (exceptions are recorded on it)."""
        # Until the application sets a tracer provider, spans would go nowhere: skip the
        # cost (a few microseconds each, on every step).
        if self._tracer is None or isinstance(
            _otel.get_tracer_provider(), _otel.ProxyTracerProvider
        ):
            yield
            return
        clean = {k: v for k, v in attributes.items() if v is not None}
        with self._tracer.start_as_current_span(name, attributes=clean):
            yield


def enabled() -> bool:
    """Whether spans are being made."""
    return _otel is not None
