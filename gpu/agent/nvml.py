"""GPU samples through NVML (nvidia-ml-py); a node without an NVIDIA driver simply has no GPUs to report.

Each figure NVML cannot give for a device (NOT_SUPPORTED on some boards, e.g. ECC or power on
consumer GPUs) is reported as 0 rather than failing the whole sample.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml
from far.gpu.v1 import node_pb2, telemetry_pb2

T = TypeVar("T")


def _or_zero(read: Callable[[], T], zero: T) -> T:
    try:
        return read()
    except pynvml.NVMLError:
        return zero


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlSampler:
    """NVML, initialised once; `open()` returns None where there is no driver or no GPU."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    @classmethod
    def open(cls) -> NvmlSampler | None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return None
        try:
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError:
            pynvml.nvmlShutdown()
            return None
        if not handles:
            pynvml.nvmlShutdown()
            return None
        return cls(handles)

    def close(self) -> None:
        pynvml.nvmlShutdown()

    def sample(self) -> list[telemetry_pb2.GpuSample]:
        return [self._sample(index, handle) for index, handle in enumerate(self._handles)]

    def inventory(self) -> list[node_pb2.GpuInventory]:
        """The node's GPUs grouped by model, as RegisterNode declares them."""
        groups: Counter[tuple[str, int]] = Counter(
            (sample.model_name, sample.memory_total_bytes) for sample in self.sample()
        )
        return [
            node_pb2.GpuInventory(model_name=name, memory_bytes=memory, count=count)
            for (name, memory), count in sorted(groups.items())
        ]

    @staticmethod
    def _sample(index: int, handle: Any) -> telemetry_pb2.GpuSample:
        memory = _or_zero(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle), None)
        return telemetry_pb2.GpuSample(
            index=index,
            uuid=_text(_or_zero(lambda: pynvml.nvmlDeviceGetUUID(handle), "")),
            model_name=_text(_or_zero(lambda: pynvml.nvmlDeviceGetName(handle), "")),
            utilization_percent=float(_or_zero(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, 0)),
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            memory_total_bytes=int(memory.total) if memory is not None else 0,
            temperature_celsius=float(
                _or_zero(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU), 0)
            ),
            power_watts=_or_zero(lambda: pynvml.nvmlDeviceGetPowerUsage(handle), 0) / 1000.0,
            power_limit_watts=_or_zero(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle), 0) / 1000.0,
            uncorrected_ecc_errors=int(
                _or_zero(
                    lambda: pynvml.nvmlDeviceGetTotalEccErrors(
                        handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                    ),
                    0,
                )
            ),
        )
