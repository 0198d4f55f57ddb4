"""OpenTelemetry spans, when the `otel` extra is installed (`pip install 'ergon[otel]'`).

Without `opentelemetry-api` every span is a no-op. With it, spans go to whatever tracer
provider the application configured (OpenTelemetry's own global, set by the app's start-up
code); Ergon configures nothing itself. The server emits `ergon.schedule`, `ergon.dispatch`
and `ergon.record_steps`; workers emit `ergon.flow` and `ergon.step`.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

try:
    from opentelemetry import trace as _otel
except ImportError:  # the extra is not installed
    _otel = None  # type: ignore[assignment]

_NO_SPAN: AbstractContextManager[object] = contextlib.nullcontext()
_UNKNOWN = object()


def _provider_set() -> bool:
    """Whether the application has set a tracer provider (until then spans go nowhere)."""
    # OpenTelemetry's public check looks the environment up on every call while no provider
    # is set, a few microseconds on every step; its module global says the same for an
    # attribute read. The public check stays for a release without that global.
    provider = getattr(_otel, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN:
        return not isinstance(_otel.get_tracer_provider(), _otel.ProxyTracerProvider)
    return provider is not None


class Tracer:
    """Makes spans, or nothing when OpenTelemetry is absent."""

    def __init__(self, name: str) -> None:
        self._tracer = None
        if _otel is not None:
            # This loads a provider named by OTEL_PYTHON_TRACER_PROVIDER, if any, into the
            # global `_provider_set` reads. One that fails to load is logged by OpenTelemetry;
            # spans then stay off rather than fail the SDK's import.
            with contextlib.suppress(Exception):
                self._tracer = _otel.get_tracer(name)

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[object]:
        """A span around the block (exceptions are recorded on it)."""
        if self._tracer is None or not _provider_set():
            return _NO_SPAN
        clean = {k: v for k, v in attributes.items() if v is not None}
        return self._tracer.start_as_current_span(name, attributes=clean)


def enabled() -> bool:
    """Whether spans are being made."""
    return _otel is not None
