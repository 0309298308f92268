"""CORS, the request body cap and local rate limiting through the real Envoy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from devstack.stack import Stack
from tests.conftest import wallet
from tests.e2e.test_edge_security import EDGE, edge_error

pytestmark = pytest.mark.e2e

ALLOWED = "http://localhost:3000"  # EDGE_CORS_ALLOWED_ORIGINS' default


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.envoy_http_url, timeout=10) as client:
        yield client


def preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options(
        "/v1/games",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


class TestCors:
    def test_preflight_from_an_allowed_origin(self, http: httpx.Client) -> None:
        response = preflight(http, ALLOWED)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == ALLOWED
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "authorization" in response.headers["access-control-allow-headers"]
        actual = http.get("/v1/games", headers={"origin": ALLOWED})
        assert actual.status_code == 200
        assert actual.headers["access-control-allow-origin"] == ALLOWED
        assert "grpc-status" in actual.headers["access-control-expose-headers"]

    def test_disallowed_origin_gets_no_cors_headers(self, http: httpx.Client) -> None:
        response = preflight(http, "https://evil.example")
        assert "access-control-allow-origin" not in response.headers
        actual = http.get("/v1/games", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in actual.headers


class TestBodyCap:
    def test_json_body_over_4_mib_is_413(self, http: httpx.Client, make_token: Callable[..., str]) -> None:
        auth = {"authorization": f"Bearer {make_token(wallet(0xED70), ('publisher',))}"}
        body = b'{"displayName": "' + b"x" * (4 * 1024 * 1024 + 1) + b'"}'
        response = http.post(
            "/v1/games?gameId=edge-big", content=body, headers={**auth, "content-type": "application/json"}
        )
        assert response.status_code == 413
        assert edge_error(response) == (3, "REQUEST_TOO_LARGE", EDGE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy alone (no servers) with a bucket of two requests, refilled by one a second."""
    env = {"EDGE_RATE_LIMIT_RPS": "1", "EDGE_RATE_LIMIT_BURST": "2"}
    run_dir: Path = tmp_path_factory.mktemp("tiny-bucket")
    with Stack([], env=env, run_dir=run_dir, envoy=True, envoy_concurrency=1) as running:
        yield running


class TestRateLimit:
    def test_empty_bucket_is_429_json_and_unavailable_over_grpc(self, tiny: Stack) -> None:
        with httpx.Client(base_url=tiny.envoy_http_url, timeout=5) as client:
            statuses = [client.get("/v1/games") for _ in range(4)]
        limited = [r for r in statuses if r.status_code == 429]
        assert limited, [r.status_code for r in statuses]
        assert edge_error(limited[0]) == (8, "RATE_LIMITED", EDGE)
        with grpc.insecure_channel(tiny.envoy_grpc_target) as channel:
            call = channel.unary_unary("/far.gamed.v1.GamedService/ListGames")
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
