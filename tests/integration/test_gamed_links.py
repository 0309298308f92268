"""far.gamed.v1 presigned links: GenerateDownloadLinks and GenerateUploadLinks.

The links are checked as S3 would check them: SigV4 query parameters, the object key, the bucket,
the expiry, and (with the development credentials the server falls back to) the signature itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote, urlsplit

import grpc
import pytest
from far.gamed.v1 import gamed_service_pb2
from google.protobuf import duration_pb2

from tests.integration.gamed_support import (
    ARCHIVED,
    LINUX,
    PUBLISHED,
    WINDOWS,
    Auth,
    Caller,
    Stub,
    admin,
    anonymous,
    asset,
    publisher,
    sha256_of,
    user,
)
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BUCKET = os.environ.get("GAMED_S3_BUCKET", "").strip() or "far-gamed-dev"
KEY_PREFIX = os.environ.get("GAMED_S3_KEY_PREFIX", "").strip().strip("/")
DEV_CREDENTIALS = ("far-dev", "far-dev-secret")  # what storage.py signs with when no AWS credentials exist


def ttl(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def object_key(build: str, path: str) -> str:
    key = f"{build}/{path}"  # games/<game>/builds/<build>/<path>
    return f"{KEY_PREFIX}/{key}" if KEY_PREFIX else key


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The object key the URL addresses in BUCKET, and its query parameters."""
    parts = urlsplit(url)
    assert parts.scheme in ("https", "http")
    path = parts.path.lstrip("/")
    if parts.hostname and parts.hostname.startswith(f"{BUCKET}."):
        key = path  # virtual-hosted style
    else:
        bucket, _, key = path.partition("/")  # path style
        assert bucket == BUCKET
    return key, dict(parse_qsl(parts.query, keep_blank_values=True))


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def sigv4_signature(url: str, method: str, headers: dict[str, str], secret: str) -> str:
    """The SigV4 query signature of a presigned S3 URL, computed independently of botocore."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
    params = dict(query)
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query))
    all_headers = {"host": parts.netloc, **{k.lower(): v.strip() for k, v in headers.items()}}
    signed = params["X-Amz-SignedHeaders"].split(";")
    canonical_headers = "".join(f"{name}:{all_headers[name]}\n" for name in signed)
    canonical_request = "\n".join(
        [method, parts.path, canonical_query, canonical_headers, ";".join(signed), "UNSIGNED-PAYLOAD"]
    )
    _, date, region, service, terminator = params["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminator}"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, terminator):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def assert_presigned(
    url: str, *, method: str, build: str, path: str, ttl_s: int, headers: dict[str, str] | None = None
) -> dict[str, str]:
    key, params = split_url(url)
    assert key == object_key(build, path)
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-Expires"] == str(ttl_s)
    access_key, date, _region, service, terminator = params["X-Amz-Credential"].split("/")
    assert (service, terminator) == ("s3", "aws4_request")
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(signed_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert date == params["X-Amz-Date"][:8]
    assert "host" in params["X-Amz-SignedHeaders"].split(";")
    assert len(params["X-Amz-Signature"]) == 64
    if access_key == DEV_CREDENTIALS[0]:
        assert params["X-Amz-Signature"] == sigv4_signature(url, method, headers or {}, DEV_CREDENTIALS[1])
    return params


def assert_expires_in(expire_time: object, seconds: int) -> None:
    expires = expire_time.ToDatetime(tzinfo=UTC)  # type: ignore[attr-defined]
    assert abs(expires - (datetime.now(UTC) + timedelta(seconds=seconds))) < timedelta(seconds=10)


async def download_links(who: Caller, **request: object) -> gamed_service_pb2.GenerateDownloadLinksResponse:
    return await who.gamed.GenerateDownloadLinks(
        gamed_service_pb2.GenerateDownloadLinksRequest(**request),  # type: ignore[arg-type]
        metadata=who.metadata,
    )


async def upload_links(who: Caller, name: str, **request: object) -> gamed_service_pb2.GenerateUploadLinksResponse:
    return await who.gamed.GenerateUploadLinks(
        gamed_service_pb2.GenerateUploadLinksRequest(name=name, **request),  # type: ignore[arg-type]
        metadata=who.metadata,
    )


ASSETS = [
    asset("bin/game.exe", 4096, content_type="application/vnd.microsoft.portable-executable"),
    asset("data/level-1.pak", 123),
    asset("README.md", 7, content_type="text/markdown"),
]


class TestGenerateDownloadLinks:
    async def test_links_for_a_build(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.published_game()
        build = await pub.create_build(game.name, platform=LINUX, version="2.1.0", assets=ASSETS)
        response = await download_links(anonymous(gamed), build=build.name, ttl=ttl(900))
        assert (response.build, response.platform, response.version) == (build.name, LINUX, "2.1.0")
        assert [(link.path, link.size_bytes, link.sha256) for link in response.links] == [
            (a.path, a.size_bytes, a.sha256) for a in ASSETS
        ]
        for link, item in zip(response.links, ASSETS, strict=True):
            assert dict(link.headers) == {}
            params = assert_presigned(link.url, method="GET", build=build.name, path=item.path, ttl_s=900)
            assert params["X-Amz-SignedHeaders"] == "host"
            filename = item.path.rsplit("/", 1)[-1]
            assert params["response-content-disposition"] == f'attachment; filename="{filename}"'
            assert params["response-content-type"] == (item.content_type or "application/octet-stream")
        assert_expires_in(response.expire_time, 900)

    async def test_default_ttl_is_one_hour(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        response = await download_links(pub, build=build.name)
        assert_presigned(response.links[0].url, method="GET", build=build.name, path="bin/game.exe", ttl_s=3600)
        assert_expires_in(response.expire_time, 3600)

    @pytest.mark.parametrize("seconds", [60, 24 * 3600])
    async def test_ttl_bounds_are_inclusive(self, gamed: Stub, auth: Auth, seconds: int) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        response = await download_links(pub, build=build.name, ttl=ttl(seconds))
        _, params = split_url(response.links[0].url)
        assert params["X-Amz-Expires"] == str(seconds)
        assert_expires_in(response.expire_time, seconds)

    @pytest.mark.parametrize("duration", [ttl(59), ttl(24 * 3600 + 1), ttl(0), ttl(-60), ttl(7 * 24 * 3600)])
    async def test_ttl_out_of_bounds(self, gamed: Stub, auth: Auth, duration: duration_pb2.Duration) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        await expect_error(download_links(pub, build=build.name, ttl=duration), INVALID, fields=["ttl"])

    async def test_links_through_a_channel_follow_its_current_release(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.published_game()
        v1 = await pub.create_build(game.name, version="1.1.0", assets=ASSETS[:1])
        v2 = await pub.create_build(game.name, version="1.2.0", assets=ASSETS[1:])
        channel = await pub.create_channel(game.name, "stable")
        await pub.promote(channel.name, v1.name)
        await pub.promote(channel.name, v2.name)
        reader = anonymous(gamed)
        response = await download_links(reader, channel=channel.name, platform=WINDOWS, ttl=ttl(120))
        assert (response.build, response.version) == (v2.name, "1.2.0")
        assert [link.path for link in response.links] == ["data/level-1.pak", "README.md"]
        assert_presigned(response.links[0].url, method="GET", build=v2.name, path="data/level-1.pak", ttl_s=120)
        await pub.rollback(channel.name, WINDOWS)
        response = await download_links(reader, channel=channel.name, platform=WINDOWS)
        assert (response.build, [link.path for link in response.links]) == (v1.name, ["bin/game.exe"])
        assert_presigned(response.links[0].url, method="GET", build=v1.name, path="bin/game.exe", ttl_s=3600)

    async def test_channel_without_a_release_for_the_platform(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name, platform=WINDOWS)
        channel = await pub.create_channel(game.name, "beta")
        await expect_error(
            download_links(pub, channel=channel.name, platform=WINDOWS), grpc.StatusCode.NOT_FOUND, "NO_RELEASE"
        )
        await pub.promote(channel.name, build.name)
        await expect_error(
            download_links(pub, channel=channel.name, platform=LINUX), grpc.StatusCode.NOT_FOUND, "NO_RELEASE"
        )
        assert (await download_links(pub, channel=channel.name, platform=WINDOWS)).build == build.name

    async def test_bad_targets(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        channel = await pub.create_channel(game.name)
        await expect_error(download_links(pub, channel=channel.name), INVALID, fields=["platform"])
        await expect_error(download_links(pub, platform=WINDOWS), INVALID, fields=["build"])
        await expect_error(download_links(pub, build="games/x/channels/y"), INVALID, fields=["build"])
        await expect_error(
            download_links(pub, channel="games/x/builds/y", platform=WINDOWS), INVALID, fields=["channel"]
        )
        await expect_error(
            download_links(pub, build=f"{game.name}/builds/nope"), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND"
        )
        await expect_error(
            download_links(pub, channel=f"{game.name}/channels/nope", platform=WINDOWS),
            grpc.StatusCode.NOT_FOUND,
            "CHANNEL_NOT_FOUND",
        )

    async def test_visibility_follows_the_game(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        channel = await pub.create_channel(game.name)
        await pub.promote(channel.name, build.name)
        others = (anonymous(gamed), user(gamed, auth), publisher(gamed, auth))

        async def readable(who: Caller) -> bool:
            try:
                await download_links(who, build=build.name)
                await download_links(who, channel=channel.name, platform=WINDOWS)
            except grpc.aio.AioRpcError:
                await expect_error(download_links(who, build=build.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
                await expect_error(
                    download_links(who, channel=channel.name, platform=WINDOWS),
                    grpc.StatusCode.NOT_FOUND,
                    "GAME_NOT_FOUND",
                )
                return False
            return True

        assert [await readable(who) for who in others] == [False, False, False]  # draft
        assert await readable(pub)
        assert await readable(admin(gamed, auth))
        await pub.set_state(game.name, PUBLISHED)
        assert [await readable(who) for who in others] == [True, True, True]  # published
        await pub.set_state(game.name, ARCHIVED)
        assert [await readable(who) for who in others] == [False, False, False]  # archived
        assert await readable(pub)


class TestGenerateUploadLinks:
    async def test_links_check_size_and_checksum(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name, assets=ASSETS)
        response = await upload_links(pub, build.name, ttl=ttl(1800))
        assert [(link.path, link.size_bytes, link.sha256) for link in response.links] == [
            (a.path, a.size_bytes, a.sha256) for a in ASSETS
        ]
        for link, item in zip(response.links, ASSETS, strict=True):
            headers = dict(link.headers)
            assert headers["Content-Length"] == str(item.size_bytes)
            assert headers["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(item.sha256)).decode()
            assert headers["Content-Type"] == (item.content_type or "application/octet-stream")
            params = assert_presigned(
                link.url, method="PUT", build=build.name, path=item.path, ttl_s=1800, headers=headers
            )
            signed = params["X-Amz-SignedHeaders"].split(";")
            assert {"content-length", "x-amz-checksum-sha256", "content-type", "host"} <= set(signed)
        assert_expires_in(response.expire_time, 1800)

    async def test_checksum_header_is_the_base64_of_the_digest(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        content = b"hello, far\n"
        build = await pub.create_build(game.name, assets=[asset("hello.txt", len(content), sha256=sha256_of(content))])
        (link,) = (await upload_links(pub, build.name)).links
        assert link.headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(content).digest()).decode()
        assert link.headers["Content-Length"] == str(len(content))
        assert_presigned(
            link.url, method="PUT", build=build.name, path="hello.txt", ttl_s=3600, headers=dict(link.headers)
        )

    @pytest.mark.parametrize(("seconds", "ok"), [(60, True), (12 * 3600, True), (59, False), (12 * 3600 + 1, False)])
    async def test_ttl_bounds(self, gamed: Stub, auth: Auth, seconds: int, ok: bool) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        build = await pub.create_build(game.name)
        if ok:
            response = await upload_links(pub, build.name, ttl=ttl(seconds))
            assert split_url(response.links[0].url)[1]["X-Amz-Expires"] == str(seconds)
            assert_expires_in(response.expire_time, seconds)
        else:
            await expect_error(upload_links(pub, build.name, ttl=ttl(seconds)), INVALID, fields=["ttl"])

    async def test_only_the_publisher_or_an_admin(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        game = await owner.published_game()
        build = await owner.create_build(game.name, version="2.0.0")
        draft = await owner.create_game()
        hidden = await owner.create_build(draft.name)
        for other in (publisher(gamed, auth), user(gamed, auth)):
            await expect_error(upload_links(other, build.name), grpc.StatusCode.PERMISSION_DENIED)
            await expect_error(upload_links(other, hidden.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        await expect_error(upload_links(anonymous(gamed), build.name), grpc.StatusCode.UNAUTHENTICATED)
        assert len((await upload_links(admin(gamed, auth), build.name)).links) == 1

    async def test_missing_or_malformed_build(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(upload_links(pub, f"{game.name}/builds/nope"), grpc.StatusCode.NOT_FOUND, "BUILD_NOT_FOUND")
        await expect_error(upload_links(pub, game.name), INVALID, fields=["name"])
