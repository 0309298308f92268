"""The DynamoDB telemetry store (aioboto3): one item per report, expired by DynamoDB's TTL.

Table: partition key `node_id` (S), sort key `t` (N, the sample time in Unix milliseconds), the values
in the map `v` (series key -> N), and `expires_at` (N, Unix seconds), the table's TTL attribute, set
`retention_days` after the sample. A range query is one Query on the node's partition with `t BETWEEN`.
The table is created (on-demand capacity, TTL on) only when `create_table` is set: dev and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aioboto3
from botocore.exceptions import ClientError

from servers.gpu.settings import TelemetryStoreSettings
from servers.gpu.telemetry_store import Sample

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


class DynamoTelemetryStore:
    def __init__(
        self, client: DynamoDBClient, table: str, *, retention_days: int, exit_stack: contextlib.AsyncExitStack
    ) -> None:
        self._client = client
        self._table = table
        self._retention_s = retention_days * 86_400
        self._exit_stack = exit_stack

    @classmethod
    async def open(cls, settings: TelemetryStoreSettings) -> DynamoTelemetryStore:
        """A store on the configured table (credentials from the usual AWS chain: env, profile, task role)."""
        stack = contextlib.AsyncExitStack()
        session = aioboto3.Session()
        client: DynamoDBClient = await stack.enter_async_context(
            session.client("dynamodb", region_name=settings.dynamodb_region, endpoint_url=settings.dynamodb_endpoint)
        )
        store = cls(client, settings.dynamodb_table, retention_days=settings.retention_days, exit_stack=stack)
        try:
            if settings.create_table:
                await store.ensure_table()
        except BaseException:
            await stack.aclose()
            raise
        return store

    async def ensure_table(self) -> None:
        """Create the table if it does not exist, wait until it is ACTIVE, and turn its TTL on if it is off
        (also for a table made elsewhere, or left without TTL by a start that died between the two calls)."""
        try:
            await self._client.describe_table(TableName=self._table)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            await self._create_table()
        ttl = await self._client.describe_time_to_live(TableName=self._table)
        status = ttl.get("TimeToLiveDescription", {})
        if status.get("TimeToLiveStatus") in ("ENABLED", "ENABLING") and status.get("AttributeName") == "expires_at":
            return
        await self._client.update_time_to_live(
            TableName=self._table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
        )

    async def _create_table(self) -> None:
        with contextlib.suppress(self._client.exceptions.ResourceInUseException):
            await self._client.create_table(
                TableName=self._table,
                AttributeDefinitions=[
                    {"AttributeName": "node_id", "AttributeType": "S"},
                    {"AttributeName": "t", "AttributeType": "N"},
                ],
                KeySchema=[
                    {"AttributeName": "node_id", "KeyType": "HASH"},
                    {"AttributeName": "t", "KeyType": "RANGE"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        for _ in range(600):
            described = await self._client.describe_table(TableName=self._table)
            if described["Table"].get("TableStatus") == "ACTIVE":
                break
            await asyncio.sleep(0.1)

    async def record(self, node_id: str, time_ms: int, values: Mapping[str, float]) -> None:
        item: dict[str, Any] = {
            "node_id": {"S": node_id},
            "t": {"N": str(time_ms)},
            "expires_at": {"N": str(time_ms // 1000 + self._retention_s)},
            "v": {"M": {key: {"N": str(Decimal(repr(float(value))))} for key, value in values.items()}},
        }
        # The same sample again keeps the first one.
        with contextlib.suppress(self._client.exceptions.ConditionalCheckFailedException):
            await self._client.put_item(
                TableName=self._table, Item=item, ConditionExpression="attribute_not_exists(node_id)"
            )

    async def samples(self, node_id: str, start_ms: int, end_ms: int) -> list[Sample]:
        if end_ms <= start_ms:
            return []
        found: list[Sample] = []
        query: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "node_id = :node AND #t BETWEEN :start AND :last",
            "ExpressionAttributeNames": {"#t": "t"},
            "ExpressionAttributeValues": {
                ":node": {"S": node_id},
                ":start": {"N": str(start_ms)},
                ":last": {"N": str(end_ms - 1)},
            },
        }
        while True:
            page = await self._client.query(**query)
            for item in page.get("Items", []):
                values = {key: float(value["N"]) for key, value in item["v"]["M"].items()}
                found.append(Sample(int(item["t"]["N"]), values))
            last = page.get("LastEvaluatedKey")
            if not last:
                return found
            query["ExclusiveStartKey"] = last

    async def prune(self, before_ms: int) -> None:
        """DynamoDB's TTL removes expired items by itself."""

    async def close(self) -> None:
        await self._exit_stack.aclose()
