"""gRPC-Web through Envoy's web listener with a client nobody here wrote: `buf curl --protocol grpcweb`.

buf curl speaks gRPC-Web over HTTP/1.1 by default and over h2c with `--http2-prior-knowledge`; the web
listener takes both, so every call runs over each. Reflection is not routed through Envoy, so the schema
comes from the committed descriptor set. buf curl prints the answer as JSON on stdout and a failed call
as a JSON error on stderr, exiting with the gRPC code shifted left by three bits.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from google.rpc import error_details_pb2

from devstack import catalog
from devstack.processes import wait_until
from devstack.stack import Stack
from tests.conftest import wallet

pytestmark = pytest.mark.e2e

BUF = catalog.ROOT / "node_modules" / ".bin" / "buf"
SCHEMA = catalog.ROOT / "generated" / "descriptors" / "far.binpb"
GAMED = "far.gamed.v1.GamedService"
PUBLISHER = wallet(0xB0F)
SHA = "b0" * 32
TRANSPORTS = {"http1": [], "h2c": ["--http2-prior-knowledge"]}
# What Envoy's access log says each transport arrived as.
ACCESS_LOG_PROTOCOL = {"http1": "HTTP/1.1", "h2c": "HTTP/2"}


@dataclass(frozen=True)
class BufReply:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def message(self) -> dict[str, Any]:
        assert self.exit_code == 0, self.stderr
        parsed: dict[str, Any] = json.loads(self.stdout)
        return parsed

    @property
    def grpc_code(self) -> int:
        """The gRPC status code of a failed call (buf curl exits with it shifted left by three)."""
        assert self.exit_code >= 8, (self.exit_code, self.stderr)
        assert self.exit_code % 8 == 0, (self.exit_code, self.stderr)
        return self.exit_code >> 3

    @property
    def error(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.stderr)
        return parsed

    def detail(self, type_name: str) -> bytes:
        """The serialized error detail of `type_name` (buf curl prints details as unpadded base64)."""
        (value,) = [d["value"] for d in self.error.get("details", []) if d["type"] == type_name]
        return base64.b64decode(value + "=" * (-len(value) % 4))

    def error_info(self) -> error_details_pb2.ErrorInfo:
        return error_details_pb2.ErrorInfo.FromString(self.detail("google.rpc.ErrorInfo"))


BufCurl = Callable[..., BufReply]


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def buf_curl(transport: str, stack: Stack) -> BufCurl:
    """`buf_curl(method, body, token=None, user_agent=None)`: one gRPC-Web call through Envoy, over `transport`."""

    def call(method: str, body: dict[str, Any], *, token: str | None = None, user_agent: str | None = None) -> BufReply:
        headers = ["-H", f"Authorization: Bearer {token}"] if token else []
        if user_agent:
            headers += ["-H", f"User-Agent: {user_agent}"]
        argv = [
            str(BUF),
            "curl",
            "--protocol",
            "grpcweb",
            *TRANSPORTS[transport],
            "--schema",
            str(SCHEMA),
            "--connect-timeout",
            "5",
            *headers,
            "-d",
            json.dumps(body),
            f"{stack.envoy_http_url}/{method}",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd=catalog.ROOT)
        return BufReply(done.returncode, done.stdout, done.stderr)

    return call


@pytest.fixture(scope="module")
def publisher_token(make_token: Callable[..., str]) -> str:
    return make_token(PUBLISHER, ("publisher",))


@pytest.fixture(scope="module")
def published_game(stack: Stack, publisher_token: str) -> str:
    """A published game with one Linux build, made over JSON so the gRPC-Web calls only read it."""
    game_id = f"buf-{secrets.token_hex(3)}"
    auth = {"authorization": f"Bearer {publisher_token}"}
    with httpx.Client(base_url=stack.envoy_http_url, timeout=10, headers=auth) as http:
        created = http.post(f"/v1/games?gameId={game_id}", json={"displayName": "Buf Quest"})
        assert created.status_code == 200, created.text
        build = http.post(
            f"/v1/games/{game_id}/builds?buildId=linux-1",
            json={
                "platform": "PLATFORM_LINUX",
                "version": "1.0.0",
                "assets": [{"path": "bin/quest", "sizeBytes": "2048", "sha256": SHA}],
            },
        )
        assert build.status_code == 200, build.text
        published = http.patch(
            f"/v1/games/{game_id}", json={"game": {"state": "STATE_PUBLISHED"}, "updateMask": "state"}
        )
        assert published.status_code == 200, published.text
    return game_id


def _access_log_entry(stack: Stack, user_agent: str) -> dict[str, Any] | None:
    log = stack.log_dir / "envoy-access.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry: dict[str, Any] = json.loads(line)
        if entry.get("user_agent") == user_agent:
            return entry
    return None


def test_the_call_arrives_over_the_transport_asked_for(buf_curl: BufCurl, transport: str, stack: Stack) -> None:
    # The edge replaces a caller's x-request-id, so the call is found in the access log by its user agent.
    user_agent = f"far-e2e-{uuid.uuid4()}"
    reply = buf_curl(f"{GAMED}/ListGames", {"pageSize": 1}, user_agent=user_agent)
    assert reply.exit_code == 0, reply.stderr
    # Envoy writes its access log in batches: poll for the line.
    entry = wait_until(lambda: _access_log_entry(stack, user_agent), timeout=20, what="the access log line")
    assert entry["protocol"] == ACCESS_LOG_PROTOCOL[transport]
    assert entry["path"] == f"/{GAMED}/ListGames"
    assert entry["status"] == 200


class TestPublicCalls:
    def test_get_game(self, buf_curl: BufCurl, published_game: str) -> None:
        game = buf_curl(f"{GAMED}/GetGame", {"name": f"games/{published_game}"}).message
        assert game["name"] == f"games/{published_game}"
        assert game["displayName"] == "Buf Quest"
        assert game["state"] == "STATE_PUBLISHED"
        assert game["publisher"] == PUBLISHER
        assert game["platforms"] == ["PLATFORM_LINUX"]

    def test_list_games_pages_through_the_catalog(self, buf_curl: BufCurl, published_game: str) -> None:
        names: list[str] = []
        page: dict[str, Any] = {"pageSize": 1}
        for _ in range(100):
            reply = buf_curl(f"{GAMED}/ListGames", page).message
            assert len(reply.get("games", [])) <= 1
            names += [game["name"] for game in reply.get("games", [])]
            if not reply.get("nextPageToken"):
                break
            page = {"pageSize": 1, "pageToken": reply["nextPageToken"]}
        assert f"games/{published_game}" in names
        assert len(names) == len(set(names))

    def test_list_builds(self, buf_curl: BufCurl, published_game: str) -> None:
        reply = buf_curl(f"{GAMED}/ListBuilds", {"parent": f"games/{published_game}"}).message
        (build,) = reply["builds"]
        assert build["name"] == f"games/{published_game}/builds/linux-1"
        assert build["totalSizeBytes"] == "2048"  # int64 as a JSON string, as protojson writes it


class TestAuthenticatedCalls:
    def test_create_game_then_read_the_draft(self, buf_curl: BufCurl, publisher_token: str) -> None:
        game_id = f"buf-{secrets.token_hex(3)}"
        created = buf_curl(
            f"{GAMED}/CreateGame",
            {"gameId": game_id, "game": {"displayName": "Draft", "genres": ["puzzle"]}},
            token=publisher_token,
        ).message
        assert created["name"] == f"games/{game_id}"
        assert created["publisher"] == PUBLISHER
        assert created["state"] == "STATE_DRAFT"
        assert created["genres"] == ["puzzle"]

        # Drafts are visible to their publisher only: the token travels with the gRPC-Web call.
        own = buf_curl(f"{GAMED}/GetGame", {"name": f"games/{game_id}"}, token=publisher_token).message
        assert own["etag"] == created["etag"]
        anonymous = buf_curl(f"{GAMED}/GetGame", {"name": f"games/{game_id}"})
        assert anonymous.grpc_code == 5
        assert anonymous.error_info().reason == "GAME_NOT_FOUND"

    def test_missing_token_is_unauthenticated_at_the_edge(self, buf_curl: BufCurl) -> None:
        reply = buf_curl(f"{GAMED}/CreateGame", {"gameId": "buf-anon", "game": {"displayName": "Anon"}})
        assert reply.grpc_code == 16
        assert reply.error["code"] == "unauthenticated"
        # The edge answers HTTP 200 with grpc-status, so the client shows the edge's message, not "HTTP status 401".
        assert reply.error["message"] == "missing or invalid access token (jwt_authn_access_denied{Jwt_is_missing})"

    def test_token_without_the_role_is_refused_by_the_service(
        self, buf_curl: BufCurl, make_token: Callable[..., str]
    ) -> None:
        reply = buf_curl(
            f"{GAMED}/CreateGame",
            {"gameId": "buf-norole", "game": {"displayName": "No role"}},
            token=make_token(wallet(0xB10), ("user",)),
        )
        assert reply.grpc_code == 7
        info = reply.error_info()
        assert (info.reason, info.domain) == ("MISSING_ROLE", "gamed.far.network")


class TestErrors:
    def test_service_without_a_server_is_unimplemented_with_error_info(self, buf_curl: BufCurl) -> None:
        reply = buf_curl("far.gaming.v1.GamingService/ListTournaments", {})
        assert reply.grpc_code == 12
        assert "far.gaming.v1.GamingService" in reply.error["message"]
        info = reply.error_info()
        assert (info.reason, info.domain) == ("SERVICE_NOT_IMPLEMENTED", "edge.far.network")
        assert info.metadata["service"] == "far.gaming.v1.GamingService"

    def test_not_found_carries_error_info(self, buf_curl: BufCurl) -> None:
        reply = buf_curl(f"{GAMED}/GetGame", {"name": "games/no-such-buf-game"})
        assert reply.grpc_code == 5
        assert reply.error["code"] == "not_found"
        assert "games/no-such-buf-game" in reply.error["message"]
        info = reply.error_info()
        assert (info.reason, info.domain) == ("GAME_NOT_FOUND", "gamed.far.network")
        assert info.metadata["resource"] == "games/no-such-buf-game"

    def test_invalid_argument_carries_field_violations(self, buf_curl: BufCurl, publisher_token: str) -> None:
        reply = buf_curl(f"{GAMED}/CreateGame", {"gameId": "Bad_Id", "game": {}}, token=publisher_token)
        assert reply.grpc_code == 3
        assert reply.error_info().reason == "INVALID_ARGUMENT"
        bad_request = error_details_pb2.BadRequest.FromString(reply.detail("google.rpc.BadRequest"))
        assert "game_id" in [violation.field for violation in bad_request.field_violations]
