"""far.gamed.v1 builds: CreateBuild, GetBuild, ListBuilds, DeleteBuild against a real database."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from far.gamed.v1 import game_pb2, gamed_service_pb2

from tests.integration.gamed_support import (
    ARCHIVED,
    LINUX,
    MACOS,
    WINDOWS,
    Auth,
    Caller,
    Stub,
    admin,
    anonymous,
    asset,
    build_message,
    outcome,
    publisher,
    sha256_of,
    unique_id,
    user,
)
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
RESOURCE_ID = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")


async def list_builds(who: Caller, game: str, **request: object) -> gamed_service_pb2.ListBuildsResponse:
    return await who.gamed.ListBuilds(
        gamed_service_pb2.ListBuildsRequest(parent=game, **request),  # type: ignore[arg-type]
        metadata=who.metadata,
    )


async def get_build(who: Caller, name: str) -> object:
    return await who.gamed.GetBuild(gamed_service_pb2.GetBuildRequest(name=name), metadata=who.metadata)


async def delete_build(who: Caller, name: str) -> object:
    return await who.gamed.DeleteBuild(gamed_service_pb2.DeleteBuildRequest(name=name), metadata=who.metadata)


class TestCreateBuild:
    async def test_creates_a_build_with_its_assets(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        assets = [
            asset("bin/game.exe", 1_500_000, content_type="application/vnd.microsoft.portable-executable"),
            asset("data/level-1.pak", 64 * 1024**3),
            asset("README.md", 1, sha256=sha256_of(b"readme").upper()),
        ]
        build = await gamed.CreateBuild(
            gamed_service_pb2.CreateBuildRequest(
                parent=game.name,
                build_id="win-1-4-0",
                build=build_message(WINDOWS, "1.4.0", assets, release_notes="# 1.4.0\n- faster"),
            ),
            metadata=pub.metadata,
        )
        assert build.name == f"{game.name}/builds/win-1-4-0"
        assert (build.platform, build.version, build.release_notes) == (WINDOWS, "1.4.0", "# 1.4.0\n- faster")
        assert [(a.path, a.size_bytes, a.content_type) for a in build.assets] == [
            ("bin/game.exe", 1_500_000, "application/vnd.microsoft.portable-executable"),
            ("data/level-1.pak", 64 * 1024**3, "application/octet-stream"),
            ("README.md", 1, "application/octet-stream"),
        ]
        assert [a.sha256 for a in build.assets] == [
            sha256_of(b"bin/game.exe"),
            sha256_of(b"data/level-1.pak"),
            sha256_of(b"readme"),
        ]
        assert build.total_size_bytes == 1_500_000 + 64 * 1024**3 + 1
        assert build.creator == pub.wallet
        assert build.create_time.seconds > 0
        assert await get_build(pub, build.name) == build

    async def test_generated_id_when_build_id_is_empty(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        first = await pub.create_build(game.name, version="1.0.0")
        second = await pub.create_build(game.name, version="1.0.1")
        ids = [b.name.removeprefix(f"{game.name}/builds/") for b in (first, second)]
        assert all(RESOURCE_ID.fullmatch(build_id) for build_id in ids), ids
        assert ids[0] != ids[1]
        assert await get_build(pub, first.name) == first

    async def test_game_platforms_follow_its_builds(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        linux = await pub.create_build(game.name, platform=LINUX, version="1.0.0")
        await pub.create_build(game.name, platform=WINDOWS, version="1.0.0")
        await pub.create_build(game.name, platform=LINUX, version="1.1.0")
        assert list((await pub.get_game(game.name)).platforms) == [WINDOWS, LINUX]
        await delete_build(pub, linux.name)
        assert list((await pub.get_game(game.name)).platforms) == [WINDOWS, LINUX]
        listed = await pub.list_games(publisher=pub.wallet)
        assert [list(g.platforms) for g in listed.games] == [[WINDOWS, LINUX]]

    async def test_new_build_updates_the_game(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await pub.create_build(game.name)
        after = await pub.get_game(game.name)
        assert after.update_time.ToDatetime() > game.update_time.ToDatetime()
        assert after.etag != game.etag

    async def test_same_version_on_two_platforms(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await pub.create_build(game.name, platform=WINDOWS, version="2.0.0")
        mac = await pub.create_build(game.name, platform=MACOS, version="2.0.0")
        assert mac.platform == MACOS

    async def test_duplicate_platform_and_version(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        first = await pub.create_build(game.name, platform=LINUX, version="3.0.0", build_id="one")
        await expect_error(
            pub.create_build(game.name, platform=LINUX, version="3.0.0", build_id="two"),
            grpc.StatusCode.ALREADY_EXISTS,
            "BUILD_ALREADY_EXISTS",
        )
        await expect_error(
            pub.create_build(game.name, platform=LINUX, version="3.0.0"),
            grpc.StatusCode.ALREADY_EXISTS,
            "BUILD_ALREADY_EXISTS",
        )
        builds = await list_builds(pub, game.name)
        assert [b.name for b in builds.builds] == [first.name]

    async def test_duplicate_build_id(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await pub.create_build(game.name, version="1.0.0", build_id="taken")
        error = await expect_error(
            pub.create_build(game.name, version="9.9.9", build_id="taken"),
            grpc.StatusCode.ALREADY_EXISTS,
            "BUILD_ALREADY_EXISTS",
        )
        assert error.info.metadata["resource"] == f"{game.name}/builds/taken"
        # The same build id in another game is fine.
        other = await pub.create_game()
        assert (await pub.create_build(other.name, build_id="taken")).name == f"{other.name}/builds/taken"

    async def test_every_bad_asset_is_listed(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        assets = [
            asset("bin/../etc/passwd"),
            asset("/abs/path"),
            asset("ok/file.bin"),
            asset("ok/file.bin"),
            asset("empty.bin", 0),
            asset("huge.bin", 64 * 1024**3 + 1),
            asset("neg.bin", -5),
            asset("badsum.bin", sha256="abc"),
            asset("nothex.bin", sha256="g" * 64),
            asset("dir/./x"),
            asset("dir//x"),
            asset("trailing/"),
            asset(""),
            asset("sp ace.bin"),
            asset("..", 10),
            asset("mime.bin", content_type="not a mime"),
            asset("x" * 513),
            asset("newline.exe\n"),
            asset("ct.bin", content_type="text/plain\n"),
            asset("ct2.bin", content_type="t\u00ebxt/plain"),
        ]
        await expect_error(
            pub.create_build(game.name, assets=assets),
            INVALID,
            fields=[
                "build.assets[0].path",
                "build.assets[1].path",
                "build.assets[3].path",
                "build.assets[4].size_bytes",
                "build.assets[5].size_bytes",
                "build.assets[6].size_bytes",
                "build.assets[7].sha256",
                "build.assets[8].sha256",
                "build.assets[9].path",
                "build.assets[10].path",
                "build.assets[11].path",
                "build.assets[12].path",
                "build.assets[13].path",
                "build.assets[14].path",
                "build.assets[15].content_type",
                "build.assets[16].path",
                "build.assets[17].path",
                "build.assets[18].content_type",
                "build.assets[19].content_type",
            ],
        )
        assert list((await list_builds(pub, game.name)).builds) == []

    @pytest.mark.parametrize("count", [0, 101])
    async def test_asset_count(self, gamed: Stub, auth: Auth, count: int) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        assets = [asset(f"f/{i}.bin") for i in range(count)]
        await expect_error(pub.create_build(game.name, assets=assets), INVALID, fields=["build.assets"])

    async def test_one_hundred_assets_are_accepted(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name, assets=[asset(f"f/{i}.bin", i + 1) for i in range(100)])
        assert len(build.assets) == 100
        assert build.total_size_bytes == sum(range(1, 101))

    @pytest.mark.parametrize(
        "version",
        [
            "1.0",
            "v1.0.0",
            "01.0.0",
            "1.0.0-",
            "1.0.0+",
            "1.0.0-01",
            "1.0.0.0",
            "",
            "1.0.0 ",
            "1.0.0\n",
            "1\u0661.0.0",
            "1.0.0-" + "a" * 60,
        ],
        ids=repr,
    )
    async def test_bad_version(self, gamed: Stub, auth: Auth, version: str) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(pub.create_build(game.name, version=version), INVALID, fields=["build.version"])

    @pytest.mark.parametrize("version", ["0.0.0", "2.0.0-beta.1+build.7", "1.0.0-alpha-1", "10.20.30+sha.5114f85"])
    async def test_good_version(self, gamed: Stub, auth: Auth, version: str) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        assert (await pub.create_build(game.name, version=version)).version == version

    async def test_bad_platform_id_and_notes(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(
            gamed.CreateBuild(
                gamed_service_pb2.CreateBuildRequest(
                    parent=game.name,
                    build_id="Bad_Id",
                    build=build_message(game_pb2.PLATFORM_UNSPECIFIED, release_notes="n" * 10_001),
                ),
                metadata=pub.metadata,
            ),
            INVALID,
            fields=["build_id", "build.platform", "build.release_notes"],
        )

    async def test_nul_in_release_notes_is_invalid(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(
            gamed.CreateBuild(
                gamed_service_pb2.CreateBuildRequest(
                    parent=game.name, build=build_message(WINDOWS, "1.0.0", release_notes="notes\x00")
                ),
                metadata=pub.metadata,
            ),
            INVALID,
            fields=["build.release_notes"],
        )

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        published = await owner.published_game()
        draft = await owner.create_game()
        await expect_error(
            publisher(gamed, auth).create_build(published.name, version="2.0.0"), grpc.StatusCode.PERMISSION_DENIED
        )
        await expect_error(user(gamed, auth).create_build(draft.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        await expect_error(
            anonymous(gamed).create_build(published.name, version="2.0.0"), grpc.StatusCode.UNAUTHENTICATED
        )
        boss = admin(gamed, auth)
        build = await boss.create_build(draft.name)
        assert build.creator == boss.wallet

    async def test_missing_or_malformed_parent(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        await expect_error(pub.create_build(f"games/{unique_id()}"), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        await expect_error(pub.create_build("games/Nope"), INVALID, fields=["parent"])

    async def test_racing_builds_of_one_version(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        results = await asyncio.gather(*(outcome(pub.create_build(game.name, version="5.0.0")) for _ in range(3)))
        assert sorted(results) == ["ALREADY_EXISTS/BUILD_ALREADY_EXISTS"] * 2 + ["OK"]
        assert len((await list_builds(pub, game.name)).builds) == 1


class TestGetBuild:
    async def test_visibility_follows_the_game(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        draft = await owner.create_game()
        hidden = await owner.create_build(draft.name)
        assert await get_build(admin(gamed, auth), hidden.name) == hidden
        for other in (anonymous(gamed), user(gamed, auth)):
            await expect_error(get_build(other, hidden.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        published = await owner.published_game()
        build = (await list_builds(owner, published.name)).builds[0]
        assert await get_build(anonymous(gamed), build.name) == build

    async def test_missing_build(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        name = f"{game.name}/builds/{unique_id()}"
        error = await expect_error(get_build(pub, name), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")
        assert error.info.metadata["resource"] == name

    @pytest.mark.parametrize("name", ["", "games/a", "games/a/builds/", "games/a/builds/B", "games/a/channels/b"])
    async def test_malformed_name(self, gamed: Stub, name: str) -> None:
        await expect_error(get_build(anonymous(gamed), name), INVALID, fields=["name"])


class TestListBuilds:
    async def test_newest_first_in_pages(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        created = [
            (await pub.create_build(game.name, platform=platform, version=f"1.{i}.0")).name
            for i, platform in enumerate([WINDOWS, LINUX, WINDOWS, MACOS, WINDOWS])
        ]
        listed: list[str] = []
        token = ""
        sizes = []
        while True:
            response = await list_builds(pub, game.name, page_size=2, page_token=token)
            listed += [b.name for b in response.builds]
            sizes.append(len(response.builds))
            token = response.next_page_token
            if not token:
                break
        assert sizes == [2, 2, 1]
        assert listed == list(reversed(created))

    async def test_platform_filter(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        windows = []
        for i in range(3):
            windows.append((await pub.create_build(game.name, platform=WINDOWS, version=f"1.{i}.0")).name)
            await pub.create_build(game.name, platform=LINUX, version=f"1.{i}.0")
        first = await list_builds(pub, game.name, platform=WINDOWS, page_size=2)
        assert [b.name for b in first.builds] == windows[:0:-1]
        assert all(b.platform == WINDOWS for b in first.builds)
        second = await list_builds(pub, game.name, platform=WINDOWS, page_size=2, page_token=first.next_page_token)
        assert [b.name for b in second.builds] == [windows[0]]
        assert second.next_page_token == ""
        assert list((await list_builds(pub, game.name, platform=game_pb2.PLATFORM_WEB)).builds) == []
        await expect_error(
            list_builds(pub, game.name, platform=LINUX, page_token=first.next_page_token),
            INVALID,
            fields=["page_token"],
        )
        await expect_error(list_builds(pub, game.name, platform=77), INVALID, fields=["platform"])

    async def test_token_is_bound_to_the_game(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game, other = await pub.create_game(), await pub.create_game()
        for version in ("1.0.0", "1.0.1"):
            await pub.create_build(game.name, version=version)
        token = (await list_builds(pub, game.name, page_size=1)).next_page_token
        assert token
        await expect_error(list_builds(pub, other.name, page_token=token), INVALID, fields=["page_token"])

    async def test_negative_page_size(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(list_builds(pub, game.name, page_size=-3), INVALID, fields=["page_size"])

    async def test_visibility_follows_the_game(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        draft = await owner.create_game()
        await owner.create_build(draft.name)
        await expect_error(list_builds(anonymous(gamed), draft.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        published = await owner.published_game()
        assert len((await list_builds(anonymous(gamed), published.name)).builds) == 1


class TestDeleteBuild:
    async def test_deletes(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name, platform=MACOS)
        before = await pub.get_game(game.name)
        await delete_build(pub, build.name)
        await expect_error(get_build(pub, build.name), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")
        await expect_error(delete_build(pub, build.name), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")
        after = await pub.get_game(game.name)
        assert list(after.platforms) == []
        assert after.etag != before.etag
        # The version is free again.
        assert (await pub.create_build(game.name, platform=MACOS)).version == "1.0.0"

    async def test_last_build_of_a_published_game_stays(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.published_game()
        (build,) = (await gamed.ListBuilds(gamed_service_pb2.ListBuildsRequest(parent=game.name))).builds
        await expect_error(delete_build(pub, build.name), grpc.StatusCode.FAILED_PRECONDITION, "LAST_BUILD")
        second = await pub.create_build(game.name, version="2.0.0")
        await delete_build(pub, build.name)  # not the last one any more
        await expect_error(delete_build(pub, second.name), grpc.StatusCode.FAILED_PRECONDITION, "LAST_BUILD")
        await pub.set_state(game.name, ARCHIVED)
        await delete_build(pub, second.name)  # an archived game may lose its builds

    async def test_released_build_is_in_use(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        old = await pub.create_build(game.name, version="1.0.0")
        new = await pub.create_build(game.name, version="1.1.0")
        channel = await pub.create_channel(game.name, "stable")
        await pub.promote(channel.name, old.name)
        await pub.promote(channel.name, new.name)
        for build in (new, old):  # current, and only in the channel's history
            error = await expect_error(
                delete_build(pub, build.name), grpc.StatusCode.FAILED_PRECONDITION, "BUILD_IN_USE"
            )
            assert error.info.domain == "gamed.far.network"
        assert await get_build(pub, old.name) == old
        await gamed.DeleteChannel(gamed_service_pb2.DeleteChannelRequest(name=channel.name), metadata=pub.metadata)
        await delete_build(pub, old.name)
        await expect_error(get_build(pub, old.name), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        game = await owner.published_game()
        build = (await list_builds(owner, game.name)).builds[0]
        spare = await owner.create_build(game.name, version="1.0.1")
        await expect_error(delete_build(publisher(gamed, auth), build.name), grpc.StatusCode.PERMISSION_DENIED)
        await expect_error(delete_build(anonymous(gamed), build.name), grpc.StatusCode.UNAUTHENTICATED)
        await delete_build(admin(gamed, auth), spare.name)
        assert [b.name for b in (await list_builds(owner, game.name)).builds] == [build.name]

    async def test_racing_a_promotion(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        channel = await pub.create_channel(game.name)
        for i in range(8):
            build = await pub.create_build(game.name, version=f"1.{i}.0")
            deleted, promoted = await asyncio.gather(
                outcome(delete_build(pub, build.name)), outcome(pub.promote(channel.name, build.name))
            )
            assert (deleted, promoted) in {
                ("OK", "NOT_FOUND/BUILD_NOT_FOUND"),
                ("FAILED_PRECONDITION/BUILD_IN_USE", "OK"),
            }
            released = [r.build for r in await pub.releases(channel.name)]
            if promoted == "OK":
                assert await get_build(pub, build.name) == build
                assert released[0] == build.name
            else:
                assert build.name not in released
