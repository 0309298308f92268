"""gamed end to end: the same calls as JSON through Envoy and as gRPC (through Envoy and direct), errors included."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from far.gamed.v1 import build_pb2, game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from devstack.stack import Stack
from tests.conftest import wallet

pytestmark = pytest.mark.e2e

PUBLISHER = wallet(0xE2E)
OTHER = wallet(0xE2F)
SHA = "5e" * 32


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.envoy_http_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def via_envoy(envoy_channel: grpc.Channel) -> gamed_service_pb2_grpc.GamedServiceStub:
    return gamed_service_pb2_grpc.GamedServiceStub(envoy_channel)


@pytest.fixture(scope="module")
def direct(gamed_channel_direct: grpc.Channel) -> gamed_service_pb2_grpc.GamedServiceStub:
    return gamed_service_pb2_grpc.GamedServiceStub(gamed_channel_direct)


@pytest.fixture(scope="module")
def bearer(make_token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def headers(subject: str = PUBLISHER, *roles: str, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or make_token(subject, roles or ('publisher',))}"}

    return headers


def _md(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(headers.items())


def _published_game(http: httpx.Client, headers: dict[str, str]) -> str:
    game_id = _id("e2e")
    assert http.post(f"/v1/games?gameId={game_id}", json={"displayName": "E2E"}, headers=headers).status_code == 200
    build = http.post(
        f"/v1/games/{game_id}/builds",
        json={
            "platform": "PLATFORM_LINUX",
            "version": "1.0.0",
            "assets": [{"path": "bin/game", "sizeBytes": "1024", "sha256": SHA}],
        },
        headers=headers,
    )
    assert build.status_code == 200, build.text
    published = http.patch(
        f"/v1/games/{game_id}", json={"game": {"state": "STATE_PUBLISHED"}, "updateMask": "state"}, headers=headers
    )
    assert published.status_code == 200, published.text
    return game_id


class TestCatalogOverJson:
    def test_create_build_publish_promote_download(
        self, http: httpx.Client, bearer: Callable[..., dict[str, str]]
    ) -> None:
        headers = bearer()
        game_id = _id("json")
        created = http.post(
            f"/v1/games?gameId={game_id}",
            json={"displayName": "Chess", "description": "Kings and queens", "genres": ["strategy"]},
            headers=headers,
        )
        assert created.status_code == 200, created.text
        game = created.json()
        assert game["name"] == f"games/{game_id}"
        assert game["state"] == "STATE_DRAFT"
        assert game["publisher"] == PUBLISHER
        assert http.get(f"/v1/games/{game_id}").status_code == 404  # drafts are invisible to anonymous callers

        build = http.post(
            f"/v1/games/{game_id}/builds?buildId=linux-100",
            json={
                "platform": "PLATFORM_LINUX",
                "version": "1.0.0",
                "assets": [{"path": "bin/chess", "sizeBytes": "1048576", "sha256": SHA}],
            },
            headers=headers,
        )
        assert build.status_code == 200, build.text
        assert build.json()["totalSizeBytes"] == "1048576"  # int64 travels as a string in JSON

        etag = http.get(f"/v1/games/{game_id}", headers=headers).json()["etag"]
        assert etag != game["etag"]  # a new build changes the game (its platforms)
        published = http.patch(
            f"/v1/games/{game_id}",
            json={"game": {"state": "STATE_PUBLISHED", "etag": etag}, "updateMask": "state"},
            headers=headers,
        )
        assert published.status_code == 200, published.text
        assert published.json()["state"] == "STATE_PUBLISHED"
        assert published.json()["platforms"] == ["PLATFORM_LINUX"]
        assert http.get(f"/v1/games/{game_id}").json()["displayName"] == "Chess"

        assert http.post(f"/v1/games/{game_id}/channels?channelId=stable", json={}, headers=headers).status_code == 200
        promoted = http.post(
            f"/v1/games/{game_id}/channels/stable:promote",
            json={"build": f"games/{game_id}/builds/linux-100"},
            headers=headers,
        )
        assert promoted.status_code == 200, promoted.text
        (release,) = promoted.json()["currentReleases"]
        assert release["build"] == f"games/{game_id}/builds/linux-100"
        assert release["state"] == "STATE_CURRENT"

        links = http.get(f"/v1/games/{game_id}/channels/stable:downloadLinks", params={"platform": "PLATFORM_LINUX"})
        assert links.status_code == 200, links.text
        body = links.json()
        assert body["build"] == f"games/{game_id}/builds/linux-100"
        (link,) = body["links"]
        assert link["sha256"] == SHA
        assert f"/games/{game_id}/builds/linux-100/bin/chess?" in link["url"]
        assert "X-Amz-Signature=" in link["url"]

    def test_list_pages_through_json(self, http: httpx.Client, bearer: Callable[..., dict[str, str]]) -> None:
        genre = f"g{secrets.token_hex(3)}"
        headers = bearer()
        names = set()
        for _ in range(3):
            game_id = _id("page")
            names.add(f"games/{game_id}")
            response = http.post(
                f"/v1/games?gameId={game_id}", json={"displayName": "P", "genres": [genre]}, headers=headers
            )
            assert response.status_code == 200
        seen: list[str] = []
        token = ""
        while True:
            page = http.get("/v1/games", params={"genre": genre, "pageSize": 2, "pageToken": token}, headers=headers)
            assert page.status_code == 200, page.text
            seen += [g["name"] for g in page.json().get("games", [])]
            token = page.json().get("nextPageToken", "")
            if not token:
                break
        assert sorted(seen) == sorted(names)

    def test_json_and_grpc_return_the_same_resource(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        direct: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
    ) -> None:
        game_id = _published_game(http, bearer())
        as_json = http.get(f"/v1/games/{game_id}").json()
        request = gamed_service_pb2.GetGameRequest(name=f"games/{game_id}")
        for stub in (via_envoy, direct):
            as_proto = stub.GetGame(request, timeout=5)
            assert json_format.MessageToDict(as_proto) == {k: v for k, v in as_json.items() if v not in ("", [])}


def _grpc_error(call: Callable[[], Any]) -> status_pb2.Status:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    return status


def _json_error(response: httpx.Response) -> status_pb2.Status:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return json_format.ParseDict(response.json(), status_pb2.Status())


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


def _field_violations(status: status_pb2.Status) -> list[str]:
    bad_request = error_details_pb2.BadRequest()
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    detail.Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


class TestErrorsAreTheSameInJsonAndGrpc:
    """Each case: one REST call and the same gRPC call through Envoy, with the HTTP status Envoy maps to."""

    @pytest.fixture(scope="class")
    @classmethod
    def game_id(cls, http: httpx.Client, bearer: Callable[..., dict[str, str]]) -> str:
        return _published_game(http, bearer())

    def _check(
        self,
        response: httpx.Response,
        grpc_call: Callable[[], Any],
        *,
        http_status: int,
        code: grpc.StatusCode,
        reason: str,
    ) -> status_pb2.Status:
        assert response.status_code == http_status, response.text
        as_json = _json_error(response)
        as_grpc = _grpc_error(grpc_call)
        assert as_json.code == code.value[0]
        assert as_json == as_grpc  # the same google.rpc.Status, details included
        assert _error_info(as_json).reason == reason
        assert _error_info(as_json).domain == "gamed.far.network"
        return as_json

    def test_invalid_argument_lists_every_bad_field(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
    ) -> None:
        headers = bearer()
        body = self._check(
            http.post("/v1/games?gameId=Bad_Id", json={"displayName": "", "genres": ["Not A Genre"]}, headers=headers),
            lambda: via_envoy.CreateGame(
                gamed_service_pb2.CreateGameRequest(
                    game_id="Bad_Id", game=game_pb2.Game(display_name="", genres=["Not A Genre"])
                ),
                metadata=_md(headers),
                timeout=5,
            ),
            http_status=400,
            code=grpc.StatusCode.INVALID_ARGUMENT,
            reason="INVALID_ARGUMENT",
        )
        assert set(_field_violations(body)) == {"game_id", "game.display_name", "game.genres[0]"}

    def test_not_found(self, http: httpx.Client, via_envoy: gamed_service_pb2_grpc.GamedServiceStub) -> None:
        self._check(
            http.get("/v1/games/no-such-game"),
            lambda: via_envoy.GetGame(gamed_service_pb2.GetGameRequest(name="games/no-such-game"), timeout=5),
            http_status=404,
            code=grpc.StatusCode.NOT_FOUND,
            reason="GAME_NOT_FOUND",
        )

    def test_bad_token_is_unauthenticated(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        direct: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
    ) -> None:
        # The edge's jwt_authn refuses it before gamed sees it (tests/e2e/test_edge_security.py); gamed does too.
        headers = bearer(token="not-a-jwt")
        response = http.get("/v1/games", headers=headers)
        assert response.status_code == 401
        assert _error_info(_json_error(response)).domain == "edge.far.network"
        with pytest.raises(grpc.RpcError) as raised:
            via_envoy.ListGames(gamed_service_pb2.ListGamesRequest(), metadata=_md(headers), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        status = _grpc_error(
            lambda: direct.ListGames(gamed_service_pb2.ListGamesRequest(), metadata=_md(headers), timeout=5)
        )
        assert (status.code, _error_info(status).reason) == (grpc.StatusCode.UNAUTHENTICATED.value[0], "TOKEN_INVALID")

    def test_missing_role_is_permission_denied(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
    ) -> None:
        headers = bearer(OTHER, "user")
        self._check(
            http.post("/v1/games?gameId=denied-game", json={"displayName": "X"}, headers=headers),
            lambda: via_envoy.CreateGame(
                gamed_service_pb2.CreateGameRequest(game_id="denied-game", game=game_pb2.Game(display_name="X")),
                metadata=_md(headers),
                timeout=5,
            ),
            http_status=403,
            code=grpc.StatusCode.PERMISSION_DENIED,
            reason="MISSING_ROLE",
        )

    def test_duplicate_is_already_exists(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
        game_id: str,
    ) -> None:
        headers = bearer()
        self._check(
            http.post(f"/v1/games?gameId={game_id}", json={"displayName": "Again"}, headers=headers),
            lambda: via_envoy.CreateGame(
                gamed_service_pb2.CreateGameRequest(game_id=game_id, game=game_pb2.Game(display_name="Again")),
                metadata=_md(headers),
                timeout=5,
            ),
            http_status=409,
            code=grpc.StatusCode.ALREADY_EXISTS,
            reason="GAME_ALREADY_EXISTS",
        )

    def test_deleting_a_published_game_is_a_failed_precondition(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
        game_id: str,
    ) -> None:
        headers = bearer()
        self._check(
            http.delete(f"/v1/games/{game_id}", headers=headers),
            lambda: via_envoy.DeleteGame(
                gamed_service_pb2.DeleteGameRequest(name=f"games/{game_id}"), metadata=_md(headers), timeout=5
            ),
            http_status=400,
            code=grpc.StatusCode.FAILED_PRECONDITION,
            reason="GAME_PUBLISHED",
        )

    def test_stale_etag_is_aborted(
        self,
        http: httpx.Client,
        via_envoy: gamed_service_pb2_grpc.GamedServiceStub,
        bearer: Callable[..., dict[str, str]],
        game_id: str,
    ) -> None:
        headers = bearer()
        self._check(
            http.patch(
                f"/v1/games/{game_id}",
                json={"game": {"description": "new", "etag": "stale"}, "updateMask": "description"},
                headers=headers,
            ),
            lambda: via_envoy.UpdateGame(
                gamed_service_pb2.UpdateGameRequest(
                    game=game_pb2.Game(name=f"games/{game_id}", description="new", etag="stale"),
                    update_mask=FieldMask(paths=["description"]),
                ),
                metadata=_md(headers),
                timeout=5,
            ),
            http_status=409,
            code=grpc.StatusCode.ABORTED,
            reason="ETAG_MISMATCH",
        )

    def test_tampered_page_token_is_invalid(
        self, http: httpx.Client, via_envoy: gamed_service_pb2_grpc.GamedServiceStub
    ) -> None:
        token = base64.urlsafe_b64encode(b'{"c":{"id":"x","v":"y"},"s":"0"}').decode().rstrip("=") + ".AAAA"
        body = self._check(
            http.get("/v1/games", params={"pageToken": token}),
            lambda: via_envoy.ListGames(gamed_service_pb2.ListGamesRequest(page_token=token), timeout=5),
            http_status=400,
            code=grpc.StatusCode.INVALID_ARGUMENT,
            reason="INVALID_ARGUMENT",
        )
        assert _field_violations(body) == ["page_token"]


def test_errors_carry_no_internals(http: httpx.Client, bearer: Callable[..., dict[str, str]]) -> None:
    response = http.post(
        "/v1/games/no-such-game/builds",
        json={
            "platform": "PLATFORM_LINUX",
            "version": "1.0.0",
            "assets": [{"path": "a", "sizeBytes": "1", "sha256": SHA}],
        },
        headers=bearer(),
    )
    assert response.status_code == 404
    text = response.text.lower()
    assert "traceback" not in text
    assert "sqlalchemy" not in text
    assert "select" not in text


def test_build_messages_round_trip_json(http: httpx.Client, bearer: Callable[..., dict[str, str]]) -> None:
    game_id = _published_game(http, bearer())
    listed = http.get(f"/v1/games/{game_id}/builds").json()["builds"]
    build = json_format.ParseDict(listed[0], build_pb2.Build())
    assert build.assets[0].size_bytes == 1024
    assert build.platform == game_pb2.PLATFORM_LINUX
