"""Per-route rate limits through the real Envoy: sign-in's own bucket (devstack/catalog.py ROUTE_RATE_LIMITS,
here narrowed with EDGE_ROUTE_RATE_LIMITS) empties without touching other routes, over JSON and gRPC alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from devstack.stack import Stack
from tests.e2e.test_edge_security import EDGE, edge_error

pytestmark = pytest.mark.e2e

CHALLENGE = {"walletAddress": "0x" + "ab" * 20, "chainId": "97", "domain": "localhost:3000", "uri": "http://x/"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy alone (no servers: every route answers 501) with sign-in's bucket down to one request a second."""
    env = {"EDGE_ROUTE_RATE_LIMITS": "auth-sign-in=1/1"}
    run_dir: Path = tmp_path_factory.mktemp("route-limits")
    with Stack([], env=env, run_dir=run_dir, envoy=True, envoy_concurrency=1) as running:
        yield running


def _drain_sign_in(client: httpx.Client) -> httpx.Response:
    """POST /v1/challenges until sign-in's bucket is empty; the 429."""
    for _ in range(20):
        response = client.post("/v1/challenges", json=CHALLENGE)
        if response.status_code == 429:
            return response
        assert response.status_code == 501, response.text  # auth is not running: the edge's UNIMPLEMENTED
    pytest.fail("sign-in's bucket never emptied")


class TestRouteRateLimits:
    def test_sign_in_bucket_empties_other_routes_pass(self, edge: Stack) -> None:
        with httpx.Client(base_url=edge.envoy_http_url, timeout=5) as client:
            limited = _drain_sign_in(client)
            assert edge_error(limited) == (8, "RATE_LIMITED", EDGE)
            others = [client.get("/v1/games").status_code for _ in range(5)]
        assert 429 not in others, others

    def test_grpc_and_rest_share_the_bucket(self, edge: Stack) -> None:
        """An emptied bucket (over REST) refuses the gRPC path of another method of the group too; the bucket
        refills every second, so a refill between the two calls gets another try."""
        codes = []
        with (
            httpx.Client(base_url=edge.envoy_http_url, timeout=5) as client,
            grpc.insecure_channel(edge.envoy_grpc_target) as channel,
        ):
            sign_in: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/far.auth.v1.AuthService/SignIn")
            for _ in range(5):
                _drain_sign_in(client)
                try:
                    sign_in(b"", timeout=5)
                except grpc.RpcError as error:
                    codes.append(error.code())
                if grpc.StatusCode.UNAVAILABLE in codes:
                    break
        # A token left for it would have reached the (unrouted) service: UNIMPLEMENTED.
        assert grpc.StatusCode.UNAVAILABLE in codes, codes
