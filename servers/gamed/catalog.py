"""The catalog's rules: who may see and change what, validation, state changes, releases.

Transport-agnostic: it takes plain values and the caller's Principal, works through the repository
inside the RPC's unit of work, and returns rows. Field paths in errors are the contract's.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

from servers.common.auth import Principal, Role, require_role, require_signed_in
from servers.common.db import UnitOfWork
from servers.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from servers.common.names import format_name, parse_name
from servers.common.pagination import PageTokens, page_size
from servers.common.validation import SHA256_HEX, Violations, normalize_wallet
from servers.gamed import repository as repo
from servers.gamed.models import BuildRow, ChannelRow, GameRow, ReleaseRow
from servers.gamed.storage import AssetStorage, SignedLink

GAME = "games/{game}"
BUILD = "games/{game}/builds/{build}"
CHANNEL = "games/{game}/channels/{channel}"

MAX_ASSETS = 100
MAX_ASSET_BYTES = 64 * 1024**3
# \Z, not $ (which also matches before a trailing newline); ASCII, so \d and \w mean what they say.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z",
    re.ASCII,
)
GENRE = re.compile(r"^[a-z][a-z0-9-]{0,39}\Z")
ASSET_PATH = re.compile(r"^[A-Za-z0-9._\-/]{1,512}\Z")
CONTENT_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+\Z", re.ASCII)
UPDATABLE_GAME_FIELDS = frozenset({"display_name", "description", "genres", "state"})


class GameState(IntEnum):
    DRAFT = 1
    PUBLISHED = 2
    ARCHIVED = 3


class ReleaseState(IntEnum):
    CURRENT = repo.RELEASE_CURRENT
    SUPERSEDED = repo.RELEASE_SUPERSEDED
    ROLLED_BACK = repo.RELEASE_ROLLED_BACK


PLATFORMS = range(1, 7)


@dataclass(frozen=True)
class GameFields:
    display_name: str = ""
    description: str = ""
    genres: tuple[str, ...] = ()
    state: int = 0


@dataclass(frozen=True)
class AssetSpec:
    path: str
    size_bytes: int
    sha256: str
    content_type: str = ""


@dataclass(frozen=True)
class BuildSpec:
    platform: int
    version: str
    release_notes: str = ""
    assets: tuple[AssetSpec, ...] = ()


@dataclass(frozen=True)
class GameListQuery:
    page_size: int = 0
    page_token: str = ""
    query: str = ""
    genre: str = ""
    platform: int = 0
    publisher: str = ""
    state: int = 0
    order_by: str = ""


@dataclass
class GameRecord:
    row: GameRow
    platforms: list[int] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return etag_of(self.row)


@dataclass
class ChannelRecord:
    row: ChannelRow
    current: list[ReleaseRow] = field(default_factory=list)


@dataclass(frozen=True)
class AssetLinkRecord:
    path: str
    size_bytes: int
    sha256: str
    link: SignedLink


@dataclass(frozen=True)
class LinkSet:
    build: BuildRow
    links: list[AssetLinkRecord]
    ttl_s: int


def etag_of(row: GameRow) -> str:
    return hashlib.sha256(f"{row.id}:{row.revision}".encode()).hexdigest()[:20]


def _can_see(game: GameRow, principal: Principal) -> bool:
    return game.state == GameState.PUBLISHED or principal.is_admin or game.publisher == principal.subject


def _check_can_edit(game: GameRow, principal: Principal) -> None:
    require_signed_in(principal)
    if not (principal.is_admin or game.publisher == principal.subject):
        raise PermissionDenied(f"only the publisher of games/{game.id} or an admin may change it")


def _check_text(v: Violations, value: str, field: str, *, maximum: int, minimum: int = 0) -> None:
    """Free text: its length, and no U+0000, which PostgreSQL text cannot hold (the write would fail as INTERNAL)."""
    v.check_length(value, field, minimum=minimum, maximum=maximum)
    if "\x00" in value:
        v.add(field, "must not contain NUL characters")


def _validate_game_fields(fields: GameFields, paths: set[str], v: Violations) -> None:
    if "display_name" in paths:
        _check_text(v, fields.display_name.strip(), "game.display_name", minimum=1, maximum=200)
    if "description" in paths:
        _check_text(v, fields.description, "game.description", maximum=10_000)
    if "genres" in paths:
        if len(fields.genres) > 10:
            v.add("game.genres", "must have at most 10 genres")
        for index, genre in enumerate(fields.genres):
            if not GENRE.match(genre):
                v.add(f"game.genres[{index}]", "must be 1-40 lower-case letters, digits or hyphens")
        if len(set(fields.genres)) != len(fields.genres):
            v.add("game.genres", "must not repeat a genre")
    if "state" in paths and fields.state not in GameState.__members__.values():
        v.add("game.state", "must be DRAFT, PUBLISHED or ARCHIVED")


def _validate_ttl(ttl: timedelta | None, field_name: str, *, maximum: timedelta) -> int:
    if ttl is None:
        return 3600
    if not timedelta(minutes=1) <= ttl <= maximum:
        raise InvalidArgument.field(field_name, f"must be between 1 minute and {maximum}")
    return int(ttl.total_seconds())


def _platform(value: int, field_name: str) -> int:
    if value not in PLATFORMS:
        raise InvalidArgument.field(field_name, "must be a platform (WINDOWS, MACOS, LINUX, ANDROID, IOS, WEB)")
    return value


class Catalog:
    """The game catalog's operations. Each takes the RPC's unit of work and the caller."""

    def __init__(self, page_tokens: PageTokens, storage: AssetStorage) -> None:
        self._tokens = page_tokens
        self._storage = storage

    # Games

    async def _visible_game(
        self,
        uow: UnitOfWork,
        name_or_id: str,
        principal: Principal,
        *,
        field: str = "name",
        for_update: bool = False,
        is_id: bool = False,
    ) -> GameRow:
        game_id = name_or_id if is_id else parse_name(GAME, name_or_id, field=field)["game"]
        game = await repo.get_game(uow.session, game_id, for_update=for_update)
        if game is None or not _can_see(game, principal):
            raise _game_not_found(game_id)
        return game

    async def _record(self, uow: UnitOfWork, game: GameRow) -> GameRecord:
        found = await repo.get_game_with_platforms(uow.session, game.id)
        assert found is not None
        return GameRecord(*found)

    async def create_game(self, uow: UnitOfWork, principal: Principal, game_id: str, fields: GameFields) -> GameRecord:
        require_role(principal, Role.PUBLISHER)
        v = Violations()
        v.check_resource_id(game_id, "game_id")
        _validate_game_fields(fields, {"display_name", "description", "genres"}, v)
        v.raise_if_any()
        row = GameRow(
            id=game_id,
            display_name=fields.display_name.strip(),
            description=fields.description,
            genres=list(fields.genres),
            publisher=principal.subject,
            state=GameState.DRAFT,
            revision=1,
        )
        if not await repo.insert_game(uow.session, row):
            raise AlreadyExists(
                f"games/{game_id} already exists",
                reason="GAME_ALREADY_EXISTS",
                metadata={"resource": f"games/{game_id}"},
            )
        created = await repo.get_game(uow.session, game_id)
        assert created is not None
        return GameRecord(created, [])

    async def get_game(self, uow: UnitOfWork, principal: Principal, name: str) -> GameRecord:
        game_id = parse_name(GAME, name)["game"]
        found = await repo.get_game_with_platforms(uow.session, game_id)
        if found is None or not _can_see(found[0], principal):
            raise _game_not_found(game_id)
        return GameRecord(*found)

    async def list_games(self, uow: UnitOfWork, principal: Principal, q: GameListQuery) -> tuple[list[GameRecord], str]:
        limit = page_size(q.page_size)
        v = Violations()
        order_by = " ".join(q.order_by.lower().split()) or "create_time desc"
        if order_by not in repo.GAME_ORDERS:
            v.add("order_by", f"must be one of: {', '.join(repo.GAME_ORDERS)}")
        _check_text(v, q.query, "query", maximum=200)
        if q.genre and not GENRE.match(q.genre):
            v.add("genre", "must be 1-40 lower-case letters, digits or hyphens")
        if q.platform and q.platform not in PLATFORMS:
            v.add("platform", "is not a platform")
        if q.state and q.state not in GameState.__members__.values():
            v.add("state", "is not a state")
        v.raise_if_any()
        publisher = normalize_wallet(q.publisher, "publisher") if q.publisher else ""
        scope = self._tokens.scope("games", q.query, q.genre, q.platform, publisher, q.state, order_by)
        cursor = self._tokens.decode(q.page_token, scope=scope)
        after: tuple[Any, str] | None = None
        if cursor is not None:
            after = (_cursor_value(order_by, cursor["v"]), cursor["id"])
        visible_to = None if principal.is_admin else principal.subject
        rows = await repo.list_games(
            uow.session,
            visible_to=visible_to,
            published_state=GameState.PUBLISHED,
            query=q.query.strip(),
            genre=q.genre,
            platform=q.platform,
            publisher=publisher,
            state=q.state,
            order_by=order_by,
            after=after,
            limit=limit + 1,
        )
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1][0]
            column = repo.GAME_ORDERS[order_by][0].key
            value = getattr(last, column)
            next_token = self._tokens.encode(
                {"v": value.isoformat() if hasattr(value, "isoformat") else value, "id": last.id}, scope=scope
            )
        return [GameRecord(game, platforms) for game, platforms in rows], next_token

    async def update_game(
        self, uow: UnitOfWork, principal: Principal, name: str, fields: GameFields, paths: set[str], etag: str
    ) -> GameRecord:
        game = await self._visible_game(uow, name, principal, field="game.name", for_update=True)
        _check_can_edit(game, principal)
        if etag and etag != etag_of(game):
            raise Aborted("the game changed since it was read (stale etag)", reason="ETAG_MISMATCH")
        if fields.state == 0:  # the contract: an unset state means "leave it as it is", even under `*`
            paths = paths - {"state"}
        v = Violations()
        _validate_game_fields(fields, paths, v)
        v.raise_if_any()
        publishing = "state" in paths and fields.state == GameState.PUBLISHED and game.state != GameState.PUBLISHED
        if publishing and await repo.count_builds(uow.session, game.id) == 0:
            raise FailedPrecondition("a game needs at least one build to be published", reason="NO_BUILDS")
        changed = False
        for path in paths:
            value: Any = getattr(fields, path)
            if path == "display_name":
                value = value.strip()
            if path == "genres":
                value = list(value)
            if getattr(game, path) != value:
                setattr(game, path, value)
                changed = True
        if changed:
            game.revision += 1
            game.update_time = await repo.now(uow.session)
            await uow.session.flush()
        return await self._record(uow, game)

    async def delete_game(self, uow: UnitOfWork, principal: Principal, name: str, etag: str) -> None:
        game = await self._visible_game(uow, name, principal, for_update=True)
        _check_can_edit(game, principal)
        if etag and etag != etag_of(game):
            raise Aborted("the game changed since it was read (stale etag)", reason="ETAG_MISMATCH")
        if game.state == GameState.PUBLISHED:
            raise FailedPrecondition("archive a published game before deleting it", reason="GAME_PUBLISHED")
        await repo.delete_game(uow.session, game.id)

    # Builds

    async def create_build(
        self, uow: UnitOfWork, principal: Principal, parent: str, build_id: str, spec: BuildSpec
    ) -> BuildRow:
        game = await self._visible_game(uow, parent, principal, field="parent", for_update=True)
        _check_can_edit(game, principal)
        v = Violations()
        if build_id:
            v.check_resource_id(build_id, "build_id")
        if spec.platform not in PLATFORMS:
            v.add("build.platform", "must be a platform (WINDOWS, MACOS, LINUX, ANDROID, IOS, WEB)")
        if not SEMVER.match(spec.version) or len(spec.version) > 64:
            v.add("build.version", "must be a Semantic Version such as 1.4.0, at most 64 characters")
        _check_text(v, spec.release_notes, "build.release_notes", maximum=10_000)
        assets = _validate_assets(spec.assets, v)
        v.raise_if_any()
        row = BuildRow(
            game_id=game.id,
            id=build_id or _generated_id(spec),
            platform=spec.platform,
            version=spec.version,
            release_notes=spec.release_notes,
            assets=assets,
            total_size_bytes=sum(a["size_bytes"] for a in assets),
            creator=principal.subject,
        )
        if await repo.insert_build(uow.session, row) is None:
            raise AlreadyExists(
                f"games/{game.id} already has build {row.id!r} or a {spec.version} build for this platform",
                reason="BUILD_ALREADY_EXISTS",
                metadata={"resource": format_name(BUILD, game=game.id, build=row.id)},
            )
        await repo.touch_game(uow.session, game.id, row.create_time)
        return row

    async def _visible_build(
        self,
        uow: UnitOfWork,
        principal: Principal,
        name: str,
        *,
        field: str = "name",
        edit: bool = False,
        lock: bool = False,
    ) -> tuple[GameRow, BuildRow]:
        ids = parse_name(BUILD, name, field=field)
        game = await self._visible_game(uow, ids["game"], principal, is_id=True, for_update=lock)
        if edit:
            _check_can_edit(game, principal)
        build = await repo.get_build(uow.session, ids["game"], ids["build"])
        if build is None:
            raise NotFound(f"{name} does not exist", reason="BUILD_NOT_FOUND", metadata={"resource": name})
        return game, build

    async def get_build(self, uow: UnitOfWork, principal: Principal, name: str) -> BuildRow:
        return (await self._visible_build(uow, principal, name))[1]

    async def list_builds(
        self, uow: UnitOfWork, principal: Principal, parent: str, size: int, token: str, platform: int
    ) -> tuple[list[BuildRow], str]:
        limit = page_size(size)
        if platform:
            _platform(platform, "platform")
        game = await self._visible_game(uow, parent, principal, field="parent")
        scope = self._tokens.scope("builds", game.id, platform)
        cursor = self._tokens.decode(token, scope=scope)
        rows = await repo.list_builds(
            uow.session,
            game.id,
            platform=platform,
            after_seq=cursor["seq"] if cursor else None,
            limit=limit + 1,
        )
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._tokens.encode({"seq": rows[-1].seq}, scope=scope)
        return rows, next_token

    async def delete_build(self, uow: UnitOfWork, principal: Principal, name: str) -> None:
        game, build = await self._visible_build(uow, principal, name, edit=True, lock=True)
        if await repo.build_is_released(uow.session, game.id, build.id):
            raise FailedPrecondition(f"{name} has been released on a channel", reason="BUILD_IN_USE")
        if game.state == GameState.PUBLISHED and await repo.count_builds(uow.session, game.id) == 1:
            raise FailedPrecondition(
                "a published game keeps at least one build; archive the game first", reason="LAST_BUILD"
            )
        await repo.delete_build(uow.session, game.id, build.id)
        await repo.touch_game(uow.session, game.id, await repo.now(uow.session))

    async def upload_links(self, uow: UnitOfWork, principal: Principal, name: str, ttl: timedelta | None) -> LinkSet:
        ttl_s = _validate_ttl(ttl, "ttl", maximum=timedelta(hours=12))
        _, build = await self._visible_build(uow, principal, name, edit=True)
        links = [
            AssetLinkRecord(
                path=asset["path"],
                size_bytes=asset["size_bytes"],
                sha256=asset["sha256"],
                link=self._storage.upload_link(
                    self._storage.object_key(build.game_id, build.id, asset["path"]),
                    ttl_s=ttl_s,
                    size_bytes=asset["size_bytes"],
                    sha256_hex=asset["sha256"],
                    content_type=asset["content_type"],
                ),
            )
            for asset in build.assets
        ]
        return LinkSet(build, links, ttl_s)

    async def download_links(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        build_name: str,
        channel_name: str,
        platform: int,
        ttl: timedelta | None,
    ) -> LinkSet:
        ttl_s = _validate_ttl(ttl, "ttl", maximum=timedelta(hours=24))
        if build_name:
            _, build = await self._visible_build(uow, principal, build_name, field="build")
        elif channel_name:
            _platform(platform, "platform")
            ids = parse_name(CHANNEL, channel_name, field="channel")
            await self._visible_game(uow, ids["game"], principal, is_id=True)
            release = await repo.current_release(uow.session, ids["game"], ids["channel"], platform)
            if release is None:
                if await repo.get_channel(uow.session, ids["game"], ids["channel"]) is None:
                    raise _channel_not_found(channel_name)
                raise NotFound(f"{channel_name} has no current release for this platform", reason="NO_RELEASE")
            found = await repo.get_build(uow.session, release.game_id, release.build_id)
            assert found is not None
            build = found
        else:
            raise InvalidArgument.field("build", "name a build, or a channel and a platform")
        links = [
            AssetLinkRecord(
                path=asset["path"],
                size_bytes=asset["size_bytes"],
                sha256=asset["sha256"],
                link=self._storage.download_link(
                    self._storage.object_key(build.game_id, build.id, asset["path"]),
                    ttl_s=ttl_s,
                    content_type=asset["content_type"],
                    filename=asset["path"].rsplit("/", 1)[-1],
                ),
            )
            for asset in build.assets
        ]
        return LinkSet(build, links, ttl_s)

    # Channels

    async def create_channel(
        self, uow: UnitOfWork, principal: Principal, parent: str, channel_id: str, description: str
    ) -> ChannelRecord:
        game = await self._visible_game(uow, parent, principal, field="parent", for_update=True)
        _check_can_edit(game, principal)
        v = Violations()
        v.check_resource_id(channel_id, "channel_id")
        _check_text(v, description, "channel.description", maximum=1000)
        v.raise_if_any()
        row = ChannelRow(game_id=game.id, id=channel_id, description=description)
        if not await repo.insert_channel(uow.session, row):
            raise AlreadyExists(
                f"games/{game.id}/channels/{channel_id} already exists",
                reason="CHANNEL_ALREADY_EXISTS",
                metadata={"resource": format_name(CHANNEL, game=game.id, channel=channel_id)},
            )
        return ChannelRecord(row, [])

    async def _visible_channel(
        self, uow: UnitOfWork, principal: Principal, name: str, *, edit: bool = False, field: str = "name"
    ) -> ChannelRow:
        ids = parse_name(CHANNEL, name, field=field)
        # Writes lock the game row first, so they serialize with DeleteGame and with DeleteBuild.
        game = await self._visible_game(uow, ids["game"], principal, is_id=True, for_update=edit)
        if edit:
            _check_can_edit(game, principal)
        channel = await repo.get_channel(uow.session, ids["game"], ids["channel"], for_update=edit)
        if channel is None:
            raise _channel_not_found(name)
        return channel

    async def _channel_record(self, uow: UnitOfWork, channel: ChannelRow) -> ChannelRecord:
        current = await repo.current_releases(uow.session, channel.game_id, [channel.id])
        return ChannelRecord(channel, current[channel.id])

    async def get_channel(self, uow: UnitOfWork, principal: Principal, name: str) -> ChannelRecord:
        return await self._channel_record(uow, await self._visible_channel(uow, principal, name))

    async def list_channels(
        self, uow: UnitOfWork, principal: Principal, parent: str, size: int, token: str
    ) -> tuple[list[ChannelRecord], str]:
        limit = page_size(size)
        game = await self._visible_game(uow, parent, principal, field="parent")
        scope = self._tokens.scope("channels", game.id)
        cursor = self._tokens.decode(token, scope=scope)
        rows = await repo.list_channels(
            uow.session, game.id, after_id=cursor["id"] if cursor else None, limit=limit + 1
        )
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._tokens.encode({"id": rows[-1].id}, scope=scope)
        current = await repo.current_releases(uow.session, game.id, [row.id for row in rows])
        return [ChannelRecord(row, current[row.id]) for row in rows], next_token

    async def delete_channel(self, uow: UnitOfWork, principal: Principal, name: str) -> None:
        channel = await self._visible_channel(uow, principal, name, edit=True)
        await repo.delete_channel(uow.session, channel.game_id, channel.id)

    async def promote_build(
        self, uow: UnitOfWork, principal: Principal, name: str, build_name: str
    ) -> tuple[ChannelRecord, ReleaseRow | None]:
        channel = await self._visible_channel(uow, principal, name, edit=True)
        ids = parse_name(BUILD, build_name, field="build")
        if ids["game"] != channel.game_id:
            raise InvalidArgument.field("build", f"must be a build of games/{channel.game_id}")
        build = await repo.get_build(uow.session, channel.game_id, ids["build"])
        if build is None:
            raise NotFound(f"{build_name} does not exist", reason="BUILD_NOT_FOUND", metadata={"resource": build_name})
        current = await repo.current_release(uow.session, channel.game_id, channel.id, build.platform)
        if current is not None and current.build_id == build.id:
            return await self._channel_record(uow, channel), None
        if current is not None:
            await repo.set_release_state(uow.session, current.id, ReleaseState.SUPERSEDED)
        release = await repo.insert_release(
            uow.session,
            ReleaseRow(
                game_id=channel.game_id,
                channel_id=channel.id,
                build_id=build.id,
                platform=build.platform,
                version=build.version,
                state=ReleaseState.CURRENT,
                promoter=principal.subject,
            ),
        )
        await repo.touch_channel(uow.session, channel.game_id, channel.id, release.create_time)
        await uow.session.refresh(channel)
        return await self._channel_record(uow, channel), release

    async def rollback_channel(
        self, uow: UnitOfWork, principal: Principal, name: str, platform: int
    ) -> tuple[ChannelRecord, ReleaseRow]:
        _platform(platform, "platform")
        channel = await self._visible_channel(uow, principal, name, edit=True)
        current = await repo.current_release(uow.session, channel.game_id, channel.id, platform)
        previous = (
            await repo.previous_release(uow.session, channel.game_id, channel.id, platform, current.id)
            if current is not None
            else None
        )
        if current is None or previous is None:
            raise FailedPrecondition(
                "there is no earlier release of this platform to roll back to", reason="NOTHING_TO_ROLL_BACK"
            )
        await repo.set_release_state(uow.session, current.id, ReleaseState.ROLLED_BACK)
        await repo.set_release_state(uow.session, previous.id, ReleaseState.CURRENT)
        await repo.touch_channel(uow.session, channel.game_id, channel.id, await repo.now(uow.session))
        await uow.session.refresh(channel)
        await uow.session.refresh(previous)
        return await self._channel_record(uow, channel), previous

    async def list_releases(
        self, uow: UnitOfWork, principal: Principal, parent: str, size: int, token: str, platform: int
    ) -> tuple[list[ReleaseRow], str]:
        limit = page_size(size)
        if platform:
            _platform(platform, "platform")
        channel = await self._visible_channel(uow, principal, parent, field="parent")
        scope = self._tokens.scope("releases", channel.game_id, channel.id, platform)
        cursor = self._tokens.decode(token, scope=scope)
        rows = await repo.list_releases(
            uow.session,
            channel.game_id,
            channel.id,
            platform=platform,
            after_id=cursor["id"] if cursor else None,
            limit=limit + 1,
        )
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._tokens.encode({"id": rows[-1].id}, scope=scope)
        return rows, next_token


def _game_not_found(game_id: str) -> NotFound:
    return NotFound(
        f"games/{game_id} does not exist", reason="GAME_NOT_FOUND", metadata={"resource": f"games/{game_id}"}
    )


def _channel_not_found(name: str) -> NotFound:
    return NotFound(f"{name} does not exist", reason="CHANNEL_NOT_FOUND", metadata={"resource": name})


def _cursor_value(order_by: str, value: Any) -> Any:
    from datetime import datetime

    if order_by.startswith(("create_time", "update_time")):
        return datetime.fromisoformat(value)
    return value


def _generated_id(spec: BuildSpec) -> str:
    import secrets

    return f"b-{secrets.token_hex(6)}"


def _validate_assets(assets: tuple[AssetSpec, ...], v: Violations) -> list[dict[str, Any]]:
    if not 1 <= len(assets) <= MAX_ASSETS:
        v.add("build.assets", f"must list 1 to {MAX_ASSETS} files")
    seen: set[str] = set()
    normalized = []
    for index, asset in enumerate(assets):
        where = f"build.assets[{index}]"
        segments = asset.path.split("/")
        if (
            not ASSET_PATH.match(asset.path)
            or asset.path.startswith("/")
            or any(segment in ("", ".", "..") for segment in segments)
        ):
            v.add(f"{where}.path", "must be a relative path of letters, digits and ._-/ without '..' segments")
        elif asset.path in seen:
            v.add(f"{where}.path", "repeats an earlier asset's path")
        seen.add(asset.path)
        if not 1 <= asset.size_bytes <= MAX_ASSET_BYTES:
            v.add(f"{where}.size_bytes", f"must be between 1 and {MAX_ASSET_BYTES}")
        sha256 = asset.sha256.lower()
        if not SHA256_HEX.match(sha256):
            v.add(f"{where}.sha256", "must be 64 hex characters")
        content_type = asset.content_type or "application/octet-stream"
        if len(content_type) > 255 or not CONTENT_TYPE.match(content_type):
            v.add(f"{where}.content_type", "must be a MIME type such as application/zip")
        normalized.append(
            {
                "path": asset.path,
                "size_bytes": asset.size_bytes,
                "sha256": sha256,
                "content_type": content_type,
            }
        )
    return normalized
