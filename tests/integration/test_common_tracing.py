"""OpenTelemetry: a server span per RPC, continuing the caller's W3C trace context."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import wrappers_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from servers.common.interceptors import ErrorInterceptor, ObservabilityInterceptor, RequestIdInterceptor
from tests.integration.test_common_interceptors import PROBE, ProbeServicer, handlers

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture(scope="module")
async def channel(spans: InMemorySpanExporter) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(
        interceptors=[RequestIdInterceptor(), ObservabilityInterceptor(tracing=True), ErrorInterceptor("probe")]
    )
    server.add_generic_rpc_handlers((handlers(ProbeServicer()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        await server.stop(None)


class TestTracing:
    async def test_server_span_continues_the_callers_trace(
        self, channel: grpc.aio.Channel, spans: InMemorySpanExporter
    ) -> None:
        spans.clear()
        call = channel.unary_unary(
            f"/{PROBE}/Whoami",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        await call(
            wrappers_pb2.StringValue(value="x"),
            metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),),
        )
        (span,) = spans.get_finished_spans()
        assert span.name == f"/{PROBE}/Whoami"
        assert span.kind == trace.SpanKind.SERVER
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None
        assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID

    async def test_a_call_without_trace_context_starts_a_new_trace(
        self, channel: grpc.aio.Channel, spans: InMemorySpanExporter
    ) -> None:
        spans.clear()
        call = channel.unary_unary(
            f"/{PROBE}/Whoami",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        await call(wrappers_pb2.StringValue(value="x"))
        (span,) = spans.get_finished_spans()
        assert span.parent is None
        assert format(span.context.trace_id, "032x") != TRACE_ID

    async def test_server_streams_are_traced_too(self, channel: grpc.aio.Channel, spans: InMemorySpanExporter) -> None:
        spans.clear()
        call = channel.unary_stream(
            f"/{PROBE}/Count",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        replies = [r.value async for r in call(wrappers_pb2.StringValue(value="n"))]
        assert replies == ["n-0", "n-1", "n-2"]
        (span,) = spans.get_finished_spans()
        assert span.name == f"/{PROBE}/Count"
