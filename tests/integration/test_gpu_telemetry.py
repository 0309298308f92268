"""Telemetry history: the same cases against the PostgreSQL store and the DynamoDB store (moto's server as the
stand-in for AWS, through the same aioboto3 client code), downsampling, and QueryTelemetry end to end."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aioboto3
import grpc
import pytest
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, telemetry_pb2
from google.protobuf import duration_pb2

from servers.common.config import Env
from servers.common.db import Database
from servers.common.errors import InvalidArgument
from servers.gpu.history import History, HistoryQuery
from servers.gpu.settings import GpuSettings
from servers.gpu.telemetry_dynamodb import DynamoTelemetryStore
from servers.gpu.telemetry_postgres import PostgresTelemetryStore
from servers.gpu.telemetry_store import RETENTION_DAYS, TelemetryStore
from tests.integration.gpu_support import (
    AgentStream,
    GpuStub,
    Operator,
    registered,
    report,
    running_gpu,
    ts,
)
from tests.integration.rich_errors import expect_error

M = telemetry_pb2.TelemetryMetric
A = telemetry_pb2.Aggregation
UTIL = M.TELEMETRY_METRIC_GPU_UTILIZATION_PERCENT
CPU = M.TELEMETRY_METRIC_CPU_UTILIZATION_PERCENT
IPS = M.TELEMETRY_METRIC_MODEL_INFERENCES_PER_SECOND
ACTIVE = M.TELEMETRY_METRIC_MODEL_ACTIVE_REQUESTS
TABLE = f"far-gpu-telemetry-{secrets.token_hex(4)}"
Auth = Callable[..., tuple[tuple[str, str], ...]]
pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgres", "dynamodb"])
async def store(request: pytest.FixtureRequest, migrated_database_url: str) -> AsyncIterator[TelemetryStore]:
    """Each store implementation in turn; the DynamoDB one creates its table on moto's server."""
    if request.param == "postgres":
        database = Database(migrated_database_url)
        try:
            yield PostgresTelemetryStore(database)
        finally:
            await database.close()
        return
    moto: dict[str, str] = request.getfixturevalue("moto_dynamodb")
    settings = GpuSettings.from_env(Env({**moto, "GPU_DYNAMODB_TABLE": TABLE})).telemetry
    assert settings.kind == "dynamodb"
    dynamo = await DynamoTelemetryStore.open(settings)
    try:
        yield dynamo
    finally:
        await dynamo.close()


def node_id() -> str:
    return f"n-{secrets.token_hex(5)}"


def start_ms() -> int:
    """A recent whole minute, so that interval buckets are easy to compute."""
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    return int(now.timestamp() * 1000)


class TestStore:
    async def test_a_range_is_start_inclusive_end_exclusive_oldest_first(self, store: TelemetryStore) -> None:
        node, other, t0 = node_id(), node_id(), start_ms()
        for k in reversed(range(6)):
            await store.record(node, t0 + k * 1000, {"6": float(k)})
        await store.record(other, t0 + 2000, {"6": 99.0})
        samples = await store.samples(node, t0 + 1000, t0 + 4000)
        assert [(s.time_ms, dict(s.values)) for s in samples] == [
            (t0 + 1000, {"6": 1.0}),
            (t0 + 2000, {"6": 2.0}),
            (t0 + 3000, {"6": 3.0}),
        ]
        assert await store.samples(node, t0 + 4000, t0 + 4000) == []

    async def test_a_second_record_at_the_same_time_keeps_the_first(self, store: TelemetryStore) -> None:
        node, t0 = node_id(), start_ms()
        await store.record(node, t0, {"6": 1.5, "1/0": 40.25})
        await store.record(node, t0, {"6": 7.0})
        [sample] = await store.samples(node, t0, t0 + 1)
        assert dict(sample.values) == {"6": 1.5, "1/0": 40.25}

    async def test_downsampling_per_series_and_aggregation(self, store: TelemetryStore) -> None:
        node, t0 = node_id(), start_ms()
        history = History(store)
        for k in range(6):  # every 5 s: two samples per 10 s interval
            await history.record(
                node,
                t0 + k * 5000,
                {f"{UTIL}/0": float(k + 1), f"{UTIL}/1": 10.0 * (k + 1), f"{CPU}": float("nan")},
            )
        start = datetime.fromtimestamp(t0 / 1000, UTC)

        async def points(aggregation: int, **filters: object) -> dict[int | None, list[tuple[int, float]]]:
            query = HistoryQuery(
                start=start,
                end=start + timedelta(seconds=30),
                metrics=(UTIL, CPU),
                interval=timedelta(seconds=10),
                aggregation=aggregation,
                **filters,  # type: ignore[arg-type]
            )
            series, interval_s = await history.query(node, query)
            assert interval_s == 10
            return {s.gpu_index: [(t - t0, v) for t, v in s.points] for s in series}

        buckets = (0, 10_000, 20_000)
        assert await points(A.AGGREGATION_MEAN) == {
            0: list(zip(buckets, (1.5, 3.5, 5.5), strict=True)),
            1: list(zip(buckets, (15.0, 35.0, 55.0), strict=True)),
        }
        assert (await points(A.AGGREGATION_MIN))[0] == list(zip(buckets, (1.0, 3.0, 5.0), strict=True))
        assert (await points(A.AGGREGATION_MAX))[1] == list(zip(buckets, (20.0, 40.0, 60.0), strict=True))
        assert (await points(A.AGGREGATION_LAST))[0] == list(zip(buckets, (2.0, 4.0, 6.0), strict=True))
        assert (await points(A.AGGREGATION_P95))[0] == list(zip(buckets, (2.0, 4.0, 6.0), strict=True))
        assert list(await points(A.AGGREGATION_MEAN, gpu_indexes=(1,))) == [1]

    async def test_too_many_points_and_the_chosen_interval(self, store: TelemetryStore) -> None:
        history = History(store)
        start = datetime.now(UTC) - timedelta(days=1)
        with pytest.raises(InvalidArgument) as too_many:
            await history.query(
                node_id(), HistoryQuery(start=start, end=None, metrics=(UTIL, CPU), interval=timedelta(seconds=10))
            )
        assert too_many.value.reason == "TOO_MANY_POINTS"
        _, chosen = await history.query(
            node_id(), HistoryQuery(start=start, end=start + timedelta(hours=2), metrics=(UTIL,))
        )
        assert chosen == 20  # the smallest multiple of 10 s giving at most 500 points per series


class TestDynamoRetention:
    async def test_the_table_is_created_with_ttl_and_items_expire_after_the_retention(
        self, moto_dynamodb: dict[str, str]
    ) -> None:
        table = f"far-gpu-telemetry-ttl-{secrets.token_hex(4)}"
        env = {**moto_dynamodb, "GPU_DYNAMODB_TABLE": table, "GPU_TELEMETRY_RETENTION_DAYS": "7"}
        settings = GpuSettings.from_env(Env(env)).telemetry
        dynamo = await DynamoTelemetryStore.open(settings)
        node, t0 = node_id(), start_ms() + 345  # not a whole second: the expiry is in whole seconds
        try:
            await dynamo.record(node, t0, {"6": 1.0})
            await dynamo.record(node, t0 + 60_000, {"6": 2.0})
        finally:
            await dynamo.close()
        # Read back through a client built the way the store builds its own.
        async with aioboto3.Session().client(
            "dynamodb", region_name=settings.dynamodb_region, endpoint_url=settings.dynamodb_endpoint
        ) as client:
            ttl = (await client.describe_time_to_live(TableName=table))["TimeToLiveDescription"]
            items = (
                await client.query(
                    TableName=table,
                    KeyConditionExpression="node_id = :node",
                    ExpressionAttributeValues={":node": {"S": node}},
                )
            )["Items"]
        assert (ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")) == ("ENABLED", "expires_at")
        assert [(int(i["t"]["N"]), int(i["expires_at"]["N"])) for i in items] == [
            (t0, t0 // 1000 + 7 * 86_400),
            (t0 + 60_000, (t0 + 60_000) // 1000 + 7 * 86_400),
        ]

    async def test_a_table_without_ttl_gets_it_when_the_store_opens(self, moto_dynamodb: dict[str, str]) -> None:
        # Made elsewhere, or by a start that died between create_table and update_time_to_live.
        table = f"far-gpu-telemetry-nottl-{secrets.token_hex(4)}"
        settings = GpuSettings.from_env(Env({**moto_dynamodb, "GPU_DYNAMODB_TABLE": table})).telemetry
        async with aioboto3.Session().client(
            "dynamodb", region_name=settings.dynamodb_region, endpoint_url=settings.dynamodb_endpoint
        ) as client:
            await client.create_table(
                TableName=table,
                AttributeDefinitions=[
                    {"AttributeName": "node_id", "AttributeType": "S"},
                    {"AttributeName": "t", "AttributeType": "N"},
                ],
                KeySchema=[{"AttributeName": "node_id", "KeyType": "HASH"}, {"AttributeName": "t", "KeyType": "RANGE"}],
                BillingMode="PAY_PER_REQUEST",
            )
            before = (await client.describe_time_to_live(TableName=table))["TimeToLiveDescription"]
            assert before.get("TimeToLiveStatus") == "DISABLED"
            await (await DynamoTelemetryStore.open(settings)).close()
            after = (await client.describe_time_to_live(TableName=table))["TimeToLiveDescription"]
        assert (after.get("TimeToLiveStatus"), after.get("AttributeName")) == ("ENABLED", "expires_at")


class TestPostgresPrune:
    async def test_records_before_the_cutoff_go_and_the_rest_stay(self, migrated_database_url: str) -> None:
        database = Database(migrated_database_url)
        store = PostgresTelemetryStore(database)
        node, other, t0 = node_id(), node_id(), start_ms() - 86_400_000  # a day ago: no other test's records
        try:
            for k in range(4):
                await store.record(node, t0 + k * 1000, {"6": float(k)})
            await store.record(other, t0 + 500, {"6": 9.0})
            await store.prune(t0 + 2000)
            assert [s.time_ms - t0 for s in await store.samples(node, t0, t0 + 10_000)] == [2000, 3000]
            assert await store.samples(other, t0, t0 + 10_000) == []  # every node's old records go
        finally:
            await database.close()

    async def test_history_prunes_what_is_older_than_the_retention(self, migrated_database_url: str) -> None:
        database = Database(migrated_database_url)
        store = PostgresTelemetryStore(database)
        now = datetime.now(UTC)
        node = node_id()

        def ms(ago: timedelta) -> int:
            return int((now - ago).timestamp() * 1000)

        retention = timedelta(days=RETENTION_DAYS)
        configured = timedelta(days=7)  # GPU_TELEMETRY_RETENTION_DAYS=7
        expired, kept, expired_if_7, kept_if_7 = (
            ms(retention + timedelta(minutes=1)),
            ms(retention - timedelta(minutes=1)),
            ms(configured + timedelta(minutes=1)),
            ms(timedelta(hours=1)),
        )
        try:
            for t in (expired, kept, expired_if_7, kept_if_7):
                await store.record(node, t, {"6": 1.0})
            await History(store, clock=lambda: now).prune()  # the default: 30 days
            left = await store.samples(node, expired - 1, kept_if_7 + 1)
            assert [s.time_ms for s in left] == [kept, expired_if_7, kept_if_7]
            await History(store, clock=lambda: now, retention_days=7).prune()
            left = await store.samples(node, expired - 1, kept_if_7 + 1)
            assert [s.time_ms for s in left] == [kept_if_7]
        finally:
            await database.close()


async def stream_counted_reports(gpu: GpuStub, operator: Operator, model: str) -> str:
    """A node that sent three reports 10 s apart with 0, 50 and 150 inferences done; returns its name."""
    name, token = await registered(gpu, operator)
    now = datetime.now(UTC)
    async with AgentStream.open(gpu, token, name) as agent:
        for sequence, (ago, count, util) in enumerate(((20, 0, 10.0), (10, 50, 30.0), (0, 150, 50.0)), start=1):
            await agent.send(
                report(
                    sequence,
                    models=[(model, 1)],
                    inference_count=count,
                    gpus=[(util, 1024, 4096)],
                    sample_time=now - timedelta(seconds=ago),
                )
            )
            assert (await agent.next_of("ack")).ack.accepted
    return name


def query(name: str, **fields: object) -> gpu_service_pb2.QueryTelemetryRequest:
    start = datetime.now(UTC) - timedelta(minutes=1)
    return gpu_service_pb2.QueryTelemetryRequest(name=name, start_time=ts(start), **fields)  # type: ignore[arg-type]


class TestQueryTelemetry:
    async def test_rates_and_gauges_come_back_downsampled(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name = await stream_counted_reports(gpu, operator, "llm")
        response = await gpu.QueryTelemetry(
            query(name, metrics=[UTIL, IPS], interval=duration_pb2.Duration(seconds=10), aggregation=A.AGGREGATION_MAX),
            metadata=auth(operator.address),
        )
        assert response.interval.seconds == 10
        by_metric = {(s.metric, s.gpu_index if s.HasField("gpu_index") else None, s.model): s for s in response.series}
        assert sorted(v.value for v in by_metric[(UTIL, 0, "")].points) == [10.0, 30.0, 50.0]
        rates = by_metric[(IPS, None, "llm")]
        assert rates.model_version == 1
        assert [p.value for p in rates.points] == pytest.approx([5.0, 10.0])

    async def test_errors(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, _ = await registered(gpu, operator)
        me = auth(operator.address)
        await expect_error(
            gpu.QueryTelemetry(query(name), metadata=me),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["metrics"],
            domain="gpu.far.network",
        )
        await expect_error(
            gpu.QueryTelemetry(query(name, metrics=[UTIL], interval=duration_pb2.Duration(seconds=5)), metadata=me),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["interval"],
            domain="gpu.far.network",
        )
        await expect_error(
            gpu.QueryTelemetry(query(name, metrics=[UTIL]), metadata=auth(Operator.new().address)),
            grpc.StatusCode.NOT_FOUND,
            "NODE_NOT_FOUND",
            domain="gpu.far.network",
        )

    async def test_the_service_uses_dynamodb_when_an_endpoint_is_configured(
        self, service_env: dict[str, str], moto_dynamodb: dict[str, str], auth: Auth
    ) -> None:
        async with (
            running_gpu(service_env, {**moto_dynamodb, "GPU_DYNAMODB_TABLE": TABLE}) as running,
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        ):
            assert running.app.history is not None
            assert isinstance(running.app.history.store, DynamoTelemetryStore)
            dynamo_gpu = gpu_service_pb2_grpc.GpuServiceStub(channel)
            operator = Operator.new()
            name = await stream_counted_reports(dynamo_gpu, operator, "llm")
            response = await dynamo_gpu.QueryTelemetry(
                query(name, metrics=[ACTIVE], interval=duration_pb2.Duration(seconds=60)),
                metadata=auth(operator.address),
            )
        [series] = response.series
        assert (series.metric, series.model, series.model_version) == (ACTIVE, "llm", 1)
        assert sum(len(s.points) for s in response.series) >= 1
