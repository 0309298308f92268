"""QueryTelemetry's rules: validation, the interval, series selection and downsampling (avg/min/max/last/p95)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from far.gpu.v1 import telemetry_pb2

from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.validation import Violations
from servers.gpu.telemetry_store import RETENTION_DAYS, TelemetryStore

M = telemetry_pb2.TelemetryMetric
A = telemetry_pb2.Aggregation
GPU_METRICS = frozenset(range(M.TELEMETRY_METRIC_GPU_UTILIZATION_PERCENT, M.TELEMETRY_METRIC_GPU_POWER_WATTS + 1))
MODEL_METRICS = frozenset(
    range(M.TELEMETRY_METRIC_MODEL_INFERENCES_PER_SECOND, M.TELEMETRY_METRIC_MODEL_ACTIVE_REQUESTS + 1)
)
KNOWN_METRICS = frozenset(M.values()) - {M.TELEMETRY_METRIC_UNSPECIFIED}
MAX_METRICS = 20
MAX_POINTS = 10_000
AUTO_POINTS_PER_SERIES = 500
MIN_INTERVAL_S = 10
MAX_INTERVAL_S = 86_400


@dataclass(frozen=True)
class HistoryQuery:
    start: datetime | None
    end: datetime | None
    metrics: tuple[int, ...]
    interval: timedelta | None = None
    aggregation: int = A.AGGREGATION_UNSPECIFIED
    gpu_indexes: tuple[int, ...] = ()
    models: tuple[str, ...] = ()


@dataclass
class Series:
    metric: int
    gpu_index: int | None = None
    model: str = ""
    model_version: int = 0
    points: list[tuple[int, float]] = field(default_factory=list)  # (interval start in ms, value)

    @property
    def order(self) -> tuple[int, int, str, int]:
        return (self.metric, -1 if self.gpu_index is None else self.gpu_index, self.model, self.model_version)


def _nearest_rank_p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


AGGREGATIONS: Mapping[int, Callable[[list[float]], float]] = {
    A.AGGREGATION_UNSPECIFIED: lambda values: sum(values) / len(values),
    A.AGGREGATION_MEAN: lambda values: sum(values) / len(values),
    A.AGGREGATION_MIN: min,
    A.AGGREGATION_MAX: max,
    A.AGGREGATION_LAST: lambda values: values[-1],
    A.AGGREGATION_P95: _nearest_rank_p95,
}


def _parse_key(key: str) -> tuple[int, int | None, str, int] | None:
    """(metric, gpu index, model, version) of a series key; None for keys this version does not know."""
    parts = key.split("/")
    try:
        metric = int(parts[0])
        if len(parts) == 1:
            return metric, None, "", 0
        if len(parts) == 2:
            return metric, int(parts[1]), "", 0
        if len(parts) == 3:
            return metric, None, parts[1], int(parts[2])
    except ValueError:
        return None
    return None


class History:
    def __init__(
        self,
        store: TelemetryStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        retention_days: int = RETENTION_DAYS,
    ) -> None:
        self.store = store
        self._clock = clock
        self.retention_days = retention_days

    async def record(self, node_id: str, time_ms: int, values: Mapping[str, float]) -> None:
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        await self.store.record(node_id, time_ms, finite)

    async def prune(self) -> None:
        oldest = self._clock() - timedelta(days=self.retention_days)
        await self.store.prune(int(oldest.timestamp() * 1000))

    def _checked(self, query: HistoryQuery) -> tuple[datetime, datetime, int]:
        v = Violations()
        if query.start is None:
            v.add("start_time", "is required")
        end = query.end or self._clock()
        if query.start is not None and end < query.start:
            v.add("end_time", "must not be before start_time")
        if not query.metrics:
            v.add("metrics", "name at least one metric")
        if len(query.metrics) > MAX_METRICS:
            v.add("metrics", f"at most {MAX_METRICS} metrics")
        if len(set(query.metrics)) != len(query.metrics):
            v.add("metrics", "must be distinct")
        for index, metric in enumerate(query.metrics):
            if metric not in KNOWN_METRICS:
                v.add(f"metrics[{index}]", "is not a telemetry metric")
        if query.aggregation not in AGGREGATIONS:
            v.add("aggregation", "is not an aggregation")
        interval_s = 0
        if query.interval is not None:
            seconds = query.interval.total_seconds()
            if seconds != int(seconds) or not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
                v.add("interval", "must be a whole number of seconds from 10 seconds to 1 day")
            interval_s = int(seconds)
        v.raise_if_any()
        assert query.start is not None
        range_s = (end - query.start).total_seconds()
        if not interval_s:
            interval_s = max(MIN_INTERVAL_S, math.ceil(range_s / AUTO_POINTS_PER_SERIES / 10) * 10)
        if len(query.metrics) * math.ceil(range_s / interval_s) > MAX_POINTS:
            raise too_many_points()
        return query.start, end, interval_s

    async def query(self, node_id: str, query: HistoryQuery) -> tuple[list[Series], int]:
        """The node's series for the query, downsampled, and the interval used in seconds."""
        start, end, interval_s = self._checked(query)
        start_ms, end_ms, interval_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000), interval_s * 1000
        wanted = set(query.metrics)
        gpus, models = set(query.gpu_indexes), set(query.models)
        buckets: dict[tuple[int, int | None, str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for sample in await self.store.samples(node_id, start_ms, end_ms):
            bucket = start_ms + (sample.time_ms - start_ms) // interval_ms * interval_ms
            for key, value in sample.values.items():
                parsed = _parse_key(key)
                if parsed is None or parsed[0] not in wanted:
                    continue
                metric, gpu_index, model, _ = parsed
                if gpus and metric in GPU_METRICS and gpu_index not in gpus:
                    continue
                if models and metric in MODEL_METRICS and model not in models:
                    continue
                buckets[parsed][bucket].append(value)
        aggregate = AGGREGATIONS[query.aggregation]
        series = [
            Series(metric, gpu_index, model, version, [(t, aggregate(values)) for t, values in sorted(points.items())])
            for (metric, gpu_index, model, version), points in buckets.items()
        ]
        series.sort(key=lambda s: s.order)
        if sum(len(s.points) for s in series) > MAX_POINTS:
            raise too_many_points()
        return series, interval_s


def too_many_points() -> InvalidArgument:
    return InvalidArgument(
        f"the answer would exceed {MAX_POINTS} points; ask for a larger interval, fewer metrics or a shorter range",
        reason="TOO_MANY_POINTS",
        violations=[
            FieldViolation("interval", f"gives more than {MAX_POINTS} points for this range and these metrics")
        ],
    )
