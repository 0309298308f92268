"""Telemetry reports: validation, the summary the registry keeps, and the values the history stores.

Series keys name one time series: `<metric number>` for node metrics, `<metric>/<gpu index>` for GPU
metrics, `<metric>/<model>/<version>` for model metrics (model names never contain `/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from far.gpu.v1 import node_pb2, telemetry_pb2

MAX_CLOCK_OFFSET = timedelta(minutes=5)
MAX_GPUS = 64
MAX_MODELS = 256
READY = node_pb2.MODEL_STATE_READY
LOADING = node_pb2.MODEL_STATE_LOADING
M = telemetry_pb2.TelemetryMetric


@dataclass(frozen=True)
class ServingModel:
    model: str
    version: int
    active_requests: int
    pending_requests: int


@dataclass(frozen=True)
class ReportSummary:
    """What the registry keeps of the last accepted report, and what liveness and placement read."""

    received_time: datetime
    healthy: bool
    problem: str
    loaded_models: list[dict[str, object]]
    ready: list[ServingModel]
    max_free_memory_bytes: int | None
    mean_gpu_utilization: float
    gpus: list[dict[str, object]]
    agent_version: str
    triton_version: str

    @property
    def ready_model_names(self) -> list[str]:
        return sorted({m.model for m in self.ready})

    @property
    def busy(self) -> bool:
        return any(m.active_requests or m.pending_requests for m in self.ready)


def report_problem(report: telemetry_pb2.TelemetryReport, *, after_sequence: int, now: datetime) -> str:
    """Why a report is not accepted ("" when it is)."""
    if report.sequence <= after_sequence:
        return f"sequence {report.sequence} is not after {after_sequence}"
    if not report.HasField("sample_time"):
        return "sample_time is required"
    offset = report.sample_time.ToDatetime(tzinfo=now.tzinfo) - now
    if abs(offset) > MAX_CLOCK_OFFSET:
        return f"sample_time is {abs(offset.total_seconds()) / 60:.1f} minutes off the service's clock"
    if len(report.gpus) > MAX_GPUS:
        return f"more than {MAX_GPUS} GPUs"
    if len(report.triton.models) > MAX_MODELS:
        return f"more than {MAX_MODELS} models"
    if len(report.agent_version) > 64:
        return "agent_version is longer than 64 characters"
    return ""


def summarize(report: telemetry_pb2.TelemetryReport, now: datetime) -> ReportSummary:
    triton = report.triton
    problems = []
    if not triton.live or not triton.ready:
        problems.append("Triton is not live and ready")
    failing = [gpu.index for gpu in report.gpus if gpu.uncorrected_ecc_errors > 0]
    if failing:
        problems.append(f"uncorrected ECC errors on GPU {', '.join(map(str, failing))}")
    inventory: dict[tuple[str, int], int] = {}
    for gpu in report.gpus:
        key = (gpu.model_name, gpu.memory_total_bytes)
        inventory[key] = inventory.get(key, 0) + 1
    free = [max(0, gpu.memory_total_bytes - gpu.memory_used_bytes) for gpu in report.gpus]
    utilization = [gpu.utilization_percent for gpu in report.gpus]
    return ReportSummary(
        received_time=now,
        healthy=not problems,
        problem="; ".join(problems),
        loaded_models=[
            {
                "model": m.model,
                "version": m.version,
                "state": int(m.state),
                "message": m.state_message[:500],
                "active": m.active_requests,
                "pending": m.pending_requests,
            }
            for m in triton.models
        ],
        ready=[
            ServingModel(m.model, m.version, m.active_requests, m.pending_requests)
            for m in triton.models
            if m.state == READY
        ],
        max_free_memory_bytes=max(free) if free else None,
        mean_gpu_utilization=sum(utilization) / len(utilization) if utilization else 0.0,
        gpus=[
            {"model_name": name, "memory_bytes": memory, "count": count}
            for (name, memory), count in sorted(inventory.items())
        ],
        agent_version=report.agent_version,
        triton_version=triton.version,
    )


@dataclass
class RateTracker:
    """The previous report's cumulative model counters, to turn them into per-second rates."""

    previous: dict[tuple[str, int], tuple[float, telemetry_pb2.ModelStats]] = field(default_factory=dict)

    def values(self, report: telemetry_pb2.TelemetryReport) -> dict[str, float]:
        """Every series value of one report (rates only where a previous report of the same load exists)."""
        values: dict[str, float] = {
            f"{M.TELEMETRY_METRIC_CPU_UTILIZATION_PERCENT}": report.cpu_utilization_percent,
            f"{M.TELEMETRY_METRIC_MEMORY_USED_BYTES}": float(report.memory_used_bytes),
        }
        for gpu in report.gpus:
            for metric, value in (
                (M.TELEMETRY_METRIC_GPU_UTILIZATION_PERCENT, gpu.utilization_percent),
                (M.TELEMETRY_METRIC_GPU_MEMORY_USED_BYTES, float(gpu.memory_used_bytes)),
                (M.TELEMETRY_METRIC_GPU_MEMORY_TOTAL_BYTES, float(gpu.memory_total_bytes)),
                (M.TELEMETRY_METRIC_GPU_TEMPERATURE_CELSIUS, gpu.temperature_celsius),
                (M.TELEMETRY_METRIC_GPU_POWER_WATTS, gpu.power_watts),
            ):
                values[f"{metric}/{gpu.index}"] = value
        at = report.sample_time.ToNanoseconds() / 1e9
        current: dict[tuple[str, int], tuple[float, telemetry_pb2.ModelStats]] = {}
        for stats in report.triton.models:
            key = (stats.model, stats.version)
            suffix = f"/{stats.model}/{stats.version}"
            current[key] = (at, stats)
            if stats.state != READY:
                continue
            values[f"{M.TELEMETRY_METRIC_MODEL_PENDING_REQUESTS}{suffix}"] = float(stats.pending_requests)
            values[f"{M.TELEMETRY_METRIC_MODEL_ACTIVE_REQUESTS}{suffix}"] = float(stats.active_requests)
            before = self.previous.get(key)
            if before is None:
                continue
            elapsed = at - before[0]
            done = stats.inference_count - before[1].inference_count
            if elapsed <= 0 or done < 0 or stats.failure_count < before[1].failure_count:
                continue  # a reload resets Triton's counters: no rate across it
            earlier = before[1]
            failed = stats.failure_count - earlier.failure_count
            queue_ns = (
                stats.cumulative_queue_duration.ToNanoseconds() - earlier.cumulative_queue_duration.ToNanoseconds()
            )
            compute_ns = (
                stats.cumulative_compute_duration.ToNanoseconds() - earlier.cumulative_compute_duration.ToNanoseconds()
            )
            values[f"{M.TELEMETRY_METRIC_MODEL_INFERENCES_PER_SECOND}{suffix}"] = done / elapsed
            values[f"{M.TELEMETRY_METRIC_MODEL_FAILURES_PER_SECOND}{suffix}"] = failed / elapsed
            if done > 0:
                values[f"{M.TELEMETRY_METRIC_MODEL_QUEUE_TIME_MS}{suffix}"] = queue_ns / done / 1e6
                values[f"{M.TELEMETRY_METRIC_MODEL_COMPUTE_TIME_MS}{suffix}"] = compute_ns / done / 1e6
        self.previous = current
        return values
