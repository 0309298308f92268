"""Async SQLAlchemy: one engine per process, one session (one transaction) per RPC, events after commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import structlog
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from servers.common.events import EventBus
from servers.common.outbox import Outbox, StagedEvent

log = structlog.get_logger("far.db")


def async_url(url: str) -> str:
    """`postgresql://` (or `postgres://`) as SQLAlchemy's asyncpg URL; unix-socket `?host=` URLs included."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        parts = parts._replace(scheme="postgresql+asyncpg")
    return urlunsplit(parts)


def sync_url(url: str) -> str:
    """The same database for tools that want a plain `postgresql://` URL (psql, pg_dump)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


@dataclass
class UnitOfWork:
    """The session of one RPC and the events it will publish once its transaction has committed."""

    session: AsyncSession
    pending_events: list[tuple[str, Message]] = field(default_factory=list)
    read_only: bool = False

    def publish(self, topic: str, event: Message) -> None:
        if self.read_only:
            raise RuntimeError("a read-only unit of work cannot publish events")
        self.pending_events.append((topic, event))


class Database:
    """The engine and the transaction boundary every service uses."""

    def __init__(
        self, url: str, *, events: EventBus | None = None, outbox: Outbox | None = None, pool_size: int = 10
    ) -> None:
        self.engine: AsyncEngine = create_async_engine(
            async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._read_sessions = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False, autoflush=False
        )
        self._events = events
        self.outbox = outbox

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """Commit once when the block succeeds, roll back when it raises; then publish its events.

        Services only flush; nothing reaches Redis unless the transaction committed. With an outbox the
        events are written in the same transaction first, so a Redis outage delays them but loses none.
        """
        staged: list[StagedEvent] = []
        async with self._sessions() as session, session.begin():
            unit = UnitOfWork(session)
            yield unit
            if unit.pending_events and self.outbox is not None:
                staged = await self.outbox.stage(session, unit.pending_events)
        if staged and self.outbox is not None:
            await self.outbox.deliver(self._sessions, staged)
        elif unit.pending_events and self._events is not None:
            for topic, event in unit.pending_events:
                try:
                    await self._events.publish(topic, event)
                except Exception:
                    log.exception("event not published after commit", topic=topic)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[UnitOfWork]:
        """A unit of work for RPCs that only read: each statement in its own snapshot, no BEGIN/COMMIT.

        Saves two round trips per read RPC; use `transaction()` when reads must see one snapshot or lock.
        """
        async with self._read_sessions() as session:
            yield UnitOfWork(session, read_only=True)

    async def run_outbox_relay(self, *, interval_s: float = 2.0) -> None:
        """Publish events left in the outbox (Redis was down when they committed), until cancelled."""
        if self.outbox is not None:
            await self.outbox.run_relay(self._sessions, interval_s=interval_s)

    async def forget_delivered_events(self) -> int:
        """Delete the outbox rows of events published since the relay's last pass (it does this itself)."""
        return await self.outbox.forget_delivered(self._sessions) if self.outbox is not None else 0

    async def close(self) -> None:
        await self.forget_delivered_events()
        await self.engine.dispose()


def with_database(url: str, database: str) -> str:
    """The same server's URL for another database (`postgresql://h/x` -> `postgresql://h/<database>`)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def run_admin_statement(url: str, statement: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the server's `postgres` database, outside a transaction."""
    import asyncpg  # type: ignore[import-untyped]

    connection = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)
