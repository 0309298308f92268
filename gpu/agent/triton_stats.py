"""Triton's health and per-model statistics as a TritonStats: its repository index plus its Prometheus metrics.

The index says which model versions exist and their states; the metrics text (`/metrics`, per
`{model, version}` label pair) gives the cumulative counters and the queue gauge. Triton has no metric
for the open response streams of a decoupled model (its `execute` returns at once and generation goes
on in threads), so `active_requests` is the sum of the model's own gauges in ACTIVE_REQUESTS_METRICS
(Python backend custom metrics of the platform's LLM models: requests generating, plus requests waiting
inside the model for a free generation slot), and 0 for a model that exports none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from far.gpu.v1 import node_pb2, telemetry_pb2
from google.protobuf.duration_pb2 import Duration
from prometheus_client.parser import text_string_to_metric_families

ACTIVE_REQUESTS_METRICS = ("far_llm_slots_busy", "far_llm_requests_waiting")
COMPUTE_METRICS = (
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
INDEX_STATES = {
    "READY": node_pb2.MODEL_STATE_READY,
    "LOADING": node_pb2.MODEL_STATE_LOADING,
    "UNLOADING": node_pb2.MODEL_STATE_UNLOADING,
    "UNAVAILABLE": node_pb2.MODEL_STATE_UNAVAILABLE,
}

ModelKey = tuple[str, int]


@dataclass
class ModelCounters:
    """One model version's figures from Triton's metrics: counters cumulative since load, gauges now."""

    success_count: int = 0
    failure_count: int = 0
    execution_count: int = 0
    queue_us: int = 0
    compute_us: int = 0
    pending_requests: int = 0
    active_requests: int = 0


@dataclass(frozen=True)
class IndexEntry:
    """One row of Triton's model repository index."""

    model: str
    version: int
    state: str
    reason: str


def parse_metrics(text: str) -> dict[ModelKey, ModelCounters]:
    """Per-model-version counters from Triton's Prometheus text; samples without model/version labels are skipped."""
    counters: dict[ModelKey, ModelCounters] = {}
    for family in text_string_to_metric_families(text):
        # Match on the family: the parser names counter samples `<family>_total`, Triton's names lack it.
        for sample in family.samples:
            model, version = sample.labels.get("model"), sample.labels.get("version", "")
            if not model or not version.isdigit():
                continue
            entry = counters.setdefault((model, int(version)), ModelCounters())
            value = int(sample.value)
            match family.name:
                case "nv_inference_request_success":
                    entry.success_count += value
                case "nv_inference_request_failure":
                    entry.failure_count += value  # one sample per failure reason
                case "nv_inference_exec_count":
                    entry.execution_count += value
                case "nv_inference_queue_duration_us":
                    entry.queue_us += value
                case "nv_inference_pending_request_count":
                    entry.pending_requests += value
                case name if name in ACTIVE_REQUESTS_METRICS:
                    entry.active_requests += value
                case name if name in COMPUTE_METRICS:
                    entry.compute_us += value
    return counters


def index_entries(models: Iterable[object]) -> list[IndexEntry]:
    """Rows of a RepositoryIndexResponse's `models` that name a version (never-loaded models name none)."""
    entries = []
    for row in models:
        version = str(getattr(row, "version", ""))
        if version.isdigit():
            entries.append(
                IndexEntry(
                    model=str(getattr(row, "name", "")),
                    version=int(version),
                    state=str(getattr(row, "state", "")),
                    reason=str(getattr(row, "reason", "")),
                )
            )
    return entries


def _micros(value: int) -> Duration:
    duration = Duration()
    duration.FromMicroseconds(value)
    return duration


def model_stats(
    index: Iterable[IndexEntry],
    counters: Mapping[ModelKey, ModelCounters],
    placement_errors: Mapping[str, str] = {},
) -> list[telemetry_pb2.ModelStats]:
    """One ModelStats per indexed model version, plus an UNAVAILABLE entry for each model placement failed to
    load that Triton's index does not list at all (e.g. not in the repository), carrying the error."""
    stats: list[telemetry_pb2.ModelStats] = []
    listed: set[str] = set()
    for entry in sorted(index, key=lambda e: (e.model, e.version)):
        listed.add(entry.model)
        figures = counters.get((entry.model, entry.version), ModelCounters())
        state = INDEX_STATES.get(entry.state, node_pb2.MODEL_STATE_UNSPECIFIED)
        message = entry.reason
        if state != node_pb2.MODEL_STATE_READY and entry.model in placement_errors:
            message = message or placement_errors[entry.model]
        stats.append(
            telemetry_pb2.ModelStats(
                model=entry.model,
                version=entry.version,
                state=state,
                state_message=message,
                inference_count=figures.success_count + figures.failure_count,
                failure_count=figures.failure_count,
                execution_count=figures.execution_count,
                cumulative_queue_duration=_micros(figures.queue_us),
                cumulative_compute_duration=_micros(figures.compute_us),
                pending_requests=figures.pending_requests,
                active_requests=figures.active_requests,
            )
        )
    for model, error in sorted(placement_errors.items()):
        if model not in listed:
            stats.append(
                telemetry_pb2.ModelStats(model=model, state=node_pb2.MODEL_STATE_UNAVAILABLE, state_message=error)
            )
    return stats
