"""A small OTLP trace collector for tests: OTLP/gRPC (Envoy, the services) and OTLP/HTTP (Triton) on free ports.

It keeps every span it receives, with the `service.name` of the resource that sent it, so a test can follow one
trace across processes. Real OTLP on the wire: the senders are the real exporters (Envoy's OpenTelemetry tracer,
the OpenTelemetry SDK's exporter, Triton's), only the receiving end is ours.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from devstack.processes import free_port


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int


class _Spans:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        found: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                        )
                    )
        with self._lock:
            self.spans.extend(found)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, spans: _Spans) -> None:
        self._spans = spans

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._spans.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _ids_as_base64(document: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex (Triton sends JSON); protobuf's JSON form of bytes is base64."""
    if isinstance(document, list):
        return [_ids_as_base64(item) for item in document]
    if isinstance(document, dict):
        return {
            key: base64.b64encode(bytes.fromhex(value)).decode()
            if key in _ID_FIELDS and isinstance(value, str)
            else _ids_as_base64(value)
            for key, value in document.items()
        }
    return document


def _http_handler(spans: _Spans) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            request = trace_service_pb2.ExportTraceServiceRequest()
            if "json" in (self.headers.get("content-type") or ""):
                json_format.ParseDict(_ids_as_base64(json.loads(body)), request, ignore_unknown_fields=True)
            else:
                request.ParseFromString(body)
            spans.add(request)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@dataclass(frozen=True)
class TraceCollector:
    grpc_endpoint: str
    """`http://127.0.0.1:<port>`: what OTEL_EXPORTER_OTLP_ENDPOINT takes (OTLP/gRPC)."""
    http_traces_url: str
    """`127.0.0.1:<port>/v1/traces`: Triton's `opentelemetry,url=` (OTLP/HTTP)."""
    _spans: _Spans

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return self._spans.of_trace(trace_id)


@contextmanager
def trace_collector(host: str = "127.0.0.1") -> Iterator[TraceCollector]:
    spans = _Spans()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(spans), server)
    grpc_port = server.add_insecure_port(f"{host}:0")
    server.start()
    http = ThreadingHTTPServer((host, free_port(host)), _http_handler(spans))
    thread = threading.Thread(target=http.serve_forever, name="otlp-http", daemon=True)
    thread.start()
    try:
        yield TraceCollector(f"http://{host}:{grpc_port}", f"{host}:{http.server_address[1]}/v1/traces", spans)
    finally:
        http.shutdown()
        http.server_close()
        server.stop(grace=None)
