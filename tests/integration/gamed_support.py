"""Building blocks for the gamed integration tests: unique ids, request messages and callers.

Every test run shares one database, so each test makes its own ids, genres and wallets and filters
lists by them instead of counting rows.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import grpc
from far.gamed.v1 import build_pb2, channel_pb2, game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf import field_mask_pb2

from tests.integration.rich_errors import rich_error

Metadata = tuple[tuple[str, str], ...]
Auth = Callable[..., Metadata]
if TYPE_CHECKING:  # the stub of a grpc.aio channel; only the .pyi names this type
    Stub: TypeAlias = gamed_service_pb2_grpc.GamedServiceAsyncStub
else:
    Stub = gamed_service_pb2_grpc.GamedServiceStub

WINDOWS = game_pb2.PLATFORM_WINDOWS
MACOS = game_pb2.PLATFORM_MACOS
LINUX = game_pb2.PLATFORM_LINUX
DRAFT = game_pb2.Game.STATE_DRAFT
PUBLISHED = game_pb2.Game.STATE_PUBLISHED
ARCHIVED = game_pb2.Game.STATE_ARCHIVED
CURRENT = channel_pb2.Release.STATE_CURRENT
SUPERSEDED = channel_pb2.Release.STATE_SUPERSEDED
ROLLED_BACK = channel_pb2.Release.STATE_ROLLED_BACK


def unique_id(prefix: str = "g") -> str:
    """A resource id no other test uses: `<prefix>-<10 hex>`."""
    return f"{prefix}-{secrets.token_hex(5)}"


def unique_genre() -> str:
    return f"genre{secrets.token_hex(5)}"


def unique_word() -> str:
    """A word for full-text queries that only this test's games contain."""
    return f"word{secrets.token_hex(5)}"


def fresh_wallet() -> str:
    return "0x" + secrets.token_hex(20)


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def asset(path: str = "bin/game.exe", size: int = 1024, *, content_type: str = "", sha256: str = "") -> build_pb2.Asset:
    return build_pb2.Asset(
        path=path, size_bytes=size, sha256=sha256 or sha256_of(path.encode()), content_type=content_type
    )


def build_message(
    platform: int = WINDOWS,
    version: str = "1.0.0",
    assets: Sequence[build_pb2.Asset] | None = None,
    release_notes: str = "",
) -> build_pb2.Build:
    return build_pb2.Build(
        platform=platform,  # type: ignore[arg-type]
        version=version,
        release_notes=release_notes,
        assets=list(assets) if assets is not None else [asset()],
    )


def game_name(game: str) -> str:
    return game if game.startswith("games/") else f"games/{game}"


@dataclass
class Caller:
    """A signed-in account (or, with no metadata, an anonymous caller) and the calls the tests repeat."""

    gamed: Stub
    wallet: str
    metadata: Metadata

    async def create_game(
        self,
        game_id: str | None = None,
        *,
        display_name: str = "A Game",
        description: str = "",
        genres: Sequence[str] = (),
    ) -> game_pb2.Game:
        return await self.gamed.CreateGame(
            gamed_service_pb2.CreateGameRequest(
                game_id=game_id or unique_id(),
                game=game_pb2.Game(display_name=display_name, description=description, genres=list(genres)),
            ),
            metadata=self.metadata,
        )

    async def create_build(
        self,
        game: str,
        *,
        platform: int = WINDOWS,
        version: str = "1.0.0",
        assets: Sequence[build_pb2.Asset] | None = None,
        build_id: str = "",
    ) -> build_pb2.Build:
        return await self.gamed.CreateBuild(
            gamed_service_pb2.CreateBuildRequest(
                parent=game_name(game), build_id=build_id, build=build_message(platform, version, assets)
            ),
            metadata=self.metadata,
        )

    async def update_game(self, game: game_pb2.Game, *paths: str) -> game_pb2.Game:
        return await self.gamed.UpdateGame(
            gamed_service_pb2.UpdateGameRequest(game=game, update_mask=field_mask_pb2.FieldMask(paths=list(paths))),
            metadata=self.metadata,
        )

    async def set_state(self, game: str, state: int) -> game_pb2.Game:
        return await self.update_game(game_pb2.Game(name=game_name(game), state=state), "state")  # type: ignore[arg-type]

    async def published_game(self, **fields: object) -> game_pb2.Game:
        """A game with one Windows build 1.0.0, published."""
        game = await self.create_game(**fields)  # type: ignore[arg-type]
        await self.create_build(game.name)
        return await self.set_state(game.name, PUBLISHED)

    async def get_game(self, game: str) -> game_pb2.Game:
        return await self.gamed.GetGame(gamed_service_pb2.GetGameRequest(name=game_name(game)), metadata=self.metadata)

    async def create_channel(self, game: str, channel_id: str = "stable", description: str = "") -> channel_pb2.Channel:
        return await self.gamed.CreateChannel(
            gamed_service_pb2.CreateChannelRequest(
                parent=game_name(game), channel_id=channel_id, channel=channel_pb2.Channel(description=description)
            ),
            metadata=self.metadata,
        )

    async def promote(self, channel: str, build: str) -> channel_pb2.Channel:
        return await self.gamed.PromoteBuild(
            gamed_service_pb2.PromoteBuildRequest(name=channel, build=build), metadata=self.metadata
        )

    async def rollback(self, channel: str, platform: int) -> channel_pb2.Channel:
        return await self.gamed.RollbackChannel(
            gamed_service_pb2.RollbackChannelRequest(name=channel, platform=platform),  # type: ignore[arg-type]
            metadata=self.metadata,
        )

    async def releases(self, channel: str, platform: int = 0) -> list[channel_pb2.Release]:
        response = await self.gamed.ListReleases(
            gamed_service_pb2.ListReleasesRequest(parent=channel, page_size=100, platform=platform),  # type: ignore[arg-type]
            metadata=self.metadata,
        )
        return list(response.releases)

    async def list_games(self, **request: object) -> gamed_service_pb2.ListGamesResponse:
        return await self.gamed.ListGames(
            gamed_service_pb2.ListGamesRequest(**request),  # type: ignore[arg-type]
            metadata=self.metadata,
        )

    async def list_all_games(self, page_size: int = 2, **request: object) -> list[list[str]]:
        """Every page of ListGames as lists of names; asserts only the last token is empty."""
        pages: list[list[str]] = []
        token = ""
        while True:
            response = await self.list_games(page_size=page_size, page_token=token, **request)
            pages.append([game.name for game in response.games])
            token = response.next_page_token
            if not token:
                return pages
            assert len(response.games) == page_size
            assert len(pages) < 50, "pagination does not end"


def caller(gamed: Stub, auth: Auth, *roles: str, wallet: str | None = None) -> Caller:
    """A caller with a fresh wallet and `roles` (anonymous when no role is given)."""
    subject = wallet or fresh_wallet()
    return Caller(gamed, subject, auth(subject, *roles) if roles else ())


def publisher(gamed: Stub, auth: Auth) -> Caller:
    return caller(gamed, auth, "publisher")


def admin(gamed: Stub, auth: Auth) -> Caller:
    return caller(gamed, auth, "admin")


def user(gamed: Stub, auth: Auth) -> Caller:
    return caller(gamed, auth, "user")


def anonymous(gamed: Stub) -> Caller:
    return Caller(gamed, "", ())


async def outcome(call: Awaitable[object]) -> str:
    """`OK`, or the failed call's `CODE/REASON`: for comparing the results of racing calls."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        error = rich_error(exc)
        return f"{error.code.name}/{error.reason}"
    return "OK"
