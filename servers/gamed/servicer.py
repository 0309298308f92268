"""far.gamed.v1.GamedService: proto in, catalog call, proto out. Events go out after the commit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from far.gamed.v1 import build_pb2, channel_pb2, game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf import empty_pb2

from servers.common.context import current_principal
from servers.common.db import Database
from servers.common.fieldmask import update_paths
from servers.gamed import convert
from servers.gamed.catalog import (
    UPDATABLE_GAME_FIELDS,
    AssetSpec,
    BuildSpec,
    Catalog,
    GameFields,
    GameListQuery,
)

Context = grpc.aio.ServicerContext[Any, Any]
GAMES_TOPIC = "gamed.games"
RELEASES_TOPIC = "gamed.releases"


def _fields(game: game_pb2.Game) -> GameFields:
    return GameFields(
        display_name=game.display_name,
        description=game.description,
        genres=tuple(game.genres),
        state=game.state,
    )


class GamedServicer(gamed_service_pb2_grpc.GamedServiceServicer):
    def __init__(self, database: Database, catalog: Catalog) -> None:
        self._db = database
        self._catalog = catalog

    async def CreateGame(self, request: gamed_service_pb2.CreateGameRequest, context: Context) -> game_pb2.Game:
        async with self._db.transaction() as uow:
            record = await self._catalog.create_game(uow, current_principal(), request.game_id, _fields(request.game))
            game = convert.game(record)
            uow.publish(GAMES_TOPIC, game)
        return game

    async def GetGame(self, request: gamed_service_pb2.GetGameRequest, context: Context) -> game_pb2.Game:
        async with self._db.read() as uow:
            return convert.game(await self._catalog.get_game(uow, current_principal(), request.name))

    async def ListGames(
        self, request: gamed_service_pb2.ListGamesRequest, context: Context
    ) -> gamed_service_pb2.ListGamesResponse:
        query = GameListQuery(
            page_size=request.page_size,
            page_token=request.page_token,
            query=request.query,
            genre=request.genre,
            platform=request.platform,
            publisher=request.publisher,
            state=request.state,
            order_by=request.order_by,
        )
        async with self._db.read() as uow:
            records, token = await self._catalog.list_games(uow, current_principal(), query)
            return gamed_service_pb2.ListGamesResponse(games=[convert.game(r) for r in records], next_page_token=token)

    async def UpdateGame(self, request: gamed_service_pb2.UpdateGameRequest, context: Context) -> game_pb2.Game:
        paths = update_paths(request.update_mask, request.game, updatable=UPDATABLE_GAME_FIELDS)
        async with self._db.transaction() as uow:
            record = await self._catalog.update_game(
                uow, current_principal(), request.game.name, _fields(request.game), paths, request.game.etag
            )
            game = convert.game(record)
            uow.publish(GAMES_TOPIC, game)
        return game

    async def DeleteGame(self, request: gamed_service_pb2.DeleteGameRequest, context: Context) -> empty_pb2.Empty:
        async with self._db.transaction() as uow:
            await self._catalog.delete_game(uow, current_principal(), request.name, request.etag)
        return empty_pb2.Empty()

    async def CreateBuild(self, request: gamed_service_pb2.CreateBuildRequest, context: Context) -> build_pb2.Build:
        spec = BuildSpec(
            platform=request.build.platform,
            version=request.build.version,
            release_notes=request.build.release_notes,
            assets=tuple(
                AssetSpec(path=a.path, size_bytes=a.size_bytes, sha256=a.sha256, content_type=a.content_type)
                for a in request.build.assets
            ),
        )
        async with self._db.transaction() as uow:
            row = await self._catalog.create_build(uow, current_principal(), request.parent, request.build_id, spec)
            return convert.build(row)

    async def GetBuild(self, request: gamed_service_pb2.GetBuildRequest, context: Context) -> build_pb2.Build:
        async with self._db.read() as uow:
            return convert.build(await self._catalog.get_build(uow, current_principal(), request.name))

    async def ListBuilds(
        self, request: gamed_service_pb2.ListBuildsRequest, context: Context
    ) -> gamed_service_pb2.ListBuildsResponse:
        async with self._db.read() as uow:
            rows, token = await self._catalog.list_builds(
                uow,
                current_principal(),
                request.parent,
                request.page_size,
                request.page_token,
                request.platform,
            )
            return gamed_service_pb2.ListBuildsResponse(builds=[convert.build(r) for r in rows], next_page_token=token)

    async def DeleteBuild(self, request: gamed_service_pb2.DeleteBuildRequest, context: Context) -> empty_pb2.Empty:
        async with self._db.transaction() as uow:
            await self._catalog.delete_build(uow, current_principal(), request.name)
        return empty_pb2.Empty()

    async def GenerateUploadLinks(
        self, request: gamed_service_pb2.GenerateUploadLinksRequest, context: Context
    ) -> gamed_service_pb2.GenerateUploadLinksResponse:
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else None
        async with self._db.read() as uow:
            link_set = await self._catalog.upload_links(uow, current_principal(), request.name, ttl)
        links, expire_time = convert.links(link_set, datetime.now(UTC))
        return gamed_service_pb2.GenerateUploadLinksResponse(links=links, expire_time=expire_time)

    async def GenerateDownloadLinks(
        self, request: gamed_service_pb2.GenerateDownloadLinksRequest, context: Context
    ) -> gamed_service_pb2.GenerateDownloadLinksResponse:
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else None
        async with self._db.read() as uow:
            link_set = await self._catalog.download_links(
                uow,
                current_principal(),
                build_name=request.build,
                channel_name=request.channel,
                platform=request.platform,
                ttl=ttl,
            )
        links, expire_time = convert.links(link_set, datetime.now(UTC))
        build = link_set.build
        return gamed_service_pb2.GenerateDownloadLinksResponse(
            build=f"games/{build.game_id}/builds/{build.id}",
            platform=game_pb2.Platform.ValueType(build.platform),
            version=build.version,
            links=links,
            expire_time=expire_time,
        )

    async def CreateChannel(
        self, request: gamed_service_pb2.CreateChannelRequest, context: Context
    ) -> channel_pb2.Channel:
        async with self._db.transaction() as uow:
            record = await self._catalog.create_channel(
                uow, current_principal(), request.parent, request.channel_id, request.channel.description
            )
            return convert.channel(record.row, record.current)

    async def GetChannel(self, request: gamed_service_pb2.GetChannelRequest, context: Context) -> channel_pb2.Channel:
        async with self._db.read() as uow:
            record = await self._catalog.get_channel(uow, current_principal(), request.name)
            return convert.channel(record.row, record.current)

    async def ListChannels(
        self, request: gamed_service_pb2.ListChannelsRequest, context: Context
    ) -> gamed_service_pb2.ListChannelsResponse:
        async with self._db.read() as uow:
            records, token = await self._catalog.list_channels(
                uow, current_principal(), request.parent, request.page_size, request.page_token
            )
            return gamed_service_pb2.ListChannelsResponse(
                channels=[convert.channel(r.row, r.current) for r in records], next_page_token=token
            )

    async def DeleteChannel(self, request: gamed_service_pb2.DeleteChannelRequest, context: Context) -> empty_pb2.Empty:
        async with self._db.transaction() as uow:
            await self._catalog.delete_channel(uow, current_principal(), request.name)
        return empty_pb2.Empty()

    async def PromoteBuild(
        self, request: gamed_service_pb2.PromoteBuildRequest, context: Context
    ) -> channel_pb2.Channel:
        async with self._db.transaction() as uow:
            record, release = await self._catalog.promote_build(uow, current_principal(), request.name, request.build)
            if release is not None:
                uow.publish(RELEASES_TOPIC, convert.release(release))
            return convert.channel(record.row, record.current)

    async def RollbackChannel(
        self, request: gamed_service_pb2.RollbackChannelRequest, context: Context
    ) -> channel_pb2.Channel:
        async with self._db.transaction() as uow:
            record, release = await self._catalog.rollback_channel(
                uow, current_principal(), request.name, request.platform
            )
            uow.publish(RELEASES_TOPIC, convert.release(release))
            return convert.channel(record.row, record.current)

    async def ListReleases(
        self, request: gamed_service_pb2.ListReleasesRequest, context: Context
    ) -> gamed_service_pb2.ListReleasesResponse:
        async with self._db.read() as uow:
            rows, token = await self._catalog.list_releases(
                uow,
                current_principal(),
                request.parent,
                request.page_size,
                request.page_token,
                request.platform,
            )
            return gamed_service_pb2.ListReleasesResponse(
                releases=[convert.release(r) for r in rows], next_page_token=token
            )
