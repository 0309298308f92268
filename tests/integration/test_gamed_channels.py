"""far.gamed.v1 channels and releases: Create/Get/List/DeleteChannel, PromoteBuild, RollbackChannel, ListReleases."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from far.gamed.v1 import channel_pb2, game_pb2, gamed_service_pb2

from tests.integration.gamed_support import (
    CURRENT,
    LINUX,
    MACOS,
    ROLLED_BACK,
    SUPERSEDED,
    WINDOWS,
    Auth,
    Caller,
    Stub,
    admin,
    anonymous,
    outcome,
    publisher,
    unique_id,
    user,
)
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def get_channel(who: Caller, name: str) -> channel_pb2.Channel:
    return await who.gamed.GetChannel(gamed_service_pb2.GetChannelRequest(name=name), metadata=who.metadata)


async def list_channels(who: Caller, game: str, **request: object) -> gamed_service_pb2.ListChannelsResponse:
    return await who.gamed.ListChannels(
        gamed_service_pb2.ListChannelsRequest(parent=game, **request),  # type: ignore[arg-type]
        metadata=who.metadata,
    )


async def delete_channel(who: Caller, name: str) -> object:
    return await who.gamed.DeleteChannel(gamed_service_pb2.DeleteChannelRequest(name=name), metadata=who.metadata)


def current(channel: channel_pb2.Channel) -> list[tuple[int, str]]:
    """(platform, build) of each current release, in the channel's order."""
    return [(r.platform, r.build) for r in channel.current_releases]


def states(releases: list[channel_pb2.Release]) -> list[tuple[str, int]]:
    return [(r.build, r.state) for r in releases]


class TestCreateChannel:
    async def test_creates_an_empty_channel(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        channel = await pub.create_channel(game.name, "beta", "For testers")
        assert channel.name == f"{game.name}/channels/beta"
        assert channel.description == "For testers"
        assert list(channel.current_releases) == []
        assert channel.create_time.seconds > 0
        assert channel.update_time == channel.create_time
        assert await get_channel(pub, channel.name) == channel

    async def test_duplicate(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await pub.create_channel(game.name, "stable", "first")
        error = await expect_error(
            pub.create_channel(game.name, "stable", "second"), grpc.StatusCode.ALREADY_EXISTS, "CHANNEL_ALREADY_EXISTS"
        )
        assert error.info.metadata["resource"] == f"{game.name}/channels/stable"
        assert (await get_channel(pub, f"{game.name}/channels/stable")).description == "first"

    async def test_bad_fields(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(
            pub.create_channel(game.name, "Stable!", "d" * 1001),
            INVALID,
            fields=["channel_id", "channel.description"],
        )
        await expect_error(pub.create_channel(game.name, ""), INVALID, fields=["channel_id"])
        await expect_error(pub.create_channel(game.name, "beta", "\x00"), INVALID, fields=["channel.description"])

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        published = await owner.published_game()
        draft = await owner.create_game()
        await expect_error(publisher(gamed, auth).create_channel(published.name), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(anonymous(gamed).create_channel(published.name), grpc.StatusCode.UNAUTHENTICATED)
        await expect_error(user(gamed, auth).create_channel(draft.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        assert (await admin(gamed, auth).create_channel(draft.name, "qa")).name == f"{draft.name}/channels/qa"


class TestGetChannel:
    async def test_missing_channel(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        name = f"{game.name}/channels/nope"
        error = await expect_error(get_channel(pub, name), grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_FOUND")
        assert error.info.metadata["resource"] == name

    async def test_visibility_follows_the_game(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        draft = await owner.create_game()
        hidden = await owner.create_channel(draft.name)
        await expect_error(get_channel(anonymous(gamed), hidden.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        published = await owner.published_game()
        channel = await owner.create_channel(published.name)
        assert await get_channel(anonymous(gamed), channel.name) == channel

    @pytest.mark.parametrize("name", ["", "games/a/channels/", "games/a/channel/b", "games/a/builds/b"])
    async def test_malformed_name(self, gamed: Stub, name: str) -> None:
        await expect_error(get_channel(anonymous(gamed), name), INVALID, fields=["name"])


class TestListChannels:
    async def test_id_order_in_pages(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        for channel_id in ("stable", "alpha", "nightly", "beta", "dev"):
            await pub.create_channel(game.name, channel_id)
        await pub.promote(f"{game.name}/channels/beta", build.name)
        names, sizes, token = [], [], ""
        while True:
            response = await list_channels(pub, game.name, page_size=2, page_token=token)
            names += [c.name for c in response.channels]
            sizes.append(len(response.channels))
            for channel in response.channels:
                expected = [(WINDOWS, build.name)] if channel.name.endswith("/beta") else []
                assert current(channel) == expected
            token = response.next_page_token
            if not token:
                break
        assert sizes == [2, 2, 1]
        assert names == [f"{game.name}/channels/{c}" for c in ("alpha", "beta", "dev", "nightly", "stable")]

    async def test_bad_requests(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game, other = await pub.create_game(), await pub.create_game()
        for channel_id in ("a", "b"):
            await pub.create_channel(game.name, channel_id)
        token = (await list_channels(pub, game.name, page_size=1)).next_page_token
        assert token
        await expect_error(list_channels(pub, other.name, page_token=token), INVALID, fields=["page_token"])
        await expect_error(list_channels(pub, game.name, page_size=-1), INVALID, fields=["page_size"])
        await expect_error(list_channels(anonymous(gamed), game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")


class TestDeleteChannel:
    async def test_deletes_the_channel_and_its_history(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        channel = await pub.create_channel(game.name, "stable")
        await pub.promote(channel.name, build.name)
        await delete_channel(pub, channel.name)
        await expect_error(get_channel(pub, channel.name), grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_FOUND")
        await expect_error(pub.releases(channel.name), grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_FOUND")
        await expect_error(delete_channel(pub, channel.name), grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_FOUND")
        again = await pub.create_channel(game.name, "stable")
        assert list(again.current_releases) == []
        assert await pub.releases(again.name) == []

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        game = await owner.published_game()
        channel = await owner.create_channel(game.name)
        await expect_error(delete_channel(publisher(gamed, auth), channel.name), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(delete_channel(anonymous(gamed), channel.name), grpc.StatusCode.UNAUTHENTICATED)
        await delete_channel(admin(gamed, auth), channel.name)
        assert list((await list_channels(owner, game.name)).channels) == []


class TestPromoteBuild:
    async def test_sets_the_current_build_per_platform(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        linux = await pub.create_build(game.name, platform=LINUX)
        windows = await pub.create_build(game.name, platform=WINDOWS)
        created = await pub.create_channel(game.name)
        after_linux = await pub.promote(created.name, linux.name)
        assert current(after_linux) == [(LINUX, linux.name)]
        release = after_linux.current_releases[0]
        assert release.name.startswith(f"{created.name}/releases/")
        assert release.name.rsplit("/", 1)[1].isdigit()
        assert (release.version, release.state, release.promoter) == ("1.0.0", CURRENT, pub.wallet)
        assert after_linux.update_time == release.create_time
        assert after_linux.update_time.ToDatetime() > created.update_time.ToDatetime()
        after_windows = await pub.promote(created.name, windows.name)
        assert current(after_windows) == [(WINDOWS, windows.name), (LINUX, linux.name)]  # platform enum order
        assert await get_channel(pub, created.name) == after_windows

    async def test_newer_build_supersedes_the_current_one(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        old = await pub.create_build(game.name, version="1.0.0")
        new = await pub.create_build(game.name, version="1.1.0")
        mac = await pub.create_build(game.name, platform=MACOS, version="1.0.0")
        channel = await pub.create_channel(game.name)
        await pub.promote(channel.name, old.name)
        await pub.promote(channel.name, mac.name)
        promoted = await pub.promote(channel.name, new.name)
        assert current(promoted) == [(WINDOWS, new.name), (MACOS, mac.name)]
        assert states(await pub.releases(channel.name)) == [
            (new.name, CURRENT),
            (mac.name, CURRENT),
            (old.name, SUPERSEDED),
        ]

    async def test_promoting_the_current_build_again_changes_nothing(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        channel = await pub.create_channel(game.name)
        first = await pub.promote(channel.name, build.name)
        again = await pub.promote(channel.name, build.name)
        assert again == first
        assert len(await pub.releases(channel.name)) == 1

    async def test_promoting_an_older_build_makes_a_new_release(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        old = await pub.create_build(game.name, version="1.0.0")
        new = await pub.create_build(game.name, version="2.0.0")
        channel = await pub.create_channel(game.name)
        for build in (old, new, old):
            await pub.promote(channel.name, build.name)
        assert states(await pub.releases(channel.name)) == [
            (old.name, CURRENT),
            (new.name, SUPERSEDED),
            (old.name, SUPERSEDED),
        ]

    async def test_build_of_another_game(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game, other = await pub.create_game(), await pub.create_game()
        foreign = await pub.create_build(other.name)
        channel = await pub.create_channel(game.name)
        await expect_error(pub.promote(channel.name, foreign.name), INVALID, fields=["build"])
        assert await pub.releases(channel.name) == []

    async def test_missing_build_or_channel(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        channel = await pub.create_channel(game.name)
        missing = f"{game.name}/builds/{unique_id()}"
        error = await expect_error(pub.promote(channel.name, missing), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")
        assert error.info.metadata["resource"] == missing
        await expect_error(
            pub.promote(f"{game.name}/channels/nope", build.name), grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_FOUND"
        )
        await expect_error(pub.promote(channel.name, "not-a-build"), INVALID, fields=["build"])
        await expect_error(pub.promote("games/x", build.name), INVALID, fields=["name"])

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        game = await owner.published_game()
        build = await owner.create_build(game.name, version="2.0.0")
        channel = await owner.create_channel(game.name)
        await expect_error(publisher(gamed, auth).promote(channel.name, build.name), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(anonymous(gamed).promote(channel.name, build.name), grpc.StatusCode.UNAUTHENTICATED)
        boss = admin(gamed, auth)
        promoted = await boss.promote(channel.name, build.name)
        assert promoted.current_releases[0].promoter == boss.wallet

    async def test_racing_promotions_leave_one_current(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        builds = [await pub.create_build(game.name, version=f"1.{i}.0") for i in range(4)]
        channel = await pub.create_channel(game.name)
        results = await asyncio.gather(*(outcome(pub.promote(channel.name, b.name)) for b in builds))
        assert results == ["OK"] * 4
        releases = await pub.releases(channel.name)
        assert sorted(r.state for r in releases) == [CURRENT, SUPERSEDED, SUPERSEDED, SUPERSEDED]
        assert current(await get_channel(pub, channel.name)) == [(WINDOWS, releases[0].build)]


class TestRollbackChannel:
    async def test_restores_the_previous_build(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        v1, v2, v3 = [await pub.create_build(game.name, version=f"{i}.0.0") for i in (1, 2, 3)]
        linux = await pub.create_build(game.name, platform=LINUX)
        channel = await pub.create_channel(game.name)
        for build in (v1, linux, v2, v3):
            promoted = await pub.promote(channel.name, build.name)

        rolled = await pub.rollback(channel.name, WINDOWS)
        assert current(rolled) == [(WINDOWS, v2.name), (LINUX, linux.name)]
        assert rolled.update_time.ToDatetime() > promoted.update_time.ToDatetime()
        assert rolled.current_releases[0].state == CURRENT
        assert states(await pub.releases(channel.name)) == [
            (v3.name, ROLLED_BACK),
            (v2.name, CURRENT),
            (linux.name, CURRENT),
            (v1.name, SUPERSEDED),
        ]

        rolled = await pub.rollback(channel.name, WINDOWS)
        assert current(rolled) == [(WINDOWS, v1.name), (LINUX, linux.name)]
        assert states(await pub.releases(channel.name, WINDOWS)) == [
            (v3.name, ROLLED_BACK),
            (v2.name, ROLLED_BACK),
            (v1.name, CURRENT),
        ]
        await expect_error(
            pub.rollback(channel.name, WINDOWS), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_ROLL_BACK"
        )
        assert current(await get_channel(pub, channel.name)) == [(WINDOWS, v1.name), (LINUX, linux.name)]

    async def test_rolled_back_release_is_skipped_later(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        a, b, c = [await pub.create_build(game.name, version=f"1.{i}.0") for i in range(3)]
        channel = await pub.create_channel(game.name)
        await pub.promote(channel.name, a.name)
        await pub.promote(channel.name, b.name)
        await pub.rollback(channel.name, WINDOWS)  # b rolled back, a current
        await pub.promote(channel.name, c.name)  # a superseded, c current
        rolled = await pub.rollback(channel.name, WINDOWS)
        assert current(rolled) == [(WINDOWS, a.name)]
        assert states(await pub.releases(channel.name)) == [
            (c.name, ROLLED_BACK),
            (b.name, ROLLED_BACK),
            (a.name, CURRENT),
        ]

    async def test_nothing_to_roll_back(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        channel = await pub.create_channel(game.name)
        await expect_error(
            pub.rollback(channel.name, WINDOWS), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_ROLL_BACK"
        )
        await pub.promote(channel.name, build.name)
        await expect_error(
            pub.rollback(channel.name, WINDOWS), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_ROLL_BACK"
        )
        await expect_error(
            pub.rollback(channel.name, LINUX), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_ROLL_BACK"
        )
        assert states(await pub.releases(channel.name)) == [(build.name, CURRENT)]

    async def test_bad_requests(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        channel = await pub.create_channel(game.name)
        await expect_error(pub.rollback(channel.name, game_pb2.PLATFORM_UNSPECIFIED), INVALID, fields=["platform"])
        await expect_error(
            pub.rollback(f"{game.name}/channels/nope", WINDOWS), grpc.StatusCode.NOT_FOUND, "CHANNEL_NOT_FOUND"
        )
        await expect_error(pub.rollback("channels/x", WINDOWS), INVALID, fields=["name"])

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        game = await owner.published_game()
        newer = await owner.create_build(game.name, version="2.0.0")
        first = (
            await owner.gamed.ListBuilds(
                gamed_service_pb2.ListBuildsRequest(parent=game.name, platform=WINDOWS), metadata=owner.metadata
            )
        ).builds[-1]
        channel = await owner.create_channel(game.name)
        await owner.promote(channel.name, first.name)
        await owner.promote(channel.name, newer.name)
        await expect_error(publisher(gamed, auth).rollback(channel.name, WINDOWS), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(anonymous(gamed).rollback(channel.name, WINDOWS), grpc.StatusCode.UNAUTHENTICATED)
        rolled = await admin(gamed, auth).rollback(channel.name, WINDOWS)
        assert current(rolled) == [(WINDOWS, first.name)]

    async def test_racing_rollbacks(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        first, second = [await pub.create_build(game.name, version=f"1.{i}.0") for i in range(2)]
        channel = await pub.create_channel(game.name)
        await pub.promote(channel.name, first.name)
        await pub.promote(channel.name, second.name)
        results = await asyncio.gather(*(outcome(pub.rollback(channel.name, WINDOWS)) for _ in range(3)))
        assert sorted(results) == ["FAILED_PRECONDITION/NOTHING_TO_ROLL_BACK"] * 2 + ["OK"]
        assert states(await pub.releases(channel.name)) == [(second.name, ROLLED_BACK), (first.name, CURRENT)]


class TestListReleases:
    async def test_newest_first_in_pages(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        builds = [await pub.create_build(game.name, version=f"1.{i}.0") for i in range(5)]
        channel = await pub.create_channel(game.name)
        for build in builds:
            await pub.promote(channel.name, build.name)
        releases, sizes, token = [], [], ""
        while True:
            response = await pub.gamed.ListReleases(
                gamed_service_pb2.ListReleasesRequest(parent=channel.name, page_size=2, page_token=token),
                metadata=pub.metadata,
            )
            releases += list(response.releases)
            sizes.append(len(response.releases))
            token = response.next_page_token
            if not token:
                break
        assert sizes == [2, 2, 1]
        assert [r.build for r in releases] == [b.name for b in reversed(builds)]
        assert [r.version for r in releases] == [f"1.{i}.0" for i in reversed(range(5))]
        sequence = [int(r.name.rsplit("/", 1)[1]) for r in releases]
        assert sequence == sorted(sequence, reverse=True)
        assert len(set(sequence)) == 5
        assert all(r.name.startswith(f"{channel.name}/releases/") for r in releases)
        times = [r.create_time.ToDatetime() for r in releases]
        assert times == sorted(times, reverse=True)

    async def test_platform_filter(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        windows = await pub.create_build(game.name, platform=WINDOWS)
        linux = await pub.create_build(game.name, platform=LINUX)
        channel = await pub.create_channel(game.name)
        await pub.promote(channel.name, windows.name)
        await pub.promote(channel.name, linux.name)
        assert [r.build for r in await pub.releases(channel.name, LINUX)] == [linux.name]
        assert [r.platform for r in await pub.releases(channel.name, WINDOWS)] == [WINDOWS]
        assert await pub.releases(channel.name, MACOS) == []
        await expect_error(pub.releases(channel.name, 99), INVALID, fields=["platform"])

    async def test_bad_requests(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        builds = [await pub.create_build(game.name, version=f"1.{i}.0") for i in range(2)]
        channel = await pub.create_channel(game.name)
        other = await pub.create_channel(game.name, "other")
        for build in builds:
            await pub.promote(channel.name, build.name)
            await pub.promote(other.name, build.name)
        token = (
            await gamed.ListReleases(
                gamed_service_pb2.ListReleasesRequest(parent=channel.name, page_size=1), metadata=pub.metadata
            )
        ).next_page_token
        assert token
        for request in (
            gamed_service_pb2.ListReleasesRequest(parent=other.name, page_token=token),
            gamed_service_pb2.ListReleasesRequest(parent=channel.name, page_token=token, platform=WINDOWS),
        ):
            await expect_error(gamed.ListReleases(request, metadata=pub.metadata), INVALID, fields=["page_token"])
        await expect_error(
            gamed.ListReleases(
                gamed_service_pb2.ListReleasesRequest(parent=channel.name, page_size=-1), metadata=pub.metadata
            ),
            INVALID,
            fields=["page_size"],
        )
        await expect_error(anonymous(gamed).releases(channel.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
