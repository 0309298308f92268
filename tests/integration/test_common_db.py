"""servers.common.db.Database.transaction on the run's PostgreSQL and Redis: commit once, events after commit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message
from redis.asyncio import Redis
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from servers.common.db import Database
from servers.common.events import EventBus

pytestmark = pytest.mark.integration

Text = wrappers_pb2.StringValue
TABLE = "common_test_scratch"
DEFERRED = "common_test_scratch_deferred"
# Table names are constants of this module, never input: the f-strings below cannot inject anything.
COUNT = {name: text(f"SELECT count(*) FROM {name} WHERE id = :id") for name in (TABLE, DEFERRED)}  # noqa: S608
INSERT = {name: text(f"INSERT INTO {name} (id) VALUES (:id)") for name in (TABLE, DEFERRED)}  # noqa: S608


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
async def database(database_url: str, bus: EventBus) -> AsyncIterator[Database]:
    db = Database(database_url, events=bus, pool_size=2)
    async with db.engine.begin() as connection:
        await connection.execute(text(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY)"))
        await connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {DEFERRED} (id text, "
                "CONSTRAINT deferred_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
def topic() -> str:
    return f"db.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def row_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def transactions(database: Database) -> Iterator[list[str]]:
    """'commit' / 'rollback' for every transaction the engine ends while the test runs."""
    ended: list[str] = []

    def on_commit(_connection: object) -> None:
        ended.append("commit")

    def on_rollback(_connection: object) -> None:
        ended.append("rollback")

    engine = database.engine.sync_engine
    event.listen(engine, "commit", on_commit)
    event.listen(engine, "rollback", on_rollback)
    try:
        yield ended
    finally:
        event.remove(engine, "commit", on_commit)
        event.remove(engine, "rollback", on_rollback)


async def row_exists(database: Database, row_id: str, table: str = TABLE) -> bool:
    async with database.engine.connect() as connection:
        result = await connection.execute(COUNT[table], {"id": row_id})
        return bool(result.scalar_one())


async def insert(session: AsyncSession, row_id: str, table: str = TABLE) -> None:
    await session.execute(INSERT[table], {"id": row_id})


class TestTransaction:
    async def test_commits_once_then_publishes(
        self, database: Database, bus: EventBus, topic: str, row_id: str, transactions: list[str]
    ) -> None:
        async with database.transaction() as unit:
            await insert(unit.session, row_id)
            await unit.session.flush()
            await insert(unit.session, row_id + "-2")
            unit.publish(topic, Text(value="first"))
            unit.publish(topic, Text(value="second"))
            assert await bus.read_range(topic) == []
            assert not await row_exists(database, row_id)
        assert transactions.count("commit") == 1
        assert await row_exists(database, row_id)
        assert await row_exists(database, row_id + "-2")
        assert [d.parse(Text()).value for d in await bus.read_range(topic)] == ["first", "second"]

    async def test_an_exception_rolls_back_and_publishes_nothing(
        self, database: Database, bus: EventBus, topic: str, row_id: str, transactions: list[str]
    ) -> None:
        async def fail_after_writing() -> None:
            async with database.transaction() as unit:
                await insert(unit.session, row_id)
                await unit.session.flush()
                unit.publish(topic, Text(value="never"))
                raise Boom

        with pytest.raises(Boom):
            await fail_after_writing()
        assert "commit" not in transactions
        assert "rollback" in transactions
        assert not await row_exists(database, row_id)
        assert await bus.read_range(topic) == []

    async def test_a_failed_commit_publishes_nothing(
        self, database: Database, bus: EventBus, topic: str, row_id: str
    ) -> None:
        async def write_a_duplicate_checked_at_commit() -> None:
            async with database.transaction() as unit:
                await insert(unit.session, row_id, DEFERRED)
                await insert(unit.session, row_id, DEFERRED)
                unit.publish(topic, Text(value="never"))

        with pytest.raises(IntegrityError):
            await write_a_duplicate_checked_at_commit()
        assert not await row_exists(database, row_id, DEFERRED)
        assert await bus.read_range(topic) == []

    async def test_without_an_event_bus_events_are_dropped_but_the_commit_stands(
        self, database_url: str, row_id: str
    ) -> None:
        database = Database(database_url, pool_size=1)
        try:
            async with database.transaction() as unit:
                await insert(unit.session, row_id)
                unit.publish("anything", Text(value="dropped"))
            assert await row_exists(database, row_id)
        finally:
            await database.close()

    async def test_a_publish_failure_after_commit_does_not_undo_it(
        self, database_url: str, redis_key_prefix: str, row_id: str
    ) -> None:
        published: list[str] = []

        class FlakyBus(EventBus):
            async def publish(self, topic: str, event: Message) -> str:
                if topic == "down":
                    raise ConnectionError("redis is down")
                published.append(topic)
                return "0-1"

        database = Database(database_url, events=FlakyBus(Redis(), redis_key_prefix), pool_size=1)
        try:
            async with database.transaction() as unit:
                await insert(unit.session, row_id)
                unit.publish("down", Text(value="lost"))
                unit.publish("up", Text(value="still sent"))
            assert await row_exists(database, row_id)
            assert published == ["up"]
        finally:
            await database.close()

    async def test_sessions_are_independent(self, database: Database, row_id: str) -> None:
        async with database.transaction() as outer:
            await insert(outer.session, row_id)
            await outer.session.flush()
            async with database.transaction() as inner:
                result = await inner.session.execute(COUNT[TABLE], {"id": row_id})
                assert result.scalar_one() == 0
        assert await row_exists(database, row_id)
