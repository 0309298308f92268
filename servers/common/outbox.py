"""Transactional outbox: events are written in the RPC's transaction and published to Redis after it commits.

If Redis is down when a change commits, its events wait in the service's `outbox` table and the relay
publishes them later, so a committed change never loses its events. Every event carries an id
(`<service>:<outbox row id>`) that stays the same if it is ever published twice, so consumers can dedupe.

The rows of events published after their commit are deleted in batches, not in a transaction of their own
per commit: by the relay's next pass (every couple of seconds), once `delete_batch` of them are waiting, and
when the database closes. A write RPC then costs one transaction, not two. A row left behind (the process died
first) is published again by a relay under the same event id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from google.protobuf.message import Message
from sqlalchemy import BigInteger, Column, DateTime, Identity, LargeBinary, MetaData, Table, Text, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from servers.common.events import EventBus

log = structlog.get_logger("far.outbox")


def outbox_table(metadata: MetaData) -> Table:
    """The outbox table in a service's schema (add it to the service's metadata and migrations)."""
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(always=True), primary_key=True),
        Column("topic", Text, nullable=False),
        Column("type", Text, nullable=False),
        Column("data", LargeBinary, nullable=False),
        Column("create_time", DateTime(timezone=True), server_default=func.now(), nullable=False),
    )


@dataclass(frozen=True, slots=True)
class StagedEvent:
    id: int
    topic: str
    type: str
    data: bytes


class Outbox:
    """Stages events in a transaction, delivers them after the commit, and relays what was left behind."""

    def __init__(
        self, table: Table, events: EventBus, *, source: str, relay_delay_s: float = 5.0, delete_batch: int = 256
    ) -> None:
        self.table = table
        self._events = events
        self._source = source
        self._relay_delay_s = relay_delay_s
        self._delete_batch = delete_batch
        self._delivered: list[int] = []  # rows published after their commit, not deleted yet
        # Built once: most transactions stage one event, and a single-row insert skips the bookkeeping of
        # SQLAlchemy's many-rows path (insertmanyvalues, the ordering of RETURNING) that a list of one costs.
        self._insert = table.insert().returning(table.c.id)
        self._insert_many = table.insert().returning(table.c.id, sort_by_parameter_order=True)

    def event_id(self, row_id: int) -> str:
        return f"{self._source}:{row_id}"

    async def stage(self, session: AsyncSession, events: Sequence[tuple[str, Message]]) -> list[StagedEvent]:
        """Insert the events into the outbox inside the caller's transaction."""
        rows = [(topic, message.DESCRIPTOR.full_name, message.SerializeToString()) for topic, message in events]
        values = [{"topic": topic, "type": type_name, "data": data} for topic, type_name, data in rows]
        if len(values) == 1:
            result = await session.execute(self._insert, values[0])
        else:
            result = await session.execute(self._insert_many, values)
        return [StagedEvent(row_id, *row) for row_id, row in zip(result.scalars(), rows, strict=True)]

    async def _publish(self, staged: Sequence[StagedEvent]) -> list[int]:
        published = []
        for event in staged:
            try:
                await self._events.publish_raw(event.topic, event.type, event.data, event_id=self.event_id(event.id))
            except Exception:
                log.warning("event left in the outbox for the relay", topic=event.topic, outbox_id=event.id)
                break
            published.append(event.id)
        return published

    async def deliver(self, sessions: async_sessionmaker[AsyncSession], staged: Sequence[StagedEvent]) -> None:
        """Publish events that just committed (what fails stays for the relay); their rows go in a later batch."""
        self._delivered.extend(await self._publish(staged))
        if len(self._delivered) >= self._delete_batch:
            await self.forget_delivered(sessions)

    async def forget_delivered(self, sessions: async_sessionmaker[AsyncSession]) -> int:
        """Delete the rows of the events `deliver` published, in one statement; returns how many. If that fails
        they are tried again next time (a relay that finds one first publishes it again, under the same id)."""
        ids, self._delivered = self._delivered, []
        if not ids:
            return 0
        try:
            async with sessions() as session, session.begin():
                await session.execute(delete(self.table).where(self.table.c.id.in_(ids)))
        except Exception:
            self._delivered.extend(ids)
            log.warning("published events stay in the outbox for now", rows=len(ids), exc_info=True)
            return 0
        return len(ids)

    async def relay_once(self, sessions: async_sessionmaker[AsyncSession], *, limit: int = 100) -> int:
        """Publish the oldest events left behind (older than the relay delay); returns how many. The rows of
        events already delivered are deleted first, and never published again by this process."""
        await self.forget_delivered(sessions)
        async with sessions() as session, session.begin():
            waiting = select(self.table).where(
                self.table.c.create_time < func.now() - timedelta(seconds=self._relay_delay_s)
            )
            if self._delivered:  # delivered since, or their delete failed
                waiting = waiting.where(self.table.c.id.not_in(self._delivered))
            result = await session.execute(
                waiting.order_by(self.table.c.id).limit(limit).with_for_update(skip_locked=True)
            )
            staged = [StagedEvent(row.id, row.topic, row.type, row.data) for row in result]
            published = await self._publish(staged)
            if published:
                await session.execute(delete(self.table).where(self.table.c.id.in_(published)))
            return len(published)

    async def run_relay(self, sessions: async_sessionmaker[AsyncSession], *, interval_s: float = 2.0) -> None:
        """Relay forever (until cancelled), every `interval_s` seconds."""
        while True:
            try:
                while await self.relay_once(sessions) > 0:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("outbox relay failed; retrying", exc_info=True)
            await asyncio.sleep(interval_s)
