"""far.gamed.v1 release events on Redis: published after a committed PromoteBuild / RollbackChannel, never otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from far.gamed.v1 import channel_pb2
from redis.asyncio import Redis

from tests.integration.gamed_support import (
    CURRENT,
    WINDOWS,
    Auth,
    Caller,
    Stub,
    publisher,
    unique_id,
)
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


class Releases:
    """The far.gamed.v1.Release events of one channel on `<prefix>events:gamed.releases`."""

    def __init__(self, redis: Redis, prefix: str, channel: str) -> None:
        self._redis = redis
        self._key = f"{prefix}events:gamed.releases"
        self._channel = channel

    async def all(self) -> list[channel_pb2.Release]:
        events = []
        entries: Any = await self._redis.xrange(self._key)
        for _id, fields in entries:
            release = channel_pb2.Release.FromString(fields[b"data"])
            if release.name.startswith(f"{self._channel}/releases/"):
                assert fields[b"type"] == b"far.gamed.v1.Release"
                assert int(fields[b"time"]) > 0
                events.append(release)
        return events


async def setup_channel(pub: Caller, versions: int) -> tuple[str, list[str]]:
    game = await pub.create_game()
    builds = [(await pub.create_build(game.name, version=f"1.{i}.0")).name for i in range(versions)]
    channel = await pub.create_channel(game.name, "stable")
    return channel.name, builds


class TestPromoteBuildEvents:
    async def test_promotion_publishes_the_new_release(
        self, gamed: Stub, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        pub = publisher(gamed, auth)
        channel, (build,) = await setup_channel(pub, 1)
        events = Releases(redis_client, redis_key_prefix, channel)
        assert await events.all() == []
        promoted = await pub.promote(channel, build)
        (event,) = await events.all()
        assert event == promoted.current_releases[0]
        assert (event.build, event.state, event.promoter, event.version) == (build, CURRENT, pub.wallet, "1.0.0")

    async def test_each_promotion_is_one_event_in_order(
        self, gamed: Stub, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        pub = publisher(gamed, auth)
        channel, builds = await setup_channel(pub, 3)
        for build in builds:
            await pub.promote(channel, build)
        events = await Releases(redis_client, redis_key_prefix, channel).all()
        assert [e.build for e in events] == builds
        assert [e.name for e in events] == [r.name for r in reversed(await pub.releases(channel))]

    async def test_repeated_promotion_publishes_nothing(
        self, gamed: Stub, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        pub = publisher(gamed, auth)
        channel, (build,) = await setup_channel(pub, 1)
        await pub.promote(channel, build)
        await pub.promote(channel, build)
        assert len(await Releases(redis_client, redis_key_prefix, channel).all()) == 1

    async def test_failed_promotion_publishes_nothing(
        self, gamed: Stub, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        pub = publisher(gamed, auth)
        channel, (build,) = await setup_channel(pub, 1)
        game = channel.split("/channels/")[0]
        await expect_error(
            pub.promote(channel, f"{game}/builds/{unique_id()}"), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND"
        )
        other_game = await pub.create_game()
        foreign = await pub.create_build(other_game.name)
        await expect_error(pub.promote(channel, foreign.name), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_error(publisher(gamed, auth).promote(channel, build), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        assert await Releases(redis_client, redis_key_prefix, channel).all() == []
        assert await pub.releases(channel) == []


class TestRollbackChannelEvents:
    async def test_rollback_publishes_the_restored_release(
        self, gamed: Stub, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        pub = publisher(gamed, auth)
        channel, (old, new) = await setup_channel(pub, 2)
        first = await pub.promote(channel, old)
        await pub.promote(channel, new)
        rolled = await pub.rollback(channel, WINDOWS)
        events = await Releases(redis_client, redis_key_prefix, channel).all()
        assert [e.build for e in events] == [old, new, old]
        assert events[-1] == rolled.current_releases[0]
        assert (events[-1].name, events[-1].state) == (first.current_releases[0].name, CURRENT)

    async def test_failed_rollback_publishes_nothing(
        self, gamed: Stub, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        pub = publisher(gamed, auth)
        channel, (build,) = await setup_channel(pub, 1)
        await pub.promote(channel, build)
        await expect_error(pub.rollback(channel, WINDOWS), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_ROLL_BACK")
        assert [e.build for e in await Releases(redis_client, redis_key_prefix, channel).all()] == [build]
