"""Envoy's own replies through the real edge: JSON `google.rpc.Status` for JSON callers, the gRPC status kept for
gRPC and gRPC-Web callers, and the services' own errors passed through untouched."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from far.gamed.v1 import gamed_service_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from devstack import envoy
from devstack.stack import Stack
from tests.conftest import wallet
from tests.e2e.test_edge_security import EDGE, edge_error

pytestmark = pytest.mark.e2e

GAMING = "far.gaming.v1.GamingService"  # no server in the e2e stack


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.envoy_http_url, timeout=10) as client:
        yield client


class TestJsonCallers:
    def test_unknown_rest_path(self, http: httpx.Client) -> None:
        response = http.get("/v1/nowhere")
        assert response.status_code == 404
        assert edge_error(response) == (5, "NOT_FOUND", EDGE)

    def test_bad_json_and_unknown_query_parameter(self, http: httpx.Client, make_token: Callable[..., str]) -> None:
        auth = {"authorization": f"Bearer {make_token(wallet(0xED6F), ('publisher',))}"}
        bad_json = http.post(
            "/v1/games?gameId=edge-bad", content=b"{not json", headers={**auth, "content-type": "application/json"}
        )
        assert bad_json.status_code == 400, bad_json.text
        assert edge_error(bad_json) == (3, "INVALID_ARGUMENT", EDGE)
        unknown = http.get("/v1/games?colour=red")
        assert unknown.status_code == 400, unknown.text
        assert edge_error(unknown) == (3, "INVALID_ARGUMENT", EDGE)

    def test_a_json_object_for_a_map_value_is_400_from_the_service(self, http: httpx.Client) -> None:
        # Envoy's transcoder turns an object where map<string, string> wants a string into a message that is
        # not protobuf; the service (not grpcio's UNKNOWN, which was HTTP 500) refuses it.
        response = http.post("/v1/nodes:register", json={"nodeId": "n1", "node": {"labels": {"zone": {"a": "b"}}}})
        assert response.status_code == 400, response.text
        assert edge_error(response) == (3, "MALFORMED_REQUEST", "gpu.far.network")

    def test_service_errors_are_not_rewritten(self, http: httpx.Client) -> None:
        response = http.get("/v1/games/no-such-game")
        assert response.status_code == 404
        assert edge_error(response)[1:] == ("GAME_NOT_FOUND", "gamed.far.network")

    def test_unimplemented_service_carries_error_info(self, http: httpx.Client) -> None:
        # Transcoded to the gRPC route, whose trailers-only reply carries the whole google.rpc.Status.
        response = http.get("/v1/tournaments")
        assert response.status_code == 501
        assert edge_error(response) == (12, "SERVICE_NOT_IMPLEMENTED", EDGE)
        assert response.json()["details"][0]["metadata"] == {"service": GAMING}

    def test_rest_path_with_another_method_is_405(self, http: httpx.Client) -> None:
        response = http.put("/v1/games/chess", json={})
        assert response.status_code == 405
        assert response.headers["allow"] == "DELETE, GET, PATCH"
        assert edge_error(response) == (12, "METHOD_NOT_ALLOWED", EDGE)
        assert http.delete("/v1/games").headers["allow"] == "GET, POST"
        # A bound method on the same path still reaches the service.
        assert edge_error(http.get("/v1/games/chess"))[1:] == ("GAME_NOT_FOUND", "gamed.far.network")


def test_openapi_document_is_served_by_the_edge(http: httpx.Client) -> None:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == envoy.OPENAPI_DOCUMENT.read_bytes()
    assert response.json()["openapi"].startswith("3.")
    assert http.post("/openapi.json").status_code == 404


class TestStreamFramingRoutes:
    @pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream", "application/json"])
    def test_unary_answers_are_plain_json_whatever_the_accept_header(self, http: httpx.Client, accept: str) -> None:
        # The Accept header picks a REST route with its own transcoder (stream framing); unary replies
        # and the edge's own checks are the same through each of them.
        response = http.get("/v1/games", headers={"accept": accept})
        assert response.status_code == 200, response.text
        assert "games" in response.json()
        unknown = http.get("/v1/games?colour=red", headers={"accept": accept})
        assert edge_error(unknown) == (3, "INVALID_ARGUMENT", EDGE)


def grpc_web_post(http: httpx.Client, path: str, message: bytes) -> httpx.Response:
    return http.post(
        path,
        content=struct.pack(">BI", 0, len(message)) + message,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )


class TestGrpcCallers:
    def test_unknown_service_is_unimplemented(self, envoy_channel: grpc.Channel) -> None:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = envoy_channel.unary_unary("/far.nosuch.v1.NosuchService/Get")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED

    def test_service_without_a_server_sends_error_info(self, envoy_channel: grpc.Channel) -> None:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = envoy_channel.unary_unary(f"/{GAMING}/ListTournaments")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=5)
        assert isinstance(raised.value, grpc.Call)
        status = rpc_status.from_call(raised.value)
        assert status is not None
        assert status.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        (detail,) = status.details
        info = error_details_pb2.ErrorInfo()
        assert detail.Unpack(info)
        assert (info.reason, info.domain, dict(info.metadata)) == ("SERVICE_NOT_IMPLEMENTED", EDGE, {"service": GAMING})

    def test_grpc_web_refusal_is_http_200_with_grpc_status(self, http: httpx.Client) -> None:
        message = gamed_service_pb2.CreateGameRequest(game_id="edge-web").SerializeToString()
        response = grpc_web_post(http, "/far.gamed.v1.GamedService/CreateGame", message)
        # A trailers-only gRPC-Web reply as gRPC-Web clients expect it: HTTP 200, the outcome in grpc-status.
        assert response.status_code == 200
        assert response.headers["grpc-status"] == "16"
        assert (
            response.headers["grpc-message"]
            == "missing or invalid access token (jwt_authn_access_denied{Jwt_is_missing})"
        )
        assert response.headers["content-type"].startswith("application/grpc-web")
        assert response.content == b""

    def test_grpc_web_unknown_method_is_unimplemented(self, http: httpx.Client) -> None:
        response = grpc_web_post(http, "/far.nosuch.v1.NosuchService/Get", b"")
        assert response.status_code == 200
        assert response.headers["grpc-status"] == "12"
        assert response.headers["grpc-message"] == "no such method (route_not_found)"

    def test_grpc_web_service_without_a_server_sends_error_info(self, http: httpx.Client) -> None:
        response = grpc_web_post(http, f"/{GAMING}/ListTournaments", b"")
        assert response.status_code == 200
        assert response.headers["grpc-status"] == "12"
        details = response.headers["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert info.reason == "SERVICE_NOT_IMPLEMENTED"
