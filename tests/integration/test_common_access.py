"""The access interceptor: each method's `(far.api.v1.access)` declaration enforced before the service runs.

A probe service with one method per kind of declaration runs through the same `start_server` every server
uses (so with the same interceptors, in the same order); the real gamed and auth servers show the
declarations of their contracts at work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from far.api.v1 import access_pb2
from far.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from far.gamed.v1 import game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf import field_mask_pb2, wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common.access import AccessDeclarationError
from servers.common.config import Settings
from servers.common.server import RunningServer, Runtime, ServiceSpec, start_server
from tests.conftest import wallet
from tests.integration.probe_contract import AUTHENTICATED, PUBLIC, Kind, declare_probe
from tests.integration.rich_errors import expect_error
from tests.integration.rpc_counts import handled, handled_soon

pytestmark = pytest.mark.integration

PROBE = "far.test.v1.AccessProbeService"
UNDECLARED_PROBE = "far.test.v1.UndeclaredProbeService"
STRAY = "far.test.v1.StrayService"
DOMAIN = "probe.far.network"
Access = access_pb2.Access
Text = wrappers_pb2.StringValue
Context = grpc.aio.ServicerContext[Any, Any]

DECLARED = {
    "Open": (Kind.UNARY, PUBLIC),
    "Mine": (Kind.UNARY, AUTHENTICATED),
    "Publish": (Kind.UNARY, Access(level=Access.LEVEL_ROLES, roles=["publisher"])),
    "Score": (Kind.UNARY, Access(level=Access.LEVEL_PARTNER, partners=["game-server"])),
    "ScoreOrAdmin": (Kind.UNARY, Access(level=Access.LEVEL_PARTNER, partners=["game-server"], roles=["admin"])),
    "Relay": (Kind.UNARY, Access(level=Access.LEVEL_INTERNAL)),
    "Follow": (Kind.SERVER_STREAM, AUTHENTICATED),
    "Upload": (Kind.CLIENT_STREAM, Access(level=Access.LEVEL_ROLES, roles=["publisher"])),
    "Chat": (Kind.BIDI, AUTHENTICATED),
}
declare_probe(PROBE, DECLARED)
declare_probe(UNDECLARED_PROBE, {"Open": (Kind.UNARY, PUBLIC), "Forgotten": (Kind.UNARY, None)})


class Probe:
    """Records each call that reached it, so a test can tell that a refused call never did."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def unary(self, request: Text, context: Context) -> Text:
        self.calls.append(request.value)
        return Text(value=request.value)

    async def server_stream(self, request: Text, context: Context) -> AsyncIterator[Text]:
        self.calls.append(request.value)
        yield Text(value=request.value)

    async def client_stream(self, requests: AsyncIterator[Text], context: Context) -> Text:
        values = [r.value async for r in requests]
        self.calls.extend(values)
        return Text(value="+".join(values))

    async def bidi(self, requests: AsyncIterator[Text], context: Context) -> AsyncIterator[Text]:
        async for request in requests:
            self.calls.append(request.value)
            yield request

    def handlers(self, service: str, methods: dict[str, tuple[Kind, Any]]) -> grpc.GenericRpcHandler:
        codec = {"request_deserializer": Text.FromString, "response_serializer": Text.SerializeToString}
        make = {
            Kind.UNARY: (grpc.unary_unary_rpc_method_handler, self.unary),
            Kind.SERVER_STREAM: (grpc.unary_stream_rpc_method_handler, self.server_stream),
            Kind.CLIENT_STREAM: (grpc.stream_unary_rpc_method_handler, self.client_stream),
            Kind.BIDI: (grpc.stream_stream_rpc_method_handler, self.bidi),
        }
        built: dict[str, grpc.RpcMethodHandler] = {}
        for name, (kind, _) in methods.items():
            factory, behavior = make[kind]
            built[name] = factory(behavior, **codec)  # type: ignore[operator]
        return grpc.method_handlers_generic_handler(service, built)


def probe_spec(probe: Probe, service: str = PROBE, methods: dict[str, tuple[Kind, Any]] | None = None) -> ServiceSpec:
    async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
        server.add_generic_rpc_handlers((probe.handlers(service, methods or DECLARED),))
        # A handler for a service the spec does not name: no declaration was read for it.
        server.add_generic_rpc_handlers((probe.handlers(STRAY, {"Open": (Kind.UNARY, None)}),))

    return ServiceSpec(
        name="probe", default_port=0, service_names=[service], setup=setup, uses_database=False, uses_redis=False
    )


def probe_settings(jwt_secret: str) -> Settings:
    environ = {
        "JWT_SECRET": jwt_secret,
        "GRPC_LISTEN": "127.0.0.1:0",
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    return Settings.from_env("probe", 0, environ=environ)


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe()


@pytest.fixture(scope="module")
async def probe_server(probe: Probe, jwt_secret: str) -> AsyncIterator[RunningServer]:
    running = await start_server(probe_spec(probe), probe_settings(jwt_secret))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def channel(probe_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_server.port}") as channel:
        yield channel


@pytest.fixture
def as_role(make_token: Callable[..., str]) -> Callable[..., tuple[tuple[str, str], ...]]:
    """`as_role(*roles)` -> call metadata with an access token holding those roles (none: anonymous)."""

    def metadata(*roles: str) -> tuple[tuple[str, str], ...]:
        if not roles:
            return ()
        return (("authorization", f"Bearer {make_token(wallet(42), roles)}"),)

    return metadata


def unary(channel: grpc.aio.Channel, method: str, service: str = PROBE) -> grpc.aio.UnaryUnaryMultiCallable[Text, Text]:
    return channel.unary_unary(
        f"/{service}/{method}", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
    )


async def refused(call: Any, code: grpc.StatusCode, reason: str | None = None) -> None:
    await expect_error(call, code, reason, domain=DOMAIN)


class TestPublic:
    async def test_anyone_may_call(self, channel: grpc.aio.Channel, as_role: Any) -> None:
        for roles in ((), ("user",), ("admin",)):
            assert (await unary(channel, "Open")(Text(value="open"), metadata=as_role(*roles))).value == "open"

    async def test_a_bad_token_is_still_refused(self, channel: grpc.aio.Channel) -> None:
        call = unary(channel, "Open")(Text(value="bad"), metadata=(("authorization", "Bearer nope"),))
        await refused(call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


class TestAuthenticated:
    async def test_anonymous_is_unauthenticated_before_the_service(
        self, channel: grpc.aio.Channel, probe: Probe
    ) -> None:
        before = handled(PROBE, "Mine", "UNAUTHENTICATED")
        await refused(unary(channel, "Mine")(Text(value="anon-mine")), grpc.StatusCode.UNAUTHENTICATED)
        assert "anon-mine" not in probe.calls
        assert await handled_soon(PROBE, "Mine", "UNAUTHENTICATED", before + 1) == before + 1

    async def test_any_account_passes(self, channel: grpc.aio.Channel, as_role: Any) -> None:
        assert (await unary(channel, "Mine")(Text(value="m"), metadata=as_role("user"))).value == "m"


class TestRoles:
    async def test_a_user_misses_the_role(self, channel: grpc.aio.Channel, as_role: Any, probe: Probe) -> None:
        call = unary(channel, "Publish")(Text(value="user-publish"), metadata=as_role("user", "organizer"))
        error = await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_ROLE", domain=DOMAIN)
        assert error.info.domain == DOMAIN
        assert "user-publish" not in probe.calls

    async def test_anonymous_is_unauthenticated(self, channel: grpc.aio.Channel) -> None:
        await refused(unary(channel, "Publish")(Text(value="x")), grpc.StatusCode.UNAUTHENTICATED)

    @pytest.mark.parametrize("roles", [("publisher",), ("user", "publisher"), ("admin",)])
    async def test_the_role_or_admin_passes(self, channel: grpc.aio.Channel, as_role: Any, roles: Any) -> None:
        assert (await unary(channel, "Publish")(Text(value="p"), metadata=as_role(*roles))).value == "p"


class TestPartnerAndInternal:
    @pytest.mark.parametrize("method", ["Score", "Relay"])
    @pytest.mark.parametrize("roles", [(), ("user",), ("admin", "operator")])
    async def test_refused_to_every_account_until_mtls(
        self, channel: grpc.aio.Channel, as_role: Any, probe: Probe, method: str, roles: Any
    ) -> None:
        marker = f"{method}-{'-'.join(roles)}"
        call = unary(channel, method)(Text(value=marker), metadata=as_role(*roles))
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY")
        assert marker not in probe.calls

    async def test_listed_roles_pass(self, channel: grpc.aio.Channel, as_role: Any) -> None:
        assert (await unary(channel, "ScoreOrAdmin")(Text(value="s"), metadata=as_role("admin"))).value == "s"
        call = unary(channel, "ScoreOrAdmin")(Text(value="s"), metadata=as_role("organizer"))
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "PARTNER_ONLY")


class TestStreams:
    async def test_server_stream_refused_before_any_message(self, channel: grpc.aio.Channel, probe: Probe) -> None:
        follow = channel.unary_stream(
            f"/{PROBE}/Follow", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )
        received: list[str] = []

        async def read() -> None:
            async for message in follow(Text(value="anon-follow")):
                received.append(message.value)

        await refused(read(), grpc.StatusCode.UNAUTHENTICATED)
        assert received == []
        assert "anon-follow" not in probe.calls

    async def test_client_stream_needs_the_role(self, channel: grpc.aio.Channel, as_role: Any) -> None:
        upload = channel.stream_unary(
            f"/{PROBE}/Upload", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )
        call = upload(iter([Text(value="a")]), metadata=as_role("user"))
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_ROLE")
        done = await upload(iter([Text(value="a"), Text(value="b")]), metadata=as_role("publisher"))
        assert done.value == "a+b"

    async def test_bidi_stream(self, channel: grpc.aio.Channel, as_role: Any) -> None:
        chat = channel.stream_stream(
            f"/{PROBE}/Chat", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )
        got = [m.value async for m in chat(iter([Text(value="hi")]), metadata=as_role("user"))]
        assert got == ["hi"]

        async def anonymous() -> None:
            async for _ in chat(iter([Text(value="anon")])):
                pass

        await refused(anonymous(), grpc.StatusCode.UNAUTHENTICATED)


class TestUndeclared:
    async def test_a_service_with_an_undeclared_method_does_not_start(self, jwt_secret: str) -> None:
        methods = {"Open": (Kind.UNARY, PUBLIC), "Forgotten": (Kind.UNARY, None)}
        spec = probe_spec(Probe(), UNDECLARED_PROBE, methods)
        expected = rf"{UNDECLARED_PROBE}\.Forgotten: no \(far\.api\.v1\.access\) option"
        with pytest.raises(AccessDeclarationError, match=expected):
            await start_server(spec, probe_settings(jwt_secret))

    async def test_a_method_outside_the_declared_services_is_refused(
        self, channel: grpc.aio.Channel, as_role: Any
    ) -> None:
        call = unary(channel, "Open", STRAY)(Text(value="stray"), metadata=as_role("admin"))
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "ACCESS_NOT_DECLARED")

    async def test_an_unknown_method_is_still_unimplemented(self, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary(channel, "NoSuchMethod")(Text())
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED

    async def test_health_passes(self, channel: grpc.aio.Channel) -> None:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=PROBE))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


class TestGamedDeclarations:
    async def test_reads_are_public(self, gamed: gamed_service_pb2_grpc.GamedServiceStub) -> None:
        response = await gamed.ListGames(gamed_service_pb2.ListGamesRequest(page_size=1))
        assert response is not None

    async def test_create_game_needs_the_publisher_role(
        self, gamed: gamed_service_pb2_grpc.GamedServiceStub, auth: Any
    ) -> None:
        request = gamed_service_pb2.CreateGameRequest(game_id="access-probe", game=game_pb2.Game(display_name="X"))
        call = gamed.CreateGame(request, metadata=auth(wallet(43), "user"))
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_ROLE")

    async def test_writes_need_a_signed_in_account(self, gamed: gamed_service_pb2_grpc.GamedServiceStub) -> None:
        request = gamed_service_pb2.UpdateGameRequest(
            game=game_pb2.Game(name="games/no-such-game", display_name="Y"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
        # Anonymous is refused by the declaration before the service could answer NOT_FOUND.
        await expect_error(gamed.UpdateGame(request), grpc.StatusCode.UNAUTHENTICATED)


class TestAuthDeclarations:
    async def test_admin_methods_need_the_admin_role(
        self, auth_api: auth_service_pb2_grpc.AuthServiceStub, auth: Any
    ) -> None:
        call = auth_api.ListAccounts(auth_service_pb2.ListAccountsRequest(), metadata=auth(wallet(44), "publisher"))
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_ROLE", domain="auth.far.network")

    async def test_own_data_needs_a_signed_in_account(self, auth_api: auth_service_pb2_grpc.AuthServiceStub) -> None:
        call = auth_api.ListSessions(auth_service_pb2.ListSessionsRequest(parent="accounts/me"))
        await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, domain="auth.far.network")
