"""OpenTelemetry spans for schedule, dispatch and steps (the `otel` extra is installed in dev)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ergon_worker_sdk import flow, flow_type, step, tracing
from ergon_worker_sdk.testing import ErgonTestEnvironment


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # OpenTelemetry's global provider is set once per process, as an application would.
    trace.set_tracer_provider(provider)
    return exporter


@dataclass
@flow_type(type_id="Traced")
class Traced:
    n: int

    @step
    async def add_one(self) -> int:
        return self.n + 1

    @flow
    async def run(self) -> int:
        return await self.add_one()


async def test_schedule_dispatch_record_flow_and_step_spans(exporter: InMemorySpanExporter) -> None:
    assert tracing.enabled()
    exporter.clear()
    async with ErgonTestEnvironment(Traced) as env:
        outcome = await env.run(Traced(1))
    assert outcome.result == 2
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {
        "ergon.schedule",
        "ergon.dispatch",
        "ergon.record_steps",
        "ergon.flow",
        "ergon.step",
    } <= set(spans)
    step = spans["ergon.step"]
    assert step.attributes is not None
    assert (step.attributes["ergon.key"], step.attributes["ergon.attempt"]) == ("add_one#1", 1)
    assert spans["ergon.flow"].attributes is not None
    assert spans["ergon.flow"].attributes["ergon.flow_type"] == "Traced"


def test_a_failing_block_is_recorded_on_its_span(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    with pytest.raises(ValueError, match="boom"), tracing.Tracer("t").span("failing", a=1, b=None):
        raise ValueError("boom")
    (span,) = exporter.get_finished_spans()
    assert span.name == "failing"
    assert dict(span.attributes or {}) == {"a": 1}
    assert not span.status.is_ok
    assert [event.name for event in span.events] == ["exception"]


def test_without_opentelemetrys_global_its_public_check_decides(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A release of opentelemetry-api without the module global the fast check reads.
    stand_in = SimpleNamespace(
        get_tracer_provider=trace.get_tracer_provider,
        ProxyTracerProvider=trace.ProxyTracerProvider,
        get_tracer=trace.get_tracer,
    )
    monkeypatch.setattr(tracing, "_otel", stand_in)
    exporter.clear()
    with tracing.Tracer("t").span("made"):
        pass
    assert [span.name for span in exporter.get_finished_spans()] == ["made"]


def test_a_provider_that_fails_to_load_leaves_spans_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "no-such-provider")
    tracer = tracing.Tracer("t")  # OpenTelemetry logs the failure
    with tracer.span("nowhere"):
        pass
    assert trace._TRACER_PROVIDER is None
