"""One TelemetryReport: the host (psutil), the GPUs (NVML, when there are any) and Triton, sampled together.

A Triton that does not answer is reported as not live and not ready with no models, which is what
makes the service mark the node UNHEALTHY; the report itself still goes out on time.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import psutil
import structlog
from far.gpu.v1 import telemetry_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from gpu.agent import AGENT_VERSION
from gpu.agent.nvml import NvmlSampler
from gpu.agent.triton_stats import index_entries, model_stats, parse_metrics

log = structlog.get_logger("gpu.agent.telemetry")

TRITON_TIMEOUT_S = 5.0


def _read_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TRITON_TIMEOUT_S) as response:  # noqa: S310 - URL from config
        body: bytes = response.read()
    return body.decode()


class TelemetryCollector:
    def __init__(
        self,
        triton: InferenceServerClient,
        metrics_url: str,
        gpus: NvmlSampler | None,
        placement_errors: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self._triton = triton
        self._metrics_url = metrics_url
        self._gpus = gpus
        self._placement_errors = placement_errors
        psutil.cpu_percent(interval=None)  # the first call only starts psutil's measuring period

    async def triton_stats(self) -> telemetry_pb2.TritonStats:
        try:
            live = bool(await self._triton.is_server_live(client_timeout=TRITON_TIMEOUT_S))
            ready = bool(await self._triton.is_server_ready(client_timeout=TRITON_TIMEOUT_S))
            metadata = await self._triton.get_server_metadata(client_timeout=TRITON_TIMEOUT_S)
            index = await self._triton.get_model_repository_index(client_timeout=TRITON_TIMEOUT_S)
        except InferenceServerException as exc:
            log.warning("triton_unreachable", error=str(exc))
            return telemetry_pb2.TritonStats(live=False, ready=False)
        try:
            counters = parse_metrics(await asyncio.to_thread(_read_text, self._metrics_url))
        except (OSError, ValueError) as exc:
            log.warning("triton_metrics_unreadable", url=self._metrics_url, error=str(exc))
            counters = {}
        return telemetry_pb2.TritonStats(
            live=live,
            ready=ready,
            version=str(metadata.version),
            models=model_stats(index_entries(index.models), counters, self._placement_errors()),
        )

    async def report(self, sequence: int) -> telemetry_pb2.TelemetryReport:
        sample_time = Timestamp()
        sample_time.FromDatetime(datetime.now(UTC))
        memory = psutil.virtual_memory()
        return telemetry_pb2.TelemetryReport(
            sequence=sequence,
            sample_time=sample_time,
            gpus=self._gpus.sample() if self._gpus else [],
            cpu_utilization_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            triton=await self.triton_stats(),
            agent_version=AGENT_VERSION,
        )
