"""The common interceptors and start_server, on a tiny probe service and on the in-process gamed server.

The probe service is registered through the same `start_server` every server uses (so with the same
interceptors, health and reflection), but needs neither PostgreSQL nor Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from servers.common.config import ConfigError, Settings
from servers.common.context import current_principal, current_request_id
from servers.common.errors import FailedPrecondition, NotFound
from servers.common.server import RunningServer, Runtime, ServiceSpec, start_server
from tests.conftest import wallet
from tests.integration.probe_contract import PUBLIC, Kind, declare_probe
from tests.integration.rpc_counts import handled, handled_soon

pytestmark = pytest.mark.integration

PROBE = "far.test.v1.ProbeService"
DOMAIN = "probe.far.network"
SECRET_DETAIL = "password=hunter2 at db.internal"
Text = wrappers_pb2.StringValue
Context = grpc.aio.ServicerContext[Any, Any]


class ProbeServicer:
    """Unary, streaming and failing methods; `calls` records which handlers actually ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Whoami(self, request: Text, context: Context) -> Text:
        self.calls.append(request.value)
        return Text(value=f"{current_principal().subject}|{','.join(sorted(current_principal().roles))}")

    async def RequestId(self, request: Text, context: Context) -> Text:
        return Text(value=current_request_id())

    async def Boom(self, request: Text, context: Context) -> Text:
        self.calls.append(request.value)
        raise RuntimeError(SECRET_DETAIL)

    async def Missing(self, request: Text, context: Context) -> Text:
        raise NotFound("no such thing", reason="THING_NOT_FOUND", metadata={"name": request.value})

    async def Deny(self, request: Text, context: Context) -> Text:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handled by the servicer")
        raise AssertionError("abort returns only by raising")

    async def Count(self, request: Text, context: Context) -> AsyncIterator[Text]:
        self.calls.append(request.value)
        for i in range(3):
            yield Text(value=f"{request.value}-{i}")

    async def CountThenFail(self, request: Text, context: Context) -> AsyncIterator[Text]:
        for i in range(2):
            yield Text(value=f"{request.value}-{i}")
        raise FailedPrecondition("the channel was deleted", reason="CHANNEL_DELETED")

    async def CountThenBoom(self, request: Text, context: Context) -> AsyncIterator[Text]:
        yield Text(value="first")
        raise RuntimeError(SECRET_DETAIL)

    async def Join(self, requests: AsyncIterator[Text], context: Context) -> Text:
        return Text(value="+".join([r.value async for r in requests]))

    async def Upper(self, requests: AsyncIterator[Text], context: Context) -> AsyncIterator[Text]:
        async for request in requests:
            yield Text(value=request.value.upper())


UNARY = ("Whoami", "RequestId", "Boom", "Missing", "Deny")
SERVER_STREAM = ("Count", "CountThenFail", "CountThenBoom")
declare_probe(
    PROBE,
    {
        **{name: (Kind.UNARY, PUBLIC) for name in UNARY},
        **{name: (Kind.SERVER_STREAM, PUBLIC) for name in SERVER_STREAM},
        "Join": (Kind.CLIENT_STREAM, PUBLIC),
        "Upper": (Kind.BIDI, PUBLIC),
    },
)


def handlers(servicer: ProbeServicer) -> grpc.GenericRpcHandler:
    codec = {"request_deserializer": Text.FromString, "response_serializer": Text.SerializeToString}
    methods: dict[str, grpc.RpcMethodHandler] = {}
    for name in UNARY:
        methods[name] = grpc.unary_unary_rpc_method_handler(getattr(servicer, name), **codec)
    for name in SERVER_STREAM:
        methods[name] = grpc.unary_stream_rpc_method_handler(getattr(servicer, name), **codec)
    methods["Join"] = grpc.stream_unary_rpc_method_handler(servicer.Join, **codec)
    methods["Upper"] = grpc.stream_stream_rpc_method_handler(servicer.Upper, **codec)
    return grpc.method_handlers_generic_handler(PROBE, methods)


def probe_settings(jwt_secret: str, listen: str = "127.0.0.1:0") -> Settings:
    environ = {
        "JWT_SECRET": jwt_secret,
        "GRPC_LISTEN": listen,
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    return Settings.from_env("probe", 0, environ=environ)


def probe_spec(servicer: ProbeServicer, closed: list[str] | None = None) -> ServiceSpec:
    async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
        server.add_generic_rpc_handlers((handlers(servicer),))
        if closed is not None:

            async def close() -> None:
                closed.append("probe")

            runtime.on_close(close)

    return ServiceSpec(
        name="probe", default_port=0, service_names=[PROBE], setup=setup, uses_database=False, uses_redis=False
    )


@pytest.fixture(scope="module")
def servicer() -> ProbeServicer:
    return ProbeServicer()


@pytest.fixture(scope="module")
async def probe_server(servicer: ProbeServicer, jwt_secret: str) -> AsyncIterator[RunningServer]:
    running = await start_server(probe_spec(servicer), probe_settings(jwt_secret))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def channel(probe_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_server.port}") as channel:
        yield channel


@pytest.fixture
def unary(channel: grpc.aio.Channel) -> Callable[[str], grpc.aio.UnaryUnaryMultiCallable[Text, Text]]:
    def make(method: str) -> grpc.aio.UnaryUnaryMultiCallable[Text, Text]:
        return channel.unary_unary(
            f"/{PROBE}/{method}", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )

    return make


@pytest.fixture
def server_stream(channel: grpc.aio.Channel) -> Callable[[str], grpc.aio.UnaryStreamMultiCallable[Text, Text]]:
    def make(method: str) -> grpc.aio.UnaryStreamMultiCallable[Text, Text]:
        return channel.unary_stream(
            f"/{PROBE}/{method}", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )

    return make


async def collect(call: AsyncIterator[Text], received: list[str]) -> None:
    """Append each streamed message to `received`, so a test sees what came before an error."""
    async for message in call:
        received.append(message.value)


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[Any]]:
    """ErrorInfo (which must come first) and the raw details of an RPC error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    assert status.code == error.code().value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info, list(status.details)


class TestAuth:
    async def test_no_token_is_anonymous(self, unary: Any) -> None:
        assert (await unary("Whoami")(Text(value="anon"))).value == "|"

    async def test_valid_token_sets_the_principal(self, unary: Any, make_token: Any) -> None:
        metadata = (("authorization", f"Bearer {make_token(wallet(7), ('publisher', 'user'))}"),)
        response = await unary("Whoami")(Text(value="signed-in"), metadata=metadata)
        assert response.value == f"{wallet(7)}|publisher,user"

    async def test_scheme_is_case_insensitive(self, unary: Any, make_token: Any) -> None:
        metadata = (("authorization", f"bearer {make_token(wallet(8))}"),)
        assert (await unary("Whoami")(Text(value="lower"), metadata=metadata)).value == f"{wallet(8)}|user"

    @pytest.mark.parametrize(
        ("header", "reason"),
        [
            ("Basic dXNlcjpwYXNz", "TOKEN_INVALID"),
            ("Bearer", "TOKEN_INVALID"),
            ("Bearer ", "TOKEN_INVALID"),
            ("Bearer not-a-jwt", "TOKEN_INVALID"),
            ("token-without-scheme", "TOKEN_INVALID"),
        ],
    )
    async def test_malformed_header_is_rejected_before_the_servicer(
        self, unary: Any, servicer: ProbeServicer, header: str, reason: str
    ) -> None:
        marker = f"must-not-run:{header}"
        before = handled(PROBE, "Whoami", "UNAUTHENTICATED")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Whoami")(Text(value=marker), metadata=(("authorization", header),))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info, _ = details(error.value)
        assert (info.reason, info.domain) == (reason, DOMAIN)
        assert marker not in servicer.calls
        assert await handled_soon(PROBE, "Whoami", "UNAUTHENTICATED", before + 1) == before + 1

    async def test_expired_token(self, unary: Any, servicer: ProbeServicer, make_token: Any) -> None:
        metadata = (("authorization", f"Bearer {make_token(wallet(9), ttl_s=-60)}"),)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Whoami")(Text(value="expired"), metadata=metadata)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(error.value)[0].reason == "TOKEN_EXPIRED"
        assert "expired" not in servicer.calls

    async def test_token_signed_with_another_secret(self, unary: Any) -> None:
        from servers.common.auth import JwtKeys, TokenIssuer

        forged = TokenIssuer(JwtKeys(current_kid="k1", secrets={"k1": "x" * 40})).issue(wallet(1), ["admin"])
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Whoami")(Text(value="forged"), metadata=(("authorization", f"Bearer {forged}"),))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(error.value)[0].reason == "TOKEN_INVALID"

    async def test_bad_token_on_a_stream_yields_nothing(self, server_stream: Any, servicer: ProbeServicer) -> None:
        call = server_stream("Count")(Text(value="stream-bad-token"), metadata=(("authorization", "Bearer x"),))
        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(call, received)
        assert received == []
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(error.value)[0].reason == "TOKEN_INVALID"
        assert "stream-bad-token" not in servicer.calls


class TestErrors:
    async def test_unexpected_exception_is_internal_with_only_the_request_id(self, unary: Any) -> None:
        before = handled(PROBE, "Boom", "INTERNAL")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Boom")(Text(value="boom"), metadata=(("x-request-id", "req-boom-1"),))
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert error.value.details() == "internal error (request id req-boom-1)"
        info, all_details = details(error.value)
        assert (info.reason, info.domain, dict(info.metadata)) == ("INTERNAL", DOMAIN, {"request_id": "req-boom-1"})
        assert len(all_details) == 1
        assert "hunter2" not in str(error.value)
        assert "RuntimeError" not in str(error.value)
        assert await handled_soon(PROBE, "Boom", "INTERNAL", before + 1) == before + 1

    async def test_a_request_id_is_made_when_none_is_sent(self, unary: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Boom")(Text(value="boom"))
        match = re.fullmatch(r"internal error \(request id ([0-9a-f]{32})\)", error.value.details() or "")
        assert match is not None
        assert dict(details(error.value)[0].metadata) == {"request_id": match.group(1)}

    async def test_domain_error_maps_to_its_code_and_details(self, unary: Any) -> None:
        before = handled(PROBE, "Missing", "NOT_FOUND")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Missing")(Text(value="things/x"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert error.value.details() == "no such thing"
        info, _ = details(error.value)
        assert (info.reason, info.domain, dict(info.metadata)) == ("THING_NOT_FOUND", DOMAIN, {"name": "things/x"})
        assert await handled_soon(PROBE, "Missing", "NOT_FOUND", before + 1) == before + 1

    async def test_an_abort_by_the_servicer_passes_through(self, unary: Any) -> None:
        before = handled(PROBE, "Deny", "PERMISSION_DENIED")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await unary("Deny")(Text())
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.value.details() == "handled by the servicer"
        assert await handled_soon(PROBE, "Deny", "PERMISSION_DENIED", before + 1) == before + 1


MALFORMED = b"\x0a\xff"  # field 1, length 255, then nothing: not a protobuf message


class TestUndecodableRequests:
    """A request that is not valid protobuf is INVALID_ARGUMENT with ErrorInfo, whatever the method's kind
    (Envoy's transcoder sends one for a JSON object where a map<string, string> wants a string)."""

    def expect_malformed(self, error: grpc.aio.AioRpcError) -> None:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        info, _ = details(error)
        assert (info.reason, info.domain) == ("MALFORMED_REQUEST", DOMAIN)

    async def test_unary(self, channel: grpc.aio.Channel) -> None:
        before = handled(PROBE, "Whoami", "INVALID_ARGUMENT")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(f"/{PROBE}/Whoami")(MALFORMED)
        self.expect_malformed(error.value)
        assert await handled_soon(PROBE, "Whoami", "INVALID_ARGUMENT", before + 1) == before + 1

    async def test_server_stream(self, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            [m async for m in channel.unary_stream(f"/{PROBE}/Count")(MALFORMED)]
        self.expect_malformed(error.value)

    async def test_client_stream_after_good_messages(self, channel: grpc.aio.Channel) -> None:
        good = Text(value="a").SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.stream_unary(f"/{PROBE}/Join")(iter([good, MALFORMED]))
        self.expect_malformed(error.value)

    async def test_bidi_stream_after_good_messages(self, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(f"/{PROBE}/Upper", response_deserializer=Text.FromString)(
            iter([Text(value="ok").SerializeToString(), MALFORMED])
        )
        assert (await call.read()).value == "OK"  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        self.expect_malformed(error.value)

    async def test_good_requests_still_decode(self, unary: Any) -> None:
        assert (await unary("Whoami")(Text(value="x"))).value


class TestRequestId:
    async def test_the_callers_request_id_is_used(self, unary: Any) -> None:
        response = await unary("RequestId")(Text(), metadata=(("x-request-id", "envoy-abc-123"),))
        assert response.value == "envoy-abc-123"

    async def test_each_call_gets_its_own_id(self, unary: Any) -> None:
        first = (await unary("RequestId")(Text())).value
        second = (await unary("RequestId")(Text())).value
        assert re.fullmatch(r"[0-9a-f]{32}", first)
        assert first != second


class TestMetrics:
    async def test_ok_calls_are_counted(self, unary: Any) -> None:
        before = handled(PROBE, "Whoami", "OK")
        await unary("Whoami")(Text(value="count-me"))
        await unary("Whoami")(Text(value="count-me-too"))
        assert handled(PROBE, "Whoami", "OK") == before + 2
        latency = REGISTRY.get_sample_value(
            "grpc_server_handling_seconds_count", {"grpc_service": PROBE, "grpc_method": "Whoami"}
        )
        assert latency is not None
        assert latency >= 2


class TestStreaming:
    async def test_server_stream_yields_every_message(self, server_stream: Any) -> None:
        before = handled(PROBE, "Count", "OK")
        received = [m.value async for m in server_stream("Count")(Text(value="n"))]
        assert received == ["n-0", "n-1", "n-2"]
        assert handled(PROBE, "Count", "OK") == before + 1

    async def test_domain_error_mid_stream_after_the_first_messages(self, server_stream: Any) -> None:
        before = handled(PROBE, "CountThenFail", "FAILED_PRECONDITION")
        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(server_stream("CountThenFail")(Text(value="m")), received)
        assert received == ["m-0", "m-1"]
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details() == "the channel was deleted"
        info, _ = details(error.value)
        assert (info.reason, info.domain) == ("CHANNEL_DELETED", DOMAIN)
        assert await handled_soon(PROBE, "CountThenFail", "FAILED_PRECONDITION", before + 1) == before + 1

    async def test_unexpected_error_mid_stream_is_internal(self, server_stream: Any) -> None:
        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(server_stream("CountThenBoom")(Text(), metadata=(("x-request-id", "req-s1"),)), received)
        assert received == ["first"]
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert error.value.details() == "internal error (request id req-s1)"
        assert dict(details(error.value)[0].metadata) == {"request_id": "req-s1"}

    async def test_client_stream(self, channel: grpc.aio.Channel) -> None:
        join = channel.stream_unary(
            f"/{PROBE}/Join", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )
        response = await join(iter([Text(value="a"), Text(value="b"), Text(value="c")]))
        assert response.value == "a+b+c"

    async def test_bidi_stream(self, channel: grpc.aio.Channel) -> None:
        upper = channel.stream_stream(
            f"/{PROBE}/Upper", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )
        received = [m.value async for m in upper(iter([Text(value="x"), Text(value="y")]))]
        assert received == ["X", "Y"]


class TestHealthAndReflection:
    async def test_probe_health(self, channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", PROBE):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    async def test_health_checks_are_not_counted(self, channel: grpc.aio.Channel) -> None:
        labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_code": "OK"}
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) is None

    async def test_gamed_is_serving(self, gamed_channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(gamed_channel)
        for service in ("", "far.gamed.v1.GamedService"):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    async def test_gamed_reflection_lists_its_service(self, gamed_channel: grpc.aio.Channel) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(gamed_channel)
        names: set[str] = set()
        async for response in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names.update(s.name for s in response.list_services_response.service)
        assert {"far.gamed.v1.GamedService", "grpc.health.v1.Health"} <= names

    async def test_gamed_reflection_describes_the_service(self, gamed_channel: grpc.aio.Channel) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(gamed_channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="far.gamed.v1.GamedService")
        [response] = [r async for r in stub.ServerReflectionInfo(iter([request]))]
        assert response.file_descriptor_response.file_descriptor_proto
        assert response.error_response.error_code == code_pb2.OK

    async def test_gamed_rejects_a_bad_token_with_error_info(self, gamed: Any) -> None:
        from far.gamed.v1 import gamed_service_pb2

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await gamed.GetGame(
                gamed_service_pb2.GetGameRequest(name="games/x"), metadata=(("authorization", "Bearer nope"),)
            )
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info, _ = details(error.value)
        assert (info.reason, info.domain) == ("TOKEN_INVALID", "gamed.far.network")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


class TestStartServer:
    async def test_an_address_in_use_is_a_config_error_and_closes_the_runtime(
        self, jwt_secret: str, busy_port: int
    ) -> None:
        closed: list[str] = []
        with pytest.raises(ConfigError, match=rf"^GRPC_LISTEN=127\.0\.0\.1:{busy_port}: the address cannot be bound$"):
            await start_server(
                probe_spec(ProbeServicer(), closed), probe_settings(jwt_secret, f"127.0.0.1:{busy_port}")
            )
        assert closed == ["probe"]

    async def test_stop_closes_the_runtime_and_the_port(self, jwt_secret: str) -> None:
        closed: list[str] = []
        running = await start_server(probe_spec(ProbeServicer(), closed), probe_settings(jwt_secret))
        address = f"127.0.0.1:{running.port}"
        await running.stop()
        assert closed == ["probe"]
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_metrics_endpoint(self, jwt_secret: str) -> None:
        settings = dataclasses.replace(probe_settings(jwt_secret), metrics_listen="127.0.0.1:0")
        running = await start_server(probe_spec(ProbeServicer()), settings)
        try:
            assert running.metrics_port
            url = f"http://127.0.0.1:{running.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            await running.stop()
        assert "# TYPE grpc_server_handled_total counter" in body
        assert "# TYPE grpc_server_handling_seconds histogram" in body


class TestRuntimeClose:
    async def test_closers_run_last_first_and_errors_do_not_stop_the_rest(self, jwt_secret: str) -> None:
        from servers.common.pagination import PageTokens

        settings = probe_settings(jwt_secret)
        runtime = Runtime(settings=settings, page_tokens=PageTokens(settings.page_token_secret))
        order: list[str] = []

        async def first() -> None:
            order.append("first")

        async def broken() -> None:
            order.append("broken")
            raise OSError("already closed")

        async def last() -> None:
            order.append("last")

        for closer in (first, broken, last):
            runtime.on_close(closer)
        await runtime.close()
        assert order == ["last", "broken", "first"]
