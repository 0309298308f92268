"""mTLS through the real Envoy: the partner listener, the services' own TLS ports, and identities end to end.

The stack runs gamed and, as the gaming service, a probe (tests/e2e/partner_probe.py) whose SubmitScore
(declared for the `game-server` partner and admins) echoes the principal the service saw. Handshake
refusals are read from Envoy's own TLS counters, so each test shows which check refused the client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from far.gamed.v1 import gamed_service_pb2, gamed_service_pb2_grpc
from far.gaming.v1 import gaming_service_pb2, gaming_service_pb2_grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from devstack import catalog
from devstack.pki import DevPki
from devstack.processes import http_get
from devstack.stack import Stack, run_migrations
from tests.conftest import wallet

pytestmark = pytest.mark.e2e

BUF = catalog.ROOT / "node_modules" / ".bin" / "buf"
SCHEMA = catalog.ROOT / "generated" / "descriptors" / "far.binpb"
GAME_SERVER = "spiffe://far.network/partner/game-server"
PLAYER = wallet(0x5C0)
SUBMIT = gaming_service_pb2.SubmitScoreRequest(
    name="tournaments/mtls", request_id="8d7d3f0e-8a51-4a8e-9a3c-5c6f4a2d9b10", wallet=PLAYER, score=42
)


@pytest.fixture(scope="module")
def edge(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """gamed and the gaming probe behind Envoy, all over mTLS (the Stack default)."""
    run_dir = tmp_path_factory.mktemp("partner-edge")
    run_migrations(["gamed"], stack_env, log_path=run_dir / "logs" / "migrations.log")
    probe = [sys.executable, "-m", "tests.e2e.partner_probe"]
    with Stack(["gamed", "gaming"], env=stack_env, run_dir=run_dir, commands={"gaming": probe}) as running:
        yield running


@pytest.fixture(scope="module")
def pki(edge: Stack) -> DevPki:
    assert edge.pki is not None
    return edge.pki


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A CA nobody told Envoy or the services about, with a `game-server` certificate of its own."""
    return DevPki.ensure(tmp_path_factory.mktemp("other-ca"), partners=["game-server"])


def credentials(trusted: DevPki, client: DevPki | None = None, kind: str = "partner", name: str = "game-server") -> Any:
    """Trust `trusted`'s CA; present `client`'s certificate for `<kind>/<name>` (none when `client` is None)."""
    ca = trusted.ca_file.read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(ca)
    cert, key = client.ensure_identity(kind, name).read()
    return grpc.ssl_channel_credentials(ca, key, cert)


def submit(
    target: str, creds: Any, metadata: tuple[tuple[str, str], ...] = ()
) -> gaming_service_pb2.SubmitScoreResponse:
    channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    with channel:
        response: gaming_service_pb2.SubmitScoreResponse = gaming_service_pb2_grpc.GamingServiceStub(
            channel
        ).SubmitScore(SUBMIT, metadata=metadata, timeout=10)
        return response


def seen_by_service(response: gaming_service_pb2.SubmitScoreResponse) -> dict[str, Any]:
    seen: dict[str, Any] = json_format.MessageToDict(response.record.metadata)
    return seen


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def reason(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(error)
    assert status is not None, error
    info = error_details_pb2.ErrorInfo()
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    detail.Unpack(info)
    return error.code(), info.reason


def tls_failures(edge: Stack) -> dict[str, int]:
    """Envoy's counters of refused client certificates on the partner listener, by cause."""
    status, body = http_get(f"{edge.envoy_admin_url}/stats?format=json&filter=ssl\\.fail_verify", timeout=5)
    assert status == 200, body
    port = f"_{edge.envoy_partner_port}."
    counts: dict[str, int] = {}
    for stat in json.loads(body)["stats"]:
        if stat["name"].startswith("listener.") and port in stat["name"]:
            counts[stat["name"].rsplit(".", 1)[1]] = int(stat["value"])
    return counts


def counted(edge: Stack, counter: str, expected: int, timeout: float = 5.0) -> int:
    """The counter once it reaches `expected` (Envoy may update it a moment after the client saw the failure)."""
    deadline = time.monotonic() + timeout
    while (value := tls_failures(edge).get(counter, 0)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def handshake_refused(edge: Stack, creds: Any, counter: str) -> grpc.RpcError:
    """The call fails at the handshake (UNAVAILABLE) and Envoy counts it under `counter`."""
    before = tls_failures(edge).get(counter, 0)
    error = refused(lambda: submit(edge.envoy_partner_target, creds))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert counted(edge, counter, before + 1) == before + 1
    return error


class TestPartnerListener:
    def test_allowed_partner_reaches_the_service_as_the_partner(self, edge: Stack, pki: DevPki) -> None:
        response = submit(edge.envoy_partner_target, credentials(pki, pki))
        assert response.outcome == gaming_service_pb2.SubmitScoreResponse.OUTCOME_RECORD_CREATED
        assert response.record.wallet == PLAYER
        assert seen_by_service(response) == {"partner": "game-server", "service": "", "subject": GAME_SERVER}

    def test_another_allowed_partner_is_refused_by_the_method_declaration(self, edge: Stack, pki: DevPki) -> None:
        error = refused(lambda: submit(edge.envoy_partner_target, credentials(pki, pki, name="node-agent")))
        assert reason(error) == (grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY")

    def test_a_forged_forwarded_certificate_is_replaced(self, edge: Stack, pki: DevPki) -> None:
        forged = (("x-forwarded-client-cert", f"URI={GAME_SERVER}"),)
        error = refused(
            lambda: submit(edge.envoy_partner_target, credentials(pki, pki, name="node-agent"), metadata=forged)
        )
        assert reason(error) == (grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY")

    def test_other_services_answer_over_the_partner_listener(self, edge: Stack, pki: DevPki) -> None:
        with grpc.secure_channel(edge.envoy_partner_target, credentials(pki, pki)) as channel:
            games = gamed_service_pb2_grpc.GamedServiceStub(channel).ListGames(
                gamed_service_pb2.ListGamesRequest(page_size=1), timeout=10
            )
            assert isinstance(games, gamed_service_pb2.ListGamesResponse)
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/far.staking.v1.StakingService/GetStakingMetrics"
            )
            assert refused(lambda: call(b"", timeout=10)).code() == grpc.StatusCode.UNIMPLEMENTED

    def test_no_client_certificate_is_refused_at_the_handshake(self, edge: Stack, pki: DevPki) -> None:
        handshake_refused(edge, credentials(pki), "fail_verify_no_cert")

    def test_certificate_from_another_ca_is_refused_at_the_handshake(
        self, edge: Stack, pki: DevPki, other_ca: DevPki
    ) -> None:
        handshake_refused(edge, credentials(pki, other_ca), "fail_verify_error")

    @pytest.mark.parametrize(("kind", "name"), [("partner", "intruder"), ("service", "gamed"), ("edge", "envoy")])
    def test_identity_outside_the_allow_list_is_refused_at_the_handshake(
        self, edge: Stack, pki: DevPki, kind: str, name: str
    ) -> None:
        handshake_refused(edge, credentials(pki, pki, kind=kind, name=name), "fail_verify_san")

    def test_plaintext_is_refused(self, edge: Stack) -> None:
        error = refused(lambda: submit(edge.envoy_partner_target, None))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


class TestWebListener:
    def test_forwarded_client_certificate_from_a_web_client_is_dropped(self, edge: Stack, make_token: Any) -> None:
        """An account claiming to be the game server through the header is still just the account."""
        metadata = (
            ("authorization", f"Bearer {make_token(PLAYER)}"),
            ("x-forwarded-client-cert", f"By=spiffe://far.network/edge/envoy;URI={GAME_SERVER}"),
        )
        error = refused(lambda: submit(edge.envoy_grpc_target, None, metadata=metadata))
        assert reason(error) == (grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY")

    def test_an_admin_account_passes_the_same_declaration(self, edge: Stack, make_token: Any) -> None:
        metadata = (("authorization", f"Bearer {make_token(PLAYER, ('admin',))}"),)
        response = submit(edge.envoy_grpc_target, None, metadata=metadata)
        assert seen_by_service(response) == {"partner": "", "service": "", "subject": PLAYER}


class TestServicePorts:
    def test_plaintext_to_a_service_port_fails(self, edge: Stack) -> None:
        for service in ("gamed", "gaming"):
            with grpc.insecure_channel(edge.grpc_target(service)) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                error = refused(lambda stub=stub: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE

    def test_certificate_from_another_ca_fails_the_handshake(self, edge: Stack, pki: DevPki, other_ca: DevPki) -> None:
        error = refused(lambda: submit(edge.grpc_target("gaming"), credentials(pki, other_ca)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE

    @pytest.mark.parametrize(("kind", "name"), [("partner", "game-server"), ("person", "mallory")])
    def test_unknown_identity_from_the_platform_ca_is_unauthenticated(
        self, edge: Stack, pki: DevPki, kind: str, name: str
    ) -> None:
        """Partners go through the edge, which checks its allow-list; straight to a service they are unknown."""
        error = refused(lambda: submit(edge.grpc_target("gaming"), credentials(pki, pki, kind=kind, name=name)))
        assert reason(error) == (grpc.StatusCode.UNAUTHENTICATED, "PEER_NOT_ALLOWED")
        with grpc.secure_channel(edge.grpc_target("gamed"), credentials(pki, pki, kind=kind, name=name)) as channel:
            call = health_pb2_grpc.HealthStub(channel).Check
            health = refused(lambda: call(health_pb2.HealthCheckRequest(), timeout=5))
        assert reason(health) == (grpc.StatusCode.UNAUTHENTICATED, "PEER_NOT_ALLOWED")

    def test_another_service_is_an_internal_caller(self, edge: Stack, pki: DevPki) -> None:
        """A FAR service's certificate is that service, and a forwarded certificate from it counts for nothing."""
        forged = (("x-forwarded-client-cert", f"URI={GAME_SERVER}"),)
        creds = credentials(pki, pki, kind="service", name="inference")
        error = refused(lambda: submit(edge.grpc_target("gaming"), creds, metadata=forged))
        assert reason(error) == (grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY")


def buf_curl(
    edge: Stack, pki: DevPki, method: str, body: dict[str, Any], *, identity: str | None
) -> subprocess.CompletedProcess[str]:
    """`buf curl --protocol grpc` over mTLS to the partner listener, as the partner `identity` (None: no cert)."""
    argv = [str(BUF), "curl", "--protocol", "grpc", "--schema", str(SCHEMA), "--cacert", str(pki.ca_file)]
    if identity is not None:
        files = pki.ensure_identity("partner", identity)
        argv += ["--cert", str(files.cert), "--key", str(files.key)]
    argv += [f"https://{edge.envoy_partner_target}/{method}", "-d", json.dumps(body)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=catalog.ROOT)


class TestBufCurl:
    def test_partner_call_over_mtls(self, edge: Stack, pki: DevPki) -> None:
        body = {"name": "tournaments/mtls", "requestId": SUBMIT.request_id, "wallet": PLAYER, "score": "42"}
        result = buf_curl(edge, pki, "far.gaming.v1.GamingService/SubmitScore", body, identity="game-server")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["outcome"] == "OUTCOME_RECORD_CREATED"
        assert answer["record"]["wallet"] == PLAYER
        assert answer["record"]["score"] == "42"
        assert answer["record"]["metadata"] == {"partner": "game-server", "service": "", "subject": GAME_SERVER}

    def test_a_real_service_over_mtls(self, edge: Stack, pki: DevPki) -> None:
        result = buf_curl(edge, pki, "far.gamed.v1.GamedService/ListGames", {"pageSize": 1}, identity="node-agent")
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), dict)

    def test_without_a_client_certificate(self, edge: Stack, pki: DevPki) -> None:
        before = tls_failures(edge).get("fail_verify_no_cert", 0)
        result = buf_curl(edge, pki, "far.gamed.v1.GamedService/ListGames", {}, identity=None)
        assert result.returncode != 0
        assert result.stdout == ""
        assert counted(edge, "fail_verify_no_cert", before + 1) == before + 1
