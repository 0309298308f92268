"""mTLS in the common server: TLS-only binding, and who a peer certificate (and what the edge forwards) says is calling.

A probe service runs through the same `start_server` every server uses, with GRPC_TLS_* pointing at a PKI made
for the test; its `WhoAmI` echoes the principal the interceptors settled on. The mapping itself (SPIFFE ids,
the forwarded-certificate header) is checked first as plain functions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from far.api.v1 import access_pb2
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.pki import DevPki
from servers.common.auth import Principal
from servers.common.config import Settings
from servers.common.context import current_principal
from servers.common.errors import Unauthenticated
from servers.common.server import RunningServer, Runtime, ServiceSpec, start_server
from servers.common.tls import Peer, PeerKind, ServerTls, TlsFilesError, peer_of, peer_spiffe_id, xfcc_partner
from tests.conftest import wallet
from tests.integration.probe_contract import PUBLIC, Kind, declare_probe
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration

PROBE = "far.test.v1.IdentityProbeService"
DOMAIN = "probe.far.network"
GAME_SERVER = "spiffe://far.network/partner/game-server"
Access = access_pb2.Access
Text = wrappers_pb2.StringValue
Metadata = tuple[tuple[str, str], ...]

declare_probe(
    PROBE,
    {
        "WhoAmI": (Kind.UNARY, PUBLIC),
        "Score": (Kind.UNARY, Access(level=Access.LEVEL_PARTNER, partners=["game-server"])),
        "Relay": (Kind.UNARY, Access(level=Access.LEVEL_INTERNAL, services=["inference"])),
    },
)


class TestSpiffeMapping:
    def test_edge(self) -> None:
        assert peer_of("spiffe://far.network/edge/envoy") == Peer(PeerKind.EDGE, "spiffe://far.network/edge/envoy")

    def test_service(self) -> None:
        peer = peer_of("spiffe://far.network/service/inference")
        assert peer == Peer(PeerKind.SERVICE, "spiffe://far.network/service/inference", "inference")

    @pytest.mark.parametrize(
        "spiffe_id",
        [
            "",
            GAME_SERVER,
            "spiffe://far.network/edge/other",
            "spiffe://evil.example/service/gamed",
            "spiffe://far.network/service/",
            "spiffe://far.network/service/Gamed",
            "spiffe://far.network/service/gamed/extra",
            "spiffe://far.network.evil/service/gamed",
        ],
    )
    def test_anything_else_is_not_allowed(self, spiffe_id: str) -> None:
        with pytest.raises(Unauthenticated) as raised:
            peer_of(spiffe_id)
        assert raised.value.reason == "PEER_NOT_ALLOWED"

    def test_peer_spiffe_id_from_the_auth_context(self) -> None:
        assert (
            peer_spiffe_id({"peer_spiffe_id": [b"spiffe://far.network/edge/envoy"]})
            == "spiffe://far.network/edge/envoy"
        )
        assert peer_spiffe_id({"x509_common_name": [b"envoy"]}) == ""


class TestForwardedClientCert:
    def test_absent(self) -> None:
        assert xfcc_partner(None) is None

    @pytest.mark.parametrize(
        "header",
        [
            f"By=spiffe://far.network/edge/envoy;Hash=ab12;URI={GAME_SERVER}",
            f'URI="{GAME_SERVER}"',
            f" URI = {GAME_SERVER} ;Hash=ab12",
        ],
    )
    def test_the_partner_in_envoys_header(self, header: str) -> None:
        assert xfcc_partner(header) == Principal(subject=GAME_SERVER, partner="game-server")

    @pytest.mark.parametrize(
        "header",
        [
            "",
            "Hash=ab12",
            "URI=spiffe://far.network/service/gamed",
            "URI=spiffe://evil.example/partner/game-server",
            f"URI={GAME_SERVER},URI=spiffe://far.network/partner/node-agent",
            f'URI="{GAME_SERVER},x"',
        ],
    )
    def test_anything_else_is_refused(self, header: str) -> None:
        with pytest.raises(Unauthenticated) as raised:
            xfcc_partner(header)
        assert raised.value.reason == "PEER_NOT_ALLOWED"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki.ensure(tmp_path_factory.mktemp("pki"), services=["probe", "inference"], partners=["game-server"])


class TestServerTlsFiles:
    def test_load(self, pki: DevPki) -> None:
        files = pki.service("probe")
        tls = ServerTls.load(files.cert, files.key, pki.ca_file)
        assert tls.cert_chain == files.cert.read_bytes()
        assert isinstance(tls.server_credentials(), grpc.ServerCredentials)

    def test_wrong_key(self, pki: DevPki) -> None:
        with pytest.raises(TlsFilesError, match="is not the key of the certificate"):
            ServerTls.load(pki.service("probe").cert, pki.service("inference").key, pki.ca_file)

    def test_ca_not_pem(self, pki: DevPki, tmp_path: Path) -> None:
        bogus = tmp_path / "ca.pem"
        bogus.write_text("not a certificate")
        with pytest.raises(TlsFilesError, match="no PEM CA certificate"):
            ServerTls.load(pki.service("probe").cert, pki.service("probe").key, bogus)


def describe(principal: Principal) -> str:
    return f"partner={principal.partner};service={principal.service};subject={principal.subject}"


async def who_am_i(request: Text, context: grpc.aio.ServicerContext[Any, Any]) -> Text:
    return Text(value=describe(current_principal()))


class NodeTokens:
    """A service's own partner credential, as gpu's node agent tokens are: `node_<id>` names one node."""

    def accepts(self, token: str) -> bool:
        return token.startswith("node_")

    async def authenticate(self, token: str) -> Principal:
        return Principal(subject=f"nodes/{token.removeprefix('node_')}", partner="node-agent")


def probe_spec() -> ServiceSpec:
    async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
        runtime.authenticators.append(NodeTokens())
        handler = grpc.unary_unary_rpc_method_handler(
            who_am_i, request_deserializer=Text.FromString, response_serializer=Text.SerializeToString
        )
        handlers = dict.fromkeys(("WhoAmI", "Score", "Relay"), handler)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, handlers),))

    return ServiceSpec(
        name="probe", default_port=0, service_names=[PROBE], setup=setup, uses_database=False, uses_redis=False
    )


def probe_settings(jwt_secret: str, tls: dict[str, str]) -> Settings:
    environ = {
        "JWT_SECRET": jwt_secret,
        "GRPC_LISTEN": "127.0.0.1:0",
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "1",
        **tls,
    }
    return Settings.from_env("probe", 0, environ=environ)


@pytest.fixture(scope="module")
async def mtls_server(pki: DevPki, jwt_secret: str) -> AsyncIterator[RunningServer]:
    files = pki.service("probe")
    tls = {
        "GRPC_TLS_CERT_FILE": str(files.cert),
        "GRPC_TLS_KEY_FILE": str(files.key),
        "GRPC_TLS_CLIENT_CA_FILE": str(pki.ca_file),
    }
    running = await start_server(probe_spec(), probe_settings(jwt_secret, tls))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def plaintext_server(jwt_secret: str) -> AsyncIterator[RunningServer]:
    running = await start_server(probe_spec(), probe_settings(jwt_secret, {}))
    try:
        yield running
    finally:
        await running.stop()


Call = Callable[..., Any]


@pytest.fixture
def call_as(pki: DevPki, mtls_server: RunningServer) -> Callable[[str, str], Call]:
    """`call_as(kind, name)(method, metadata=())`: a call to the mTLS probe presenting `<kind>/<name>`."""

    def as_identity(kind: str, name: str) -> Call:
        cert, key = pki.ensure_identity(kind, name).read()
        creds = grpc.ssl_channel_credentials(pki.ca_file.read_bytes(), key, cert)

        async def call(method: str, metadata: Metadata = ()) -> str:
            async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_server.port}", creds) as channel:
                stub = channel.unary_unary(
                    f"/{PROBE}/{method}",
                    request_serializer=Text.SerializeToString,
                    response_deserializer=Text.FromString,
                )
                reply: Text = await stub(Text(), metadata=metadata, timeout=5)
                return str(reply.value)

        return call

    return as_identity


def bearer(make_token: Callable[..., str], *roles: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {make_token(wallet(7), roles or ('user',))}")


def forwarded(uri: str = GAME_SERVER) -> tuple[str, str]:
    return ("x-forwarded-client-cert", f"By=spiffe://far.network/edge/envoy;Hash=00;URI={uri}")


class TestMtlsServer:
    async def test_plaintext_client_is_refused(self, mtls_server: RunningServer) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mtls_server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_client_without_certificate_is_refused(self, pki: DevPki, mtls_server: RunningServer) -> None:
        creds = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_server.port}", creds) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_a_service_is_the_service(self, call_as: Callable[[str, str], Call]) -> None:
        inference = call_as("service", "inference")
        assert await inference("WhoAmI") == "partner=;service=inference;subject=spiffe://far.network/service/inference"
        assert await inference("Relay") == "partner=;service=inference;subject=spiffe://far.network/service/inference"

    async def test_a_service_not_listed_for_an_internal_method(self, call_as: Callable[[str, str], Call]) -> None:
        await expect_error(
            call_as("service", "gaming")("Relay"), grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY", domain=DOMAIN
        )

    async def test_a_service_passing_a_token_acts_for_the_account(
        self, call_as: Callable[[str, str], Call], make_token: Callable[..., str]
    ) -> None:
        reply = await call_as("service", "inference")("WhoAmI", (bearer(make_token),))
        assert reply == f"partner=;service=;subject={wallet(7)}"

    async def test_a_forwarded_certificate_from_a_service_counts_for_nothing(
        self, call_as: Callable[[str, str], Call]
    ) -> None:
        inference = call_as("service", "inference")
        assert (await inference("WhoAmI", (forwarded(),))).startswith("partner=;service=inference;")
        await expect_error(
            inference("Score", (forwarded(),)), grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY", domain=DOMAIN
        )

    async def test_the_edge_forwards_the_partner(self, call_as: Callable[[str, str], Call]) -> None:
        edge = call_as("edge", "envoy")
        assert await edge("Score", (forwarded(),)) == f"partner=game-server;service=;subject={GAME_SERVER}"

    async def test_a_partner_credential_of_the_same_kind_names_the_partner_more_precisely(
        self, call_as: Callable[[str, str], Call], make_token: Callable[..., str]
    ) -> None:
        edge = call_as("edge", "envoy")
        node_agent = forwarded("spiffe://far.network/partner/node-agent")
        token = ("authorization", "Bearer node_n1")
        assert await edge("WhoAmI", (node_agent, token)) == "partner=node-agent;service=;subject=nodes/n1"
        await expect_error(
            edge("WhoAmI", (forwarded(), token)), grpc.StatusCode.UNAUTHENTICATED, "PEER_NOT_ALLOWED", domain=DOMAIN
        )
        # A partner relaying an account's token acts for the account and stays the partner: its own methods
        # (Score) still admit it, and the account is who the service sees.
        reply = await edge("Score", (forwarded(), bearer(make_token)))
        assert reply == f"partner=game-server;service=;subject={wallet(7)}"
        await expect_error(
            edge("Score", (forwarded(), ("authorization", "Bearer not-a-jwt"))),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
            domain=DOMAIN,
        )

    async def test_the_edge_forwarding_a_non_partner_is_refused(self, call_as: Callable[[str, str], Call]) -> None:
        edge = call_as("edge", "envoy")
        await expect_error(
            edge("WhoAmI", (forwarded("spiffe://far.network/service/gamed"),)),
            grpc.StatusCode.UNAUTHENTICATED,
            "PEER_NOT_ALLOWED",
            domain=DOMAIN,
        )

    async def test_the_edge_forwards_accounts_and_anonymous_callers(
        self, call_as: Callable[[str, str], Call], make_token: Callable[..., str]
    ) -> None:
        edge = call_as("edge", "envoy")
        assert await edge("WhoAmI", (bearer(make_token),)) == f"partner=;service=;subject={wallet(7)}"
        assert await edge("WhoAmI") == "partner=;service=;subject="
        await expect_error(
            edge("Score", (bearer(make_token),)), grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY", domain=DOMAIN
        )

    @pytest.mark.parametrize(("kind", "name"), [("partner", "game-server"), ("robot", "x")])
    async def test_other_identities_are_unauthenticated_health_included(
        self, call_as: Callable[[str, str], Call], pki: DevPki, mtls_server: RunningServer, kind: str, name: str
    ) -> None:
        await expect_error(
            call_as(kind, name)("WhoAmI"), grpc.StatusCode.UNAUTHENTICATED, "PEER_NOT_ALLOWED", domain=DOMAIN
        )
        cert, key = pki.ensure_identity(kind, name).read()
        creds = grpc.ssl_channel_credentials(pki.ca_file.read_bytes(), key, cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_server.port}", creds) as channel:
            await expect_error(
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5),
                grpc.StatusCode.UNAUTHENTICATED,
                "PEER_NOT_ALLOWED",
                domain=DOMAIN,
            )

    async def test_certificate_from_another_ca_fails_the_handshake(
        self, pki: DevPki, mtls_server: RunningServer, tmp_path: Path
    ) -> None:
        other = DevPki.ensure(tmp_path / "other", services=["inference"])
        cert, key = other.service("inference").read()
        creds = grpc.ssl_channel_credentials(pki.ca_file.read_bytes(), key, cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_server.port}", creds) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


class TestPlaintextServer:
    async def test_a_forwarded_certificate_is_ignored(self, plaintext_server: RunningServer) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plaintext_server.port}") as channel:
            stub = channel.unary_unary(
                f"/{PROBE}/WhoAmI", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
            )
            reply = await stub(Text(), metadata=(forwarded(),), timeout=5)
            assert reply.value == "partner=;service=;subject="
            score = channel.unary_unary(
                f"/{PROBE}/Score", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
            )
            await expect_error(
                score(Text(), metadata=(forwarded(),), timeout=5),
                grpc.StatusCode.PERMISSION_DENIED,
                "PARTNER_ONLY",
                domain=DOMAIN,
            )
