"""The transactional outbox: events commit with the change, survive a Redis outage, and are relayed once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from google.protobuf import wrappers_pb2
from redis.asyncio import Redis
from sqlalchemy import MetaData, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from servers.common.db import Database
from servers.common.events import EventBus
from servers.common.outbox import Outbox, outbox_table

pytestmark = pytest.mark.integration

SCHEMA = "outbox_test"
TABLE = outbox_table(MetaData(schema=SCHEMA))
Text = wrappers_pb2.StringValue


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
async def dead_bus(redis_key_prefix: str) -> AsyncIterator[EventBus]:
    """A bus whose Redis is not there (a closed port): every publish fails."""
    client = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        yield EventBus(client, redis_key_prefix)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def schema(database_url: str) -> AsyncIterator[None]:
    database = Database(database_url, pool_size=1)
    async with database.engine.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        await connection.run_sync(TABLE.metadata.create_all)
    try:
        yield
    finally:
        await database.close()


def _database(url: str, bus: EventBus, *, delete_batch: int = 256) -> Database:
    outbox = Outbox(TABLE, bus, source="test", relay_delay_s=0, delete_batch=delete_batch)
    return Database(url, events=bus, outbox=outbox, pool_size=2)


async def _outbox_rows(database: Database) -> int:
    async with database.engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(TABLE))).scalar_one())


async def _events(redis_client: Redis, bus: EventBus, topic: str) -> list[tuple[str, str]]:
    entries = await redis_client.xrange(bus.stream_key(topic))
    return [(fields[b"eid"].decode(), Text.FromString(fields[b"data"]).value) for _, fields in entries]


@pytest.mark.usefixtures("schema")
class TestOutbox:
    async def test_committed_events_are_published_and_leave_the_outbox_in_a_later_batch(
        self, database_url: str, bus: EventBus, redis_client: Redis
    ) -> None:
        topic = f"outbox.{uuid.uuid4().hex}"
        database = _database(database_url, bus)
        try:
            async with database.transaction() as unit:
                unit.publish(topic, Text(value="one"))
                unit.publish(topic, Text(value="two"))
            events = await _events(redis_client, bus, topic)
            assert [value for _, value in events] == ["one", "two"]
            assert all(event_id.startswith("test:") for event_id, _ in events)
            assert len({event_id for event_id, _ in events}) == 2
            # Published at once; the rows wait for the relay's next pass, which deletes them and publishes
            # nothing again (its delay is 0 here, so it would find them).
            assert await _outbox_rows(database) == 2
            assert database.outbox is not None
            assert await database.outbox.relay_once(async_sessionmaker(database.engine)) == 0
            assert await _outbox_rows(database) == 0
            assert await _events(redis_client, bus, topic) == events
        finally:
            await database.close()

    async def test_delivered_rows_go_once_a_batch_is_full_and_when_the_database_closes(
        self, database_url: str, bus: EventBus, redis_client: Redis
    ) -> None:
        topic = f"outbox.{uuid.uuid4().hex}"
        database = _database(database_url, bus, delete_batch=3)
        try:
            for value in ("one", "two"):
                async with database.transaction() as unit:
                    unit.publish(topic, Text(value=value))
            assert await _outbox_rows(database) == 2
            async with database.transaction() as unit:  # the third fills the batch: all three go
                unit.publish(topic, Text(value="three"))
            assert await _outbox_rows(database) == 0
            async with database.transaction() as unit:
                unit.publish(topic, Text(value="four"))
            assert await _outbox_rows(database) == 1
        finally:
            await database.close()
        try:
            assert await _outbox_rows(database) == 0  # the engine opens a new pool after close
        finally:
            await database.engine.dispose()
        assert [value for _, value in await _events(redis_client, bus, topic)] == ["one", "two", "three", "four"]

    async def test_rolled_back_events_are_neither_staged_nor_published(
        self, database_url: str, bus: EventBus, redis_client: Redis
    ) -> None:
        topic = f"outbox.{uuid.uuid4().hex}"
        database = _database(database_url, bus)
        try:

            async def fail() -> None:
                async with database.transaction() as unit:
                    unit.publish(topic, Text(value="never"))
                    raise Boom

            with pytest.raises(Boom):
                await fail()
            assert await _events(redis_client, bus, topic) == []
            assert await _outbox_rows(database) == 0
        finally:
            await database.close()

    async def test_a_failed_delete_keeps_the_rows_for_the_next_pass_and_publishes_nothing_twice(
        self, database_url: str, bus: EventBus, redis_client: Redis
    ) -> None:
        topic = f"outbox.{uuid.uuid4().hex}"
        database = _database(database_url, bus)

        def unreachable() -> AsyncSession:
            raise OSError("PostgreSQL is not there")

        try:
            async with database.transaction() as unit:
                unit.publish(topic, Text(value="once"))
            assert database.outbox is not None
            assert await database.outbox.forget_delivered(cast(Any, unreachable)) == 0
            assert await _outbox_rows(database) == 1
            # The relay (delay 0: it would find the row) deletes it and does not publish it again.
            assert await database.outbox.relay_once(async_sessionmaker(database.engine)) == 0
            assert await _outbox_rows(database) == 0
            assert [value for _, value in await _events(redis_client, bus, topic)] == ["once"]
        finally:
            await database.close()

    async def test_events_survive_a_redis_outage_and_the_relay_publishes_them_once(
        self, database_url: str, bus: EventBus, dead_bus: EventBus, redis_client: Redis
    ) -> None:
        topic = f"outbox.{uuid.uuid4().hex}"
        down = _database(database_url, dead_bus)
        up = _database(database_url, bus)
        try:
            async with down.transaction() as unit:  # commits although Redis is unreachable
                unit.publish(topic, Text(value="kept"))
            assert await _outbox_rows(down) == 1
            assert await _events(redis_client, bus, topic) == []

            assert up.outbox is not None
            sessions = async_sessionmaker(up.engine)
            assert await up.outbox.relay_once(sessions) == 1
            assert await up.outbox.relay_once(sessions) == 0
            ((event_id, value),) = await _events(redis_client, bus, topic)
            assert value == "kept"
            assert event_id.startswith("test:")
            assert await _outbox_rows(up) == 0
        finally:
            await down.close()
            await up.close()
