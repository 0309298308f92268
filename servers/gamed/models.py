"""The gamed schema: games, builds (assets inline, immutable), channels and their releases."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Computed,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    Index,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servers.common.outbox import outbox_table

SCHEMA = "gamed"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class GameRow(Base):
    __tablename__ = "games"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    display_name: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    genres: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    publisher: Mapped[str] = mapped_column(Text, index=True)
    state: Mapped[int] = mapped_column(SmallInteger)
    revision: Mapped[int] = mapped_column(BigInteger, default=1)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    search: Mapped[Any] = mapped_column(
        TSVECTOR,
        Computed("to_tsvector('simple', display_name || ' ' || description)", persisted=True),
        deferred=True,
    )

    __table_args__ = (
        Index("games_search_idx", "search", postgresql_using="gin"),
        Index("games_genres_idx", "genres", postgresql_using="gin"),
        Index("games_create_time_idx", "create_time", "id"),
    )


class BuildRow(Base):
    __tablename__ = "builds"

    game_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), unique=True)
    platform: Mapped[int] = mapped_column(SmallInteger)
    version: Mapped[str] = mapped_column(Text)
    release_notes: Mapped[str] = mapped_column(Text, default="")
    assets: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    total_size_bytes: Mapped[int] = mapped_column(BigInteger)
    creator: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        ForeignKeyConstraint(["game_id"], [f"{SCHEMA}.games.id"], ondelete="CASCADE"),
        UniqueConstraint("game_id", "platform", "version", name="builds_platform_version_key"),
    )


class ChannelRow(Base):
    __tablename__ = "channels"

    game_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (ForeignKeyConstraint(["game_id"], [f"{SCHEMA}.games.id"], ondelete="CASCADE"),)


class ReleaseRow(Base):
    __tablename__ = "releases"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    game_id: Mapped[str] = mapped_column(Text)
    channel_id: Mapped[str] = mapped_column(Text)
    build_id: Mapped[str] = mapped_column(Text)
    platform: Mapped[int] = mapped_column(SmallInteger)
    version: Mapped[str] = mapped_column(Text)
    state: Mapped[int] = mapped_column(SmallInteger)
    promoter: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        ForeignKeyConstraint(
            ["game_id", "channel_id"],
            [f"{SCHEMA}.channels.game_id", f"{SCHEMA}.channels.id"],
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(["game_id", "build_id"], [f"{SCHEMA}.builds.game_id", f"{SCHEMA}.builds.id"]),
        Index(
            "releases_one_current_idx",
            "game_id",
            "channel_id",
            "platform",
            unique=True,
            postgresql_where=text("state = 1"),
        ),
        Index("releases_channel_idx", "game_id", "channel_id", "id"),
        Index("releases_build_idx", "game_id", "build_id"),
    )


OUTBOX = outbox_table(Base.metadata)
