"""The PostgreSQL telemetry store: the default when no DynamoDB table is configured."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert

from servers.common.db import Database
from servers.gpu.models import TelemetryRow
from servers.gpu.telemetry_store import Sample


class PostgresTelemetryStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def record(self, node_id: str, time_ms: int, values: Mapping[str, float]) -> None:
        async with self._db.transaction() as uow:
            await uow.session.execute(
                insert(TelemetryRow)
                .values(node_id=node_id, time_ms=time_ms, values=dict(values))
                .on_conflict_do_nothing(index_elements=["node_id", "time_ms"])
            )

    async def samples(self, node_id: str, start_ms: int, end_ms: int) -> list[Sample]:
        query = (
            select(TelemetryRow.time_ms, TelemetryRow.values)
            .where(TelemetryRow.node_id == node_id, TelemetryRow.time_ms >= start_ms, TelemetryRow.time_ms < end_ms)
            .order_by(TelemetryRow.time_ms)
        )
        async with self._db.read() as uow:
            return [Sample(time_ms, values) for time_ms, values in await uow.session.execute(query)]

    async def prune(self, before_ms: int) -> None:
        async with self._db.transaction() as uow:
            await uow.session.execute(delete(TelemetryRow).where(TelemetryRow.time_ms < before_ms))

    async def close(self) -> None:
        """The database belongs to the server's runtime, which closes it."""
