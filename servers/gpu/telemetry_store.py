"""Telemetry history: where each accepted report's values go, and how a range of them comes back.

A store keeps one record per report: the node id, the sample time in milliseconds, and a map of series
keys (see `servers.gpu.reports`) to values. Downsampling happens above the store (`servers.gpu.history`),
so both implementations answer every query the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

RETENTION_DAYS = 30


@dataclass(frozen=True)
class Sample:
    time_ms: int
    values: Mapping[str, float]


class TelemetryStore(Protocol):
    """PostgreSQL (`telemetry_postgres`) by default; DynamoDB (`telemetry_dynamodb`) when configured."""

    async def record(self, node_id: str, time_ms: int, values: Mapping[str, float]) -> None:
        """Keep one report's values (a second record at the same millisecond is ignored)."""
        ...

    async def samples(self, node_id: str, start_ms: int, end_ms: int) -> list[Sample]:
        """The node's records with `start_ms <= time_ms < end_ms`, oldest first."""
        ...

    async def prune(self, before_ms: int) -> None:
        """Drop records older than `before_ms` (stores that expire records by themselves do nothing)."""
        ...

    async def close(self) -> None: ...
