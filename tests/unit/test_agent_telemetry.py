"""gpu.agent.telemetry and gpu.agent.nvml where no Triton answers and no NVIDIA driver is present."""

from __future__ import annotations

import psutil
import pynvml
from tritonclient.grpc.aio import InferenceServerClient

from devstack.processes import free_port
from gpu.agent import AGENT_VERSION
from gpu.agent.nvml import NvmlSampler
from gpu.agent.telemetry import TelemetryCollector


def nvml_has_gpus() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return bool(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def test_nvml_sampler_exists_exactly_when_nvml_sees_gpus() -> None:
    sampler = NvmlSampler.open()
    try:
        assert (sampler is not None) == nvml_has_gpus()
        if sampler is not None:
            samples = sampler.sample()
            assert [s.index for s in samples] == list(range(len(samples)))
            assert sum(g.count for g in sampler.inventory()) == len(samples)
    finally:
        if sampler is not None:
            sampler.close()


async def test_report_goes_out_with_triton_down_as_not_live() -> None:
    port = free_port()  # nothing listens there
    client = InferenceServerClient(f"127.0.0.1:{port}")
    try:
        collector = TelemetryCollector(client, f"http://127.0.0.1:{port}/metrics", gpus=None)
        report = await collector.report(7)
    finally:
        await client.close()
    assert report.sequence == 7
    assert report.sample_time.seconds > 0
    assert report.agent_version == AGENT_VERSION
    assert not report.triton.live
    assert not report.triton.ready
    assert list(report.triton.models) == []
    assert list(report.gpus) == []
    assert report.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < report.memory_used_bytes <= report.memory_total_bytes
    assert 0.0 <= report.cpu_utilization_percent <= 100.0
