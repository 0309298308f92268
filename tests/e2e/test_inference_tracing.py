"""One trace across Envoy -> inference -> Triton: a Generate call through the edge, with the caller's W3C
`traceparent`, leaves spans of the same trace in Envoy (OpenTelemetry tracer), the inference server (its RPC span
and the Triton call) and Triton (its OpenTelemetry mode), each the child of the one before.

A small stack of its own: a traced tritonserver named by INFERENCE_STATIC_NODES (no gpu service, no chain: the
model is free in this catalog) and the inference server behind Envoy, all exporting to an in-test OTLP collector
(tests/e2e/trace_collector.py) over OTLP/gRPC (Envoy, the server) and OTLP/HTTP (Triton).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from far.inference.v1 import inference_service_pb2 as pb
from far.inference.v1 import inference_service_pb2_grpc, job_pb2

from devstack.stack import Stack, run_migrations
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess
from tests.conftest import wallet
from tests.e2e.trace_collector import ReceivedSpan, TraceCollector, trace_collector

pytestmark = pytest.mark.e2e

# Span batches leave Envoy, the SDK and Triton every few seconds (5 s by default; 0.5 s for the server here).
SPANS_WAIT_S = 20.0


@pytest.fixture(scope="module")
def collector() -> Iterator[TraceCollector]:
    with trace_collector() as running:
        yield running


@pytest.fixture(scope="module")
def traced(
    isolated_env: Callable[[str], dict[str, str]], collector: TraceCollector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("traced-inference")
    triton = TritonProcess.start(
        MODEL_REPOSITORY,
        run_dir / "triton",
        load_models=[CHAT_MODEL],
        env={"FAR_LLAMA_SLOTS": "1"},
        trace_url=collector.http_traces_url,
    )
    try:
        catalog = run_dir / "models.json"
        catalog.write_text(
            json.dumps([{"id": CHAT_MODEL, "context_length": 2048, "max_output_tokens": 256, "free": True}])
        )
        env = {
            **isolated_env("traced"),
            "BSC_RPC_URL": "",
            "INFERENCE_MODELS_FILE": str(catalog),
            "INFERENCE_STATIC_NODES": f"{CHAT_MODEL}=traced@{triton.grpc_url}",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.grpc_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        }
        run_migrations(["inference"], env, log_path=run_dir / "migrations.log")
        with Stack(["inference"], env=env, run_dir=run_dir / "stack", metrics=False) as stack:
            yield stack
    finally:
        triton.stop()


def spans_of(collector: TraceCollector, trace_id: str) -> list[ReceivedSpan]:
    """The trace's spans once the edge's span and Triton's request span (its last to end, so in its last
    batch) under the server's Triton call are in; by the deadline, whatever came."""
    deadline = time.monotonic() + SPANS_WAIT_S
    while True:
        spans = collector.of_trace(trace_id)
        calls = {s.span_id for s in spans if s.service == "far-inference" and s.name == "triton.generate"}
        edge = any(s.service == "far-edge" for s in spans)
        triton_request = any(s.service == "triton" and s.parent_span_id in calls for s in spans)
        if (edge and triton_request) or time.monotonic() > deadline:
            return spans
        time.sleep(0.25)


def test_one_trace_from_the_edge_into_triton(
    traced: Stack, collector: TraceCollector, make_token: Callable[..., str]
) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    request = pb.GenerateRequest(model=f"models/{CHAT_MODEL}", max_tokens=4)
    request.chat.messages.add(role=job_pb2.ChatMessage.ROLE_USER, content="Say hi.")
    request.sampling.temperature = 0.0
    metadata = (
        ("authorization", f"Bearer {make_token(wallet(0x7ACE), ('user',))}"),
        ("traceparent", f"00-{trace_id}-{caller_span}-01"),
    )
    with grpc.insecure_channel(traced.envoy_grpc_target) as channel:
        responses = list(inference_service_pb2_grpc.InferenceServiceStub(channel).Generate(request, metadata=metadata))
    assert responses[-1].final.state == job_pb2.Job.STATE_SUCCEEDED, responses[-1]

    spans = spans_of(collector, trace_id)
    by_id = {s.span_id: s for s in spans}
    assert {s.service for s in spans} >= {"far-edge", "far-inference", "triton"}, spans

    def parent(span: ReceivedSpan) -> ReceivedSpan | None:
        return by_id.get(span.parent_span_id)

    # The edge continues the caller's trace; the server's RPC span is the edge's child; the Triton call is a
    # child of the RPC span; Triton's request span is the child of that call.
    (edge,) = [s for s in spans if s.service == "far-edge" and s.parent_span_id == caller_span]
    (rpc,) = [s for s in spans if s.service == "far-inference" and parent(s) is edge]
    (call,) = [s for s in spans if s.name == "triton.generate" and s.service == "far-inference"]
    ancestors = []
    node: ReceivedSpan | None = call
    while node is not None:
        ancestors.append(node)
        node = parent(node)
    assert rpc in ancestors, [(s.service, s.name) for s in ancestors]
    triton_roots = [s for s in spans if s.service == "triton" and parent(s) is call]
    assert triton_roots, [(s.service, s.name, s.parent_span_id) for s in spans]
