"""All of gamed's SQL. Functions take the RPC's session and flush; they never commit."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import aggregate_order_by, insert
from sqlalchemy.ext.asyncio import AsyncSession

from servers.gamed.models import BuildRow, ChannelRow, GameRow, ReleaseRow

RELEASE_CURRENT, RELEASE_SUPERSEDED, RELEASE_ROLLED_BACK = 1, 2, 3

GAME_ORDERS: dict[str, tuple[Any, bool]] = {
    "create_time desc": (GameRow.create_time, True),
    "create_time": (GameRow.create_time, False),
    "display_name": (GameRow.display_name, False),
    "update_time desc": (GameRow.update_time, True),
}


async def insert_game(session: AsyncSession, row: GameRow) -> bool:
    """Insert unless the id is taken; returns whether it was inserted."""
    values = {c.key: getattr(row, c.key) for c in GameRow.__table__.columns if c.key != "search"}
    values = {k: v for k, v in values.items() if v is not None}
    result = await session.execute(
        insert(GameRow).values(**values).on_conflict_do_nothing(index_elements=["id"]).returning(GameRow.id)
    )
    return result.scalar_one_or_none() is not None


# The platforms that have builds, in enum order, as a correlated subquery (one round trip per read).
_PLATFORMS = (
    select(func.coalesce(func.array_agg(aggregate_order_by(BuildRow.platform.distinct(), BuildRow.platform)), []))
    .where(BuildRow.game_id == GameRow.id)
    .scalar_subquery()
    .label("platforms")
)


async def get_game_with_platforms(session: AsyncSession, game_id: str) -> tuple[GameRow, list[int]] | None:
    row = (await session.execute(select(GameRow, _PLATFORMS).where(GameRow.id == game_id))).one_or_none()
    return None if row is None else (row[0], list(row[1]))


async def get_game(session: AsyncSession, game_id: str, *, for_update: bool = False) -> GameRow | None:
    query = select(GameRow).where(GameRow.id == game_id)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def list_games(
    session: AsyncSession,
    *,
    visible_to: str | None,
    published_state: int,
    query: str,
    genre: str,
    platform: int,
    publisher: str,
    state: int,
    order_by: str,
    after: tuple[Any, str] | None,
    limit: int,
) -> list[tuple[GameRow, list[int]]]:
    """Games and their platforms matching every filter in order, after the keyset cursor `after` (value, id).

    `visible_to` is the caller's wallet ("" for anonymous callers, None for admins, who see everything).
    """
    column, descending = GAME_ORDERS[order_by]
    conditions: list[ColumnElement[bool]] = []
    if visible_to is not None:
        conditions.append(or_(GameRow.state == published_state, GameRow.publisher == visible_to))
    if query:
        conditions.append(GameRow.search.op("@@")(func.plainto_tsquery("simple", query)))
    if genre:
        conditions.append(GameRow.genres.contains([genre]))
    if platform:
        conditions.append(exists().where(and_(BuildRow.game_id == GameRow.id, BuildRow.platform == platform)))
    if publisher:
        conditions.append(GameRow.publisher == publisher)
    if state:
        conditions.append(GameRow.state == state)
    if after is not None:
        key = tuple_(column, GameRow.id)
        conditions.append(key < tuple_(*after) if descending else key > tuple_(*after))
    order = (column.desc(), GameRow.id.desc()) if descending else (column.asc(), GameRow.id.asc())
    result = await session.execute(select(GameRow, _PLATFORMS).where(*conditions).order_by(*order).limit(limit))
    return [(game, list(platforms)) for game, platforms in result]


async def delete_game(session: AsyncSession, game_id: str) -> None:
    await session.execute(delete(ReleaseRow).where(ReleaseRow.game_id == game_id))
    await session.execute(delete(GameRow).where(GameRow.id == game_id))


async def touch_game(session: AsyncSession, game_id: str, now: datetime) -> None:
    await session.execute(
        update(GameRow).where(GameRow.id == game_id).values(update_time=now, revision=GameRow.revision + 1)
    )


async def insert_build(session: AsyncSession, row: BuildRow) -> str | None:
    """Insert a build; None when its id or its (platform, version) is taken (the constraint's name otherwise)."""
    values = {c.key: getattr(row, c.key) for c in BuildRow.__table__.columns if c.key not in ("seq", "create_time")}
    result = await session.execute(
        insert(BuildRow).values(**values).on_conflict_do_nothing().returning(BuildRow.id, BuildRow.create_time)
    )
    inserted = result.one_or_none()
    if inserted is None:
        return None
    row.create_time = inserted.create_time
    return str(inserted.id)


async def get_build(session: AsyncSession, game_id: str, build_id: str) -> BuildRow | None:
    result = await session.execute(select(BuildRow).where(BuildRow.game_id == game_id, BuildRow.id == build_id))
    return result.scalar_one_or_none()


async def list_builds(
    session: AsyncSession, game_id: str, *, platform: int, after_seq: int | None, limit: int
) -> list[BuildRow]:
    conditions = [BuildRow.game_id == game_id]
    if platform:
        conditions.append(BuildRow.platform == platform)
    if after_seq is not None:
        conditions.append(BuildRow.seq < after_seq)
    result = await session.execute(select(BuildRow).where(*conditions).order_by(BuildRow.seq.desc()).limit(limit))
    return list(result.scalars())


async def build_is_released(session: AsyncSession, game_id: str, build_id: str) -> bool:
    result = await session.execute(
        select(exists().where(ReleaseRow.game_id == game_id, ReleaseRow.build_id == build_id))
    )
    return bool(result.scalar())


async def delete_build(session: AsyncSession, game_id: str, build_id: str) -> None:
    await session.execute(delete(BuildRow).where(BuildRow.game_id == game_id, BuildRow.id == build_id))


async def count_builds(session: AsyncSession, game_id: str) -> int:
    result = await session.execute(select(func.count()).select_from(BuildRow).where(BuildRow.game_id == game_id))
    return int(result.scalar_one())


async def insert_channel(session: AsyncSession, row: ChannelRow) -> bool:
    result = await session.execute(
        insert(ChannelRow)
        .values(game_id=row.game_id, id=row.id, description=row.description)
        .on_conflict_do_nothing()
        .returning(ChannelRow.create_time)
    )
    created = result.scalar_one_or_none()
    if created is None:
        return False
    row.create_time = row.update_time = created
    return True


async def get_channel(
    session: AsyncSession, game_id: str, channel_id: str, *, for_update: bool = False
) -> ChannelRow | None:
    query = select(ChannelRow).where(ChannelRow.game_id == game_id, ChannelRow.id == channel_id)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def list_channels(session: AsyncSession, game_id: str, *, after_id: str | None, limit: int) -> list[ChannelRow]:
    conditions = [ChannelRow.game_id == game_id]
    if after_id is not None:
        conditions.append(ChannelRow.id > after_id)
    result = await session.execute(select(ChannelRow).where(*conditions).order_by(ChannelRow.id).limit(limit))
    return list(result.scalars())


async def delete_channel(session: AsyncSession, game_id: str, channel_id: str) -> None:
    await session.execute(delete(ChannelRow).where(ChannelRow.game_id == game_id, ChannelRow.id == channel_id))


async def current_releases(
    session: AsyncSession, game_id: str, channel_ids: Sequence[str]
) -> dict[str, list[ReleaseRow]]:
    if not channel_ids:
        return {}
    result = await session.execute(
        select(ReleaseRow)
        .where(
            ReleaseRow.game_id == game_id,
            ReleaseRow.channel_id.in_(channel_ids),
            ReleaseRow.state == RELEASE_CURRENT,
        )
        .order_by(ReleaseRow.channel_id, ReleaseRow.platform)
        .execution_options(populate_existing=True)
    )
    releases: dict[str, list[ReleaseRow]] = {channel_id: [] for channel_id in channel_ids}
    for release in result.scalars():
        releases[release.channel_id].append(release)
    return releases


async def current_release(session: AsyncSession, game_id: str, channel_id: str, platform: int) -> ReleaseRow | None:
    result = await session.execute(
        select(ReleaseRow).where(
            ReleaseRow.game_id == game_id,
            ReleaseRow.channel_id == channel_id,
            ReleaseRow.platform == platform,
            ReleaseRow.state == RELEASE_CURRENT,
        )
    )
    return result.scalar_one_or_none()


async def previous_release(
    session: AsyncSession, game_id: str, channel_id: str, platform: int, before_id: int
) -> ReleaseRow | None:
    """The latest superseded release before `before_id` (the one a rollback makes current again)."""
    result = await session.execute(
        select(ReleaseRow)
        .where(
            ReleaseRow.game_id == game_id,
            ReleaseRow.channel_id == channel_id,
            ReleaseRow.platform == platform,
            ReleaseRow.state == RELEASE_SUPERSEDED,
            ReleaseRow.id < before_id,
        )
        .order_by(ReleaseRow.id.desc())
        .limit(1)
    )
    return result.scalar_one_or_none()


async def set_release_state(session: AsyncSession, release_id: int, state: int) -> None:
    await session.execute(update(ReleaseRow).where(ReleaseRow.id == release_id).values(state=state))


async def insert_release(session: AsyncSession, row: ReleaseRow) -> ReleaseRow:
    session.add(row)
    await session.flush()
    return row


async def touch_channel(session: AsyncSession, game_id: str, channel_id: str, now: datetime) -> None:
    await session.execute(
        update(ChannelRow).where(ChannelRow.game_id == game_id, ChannelRow.id == channel_id).values(update_time=now)
    )


async def list_releases(
    session: AsyncSession, game_id: str, channel_id: str, *, platform: int, after_id: int | None, limit: int
) -> list[ReleaseRow]:
    conditions = [ReleaseRow.game_id == game_id, ReleaseRow.channel_id == channel_id]
    if platform:
        conditions.append(ReleaseRow.platform == platform)
    if after_id is not None:
        conditions.append(ReleaseRow.id < after_id)
    result = await session.execute(select(ReleaseRow).where(*conditions).order_by(ReleaseRow.id.desc()).limit(limit))
    return list(result.scalars())


async def now(session: AsyncSession) -> datetime:
    """The transaction's timestamp from PostgreSQL (one clock for every row the RPC writes)."""
    value: datetime = (await session.execute(select(func.now()))).scalar_one()
    return value
