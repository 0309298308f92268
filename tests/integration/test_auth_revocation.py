"""The revocation list in the common auth interceptor: a revoked access token is refused by every server.

A probe service started through the same `start_server` every server uses (so with the same
interceptors), this time with Redis, shows what any FAR service does with a revoked token.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from redis.asyncio import Redis

from servers.common.auth import RevocationList, TokenVerifier
from servers.common.config import Settings
from servers.common.context import current_principal
from servers.common.server import RunningServer, Runtime, ServiceSpec, start_server
from tests.conftest import wallet
from tests.integration.probe_contract import PUBLIC, Kind, declare_probe
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration

PROBE = "far.test.v1.RevocationProbeService"
DOMAIN = "probe.far.network"
Text = wrappers_pb2.StringValue
Context = grpc.aio.ServicerContext[Any, Any]
declare_probe(PROBE, {"Whoami": (Kind.UNARY, PUBLIC), "Count": (Kind.SERVER_STREAM, PUBLIC)})


class Probe:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Whoami(self, request: Text, context: Context) -> Text:
        self.calls.append(request.value)
        return Text(value=current_principal().subject)

    async def Count(self, request: Text, context: Context) -> AsyncIterator[Text]:
        self.calls.append(request.value)
        for i in range(2):
            yield Text(value=str(i))


def probe_spec(probe: Probe, *, uses_redis: bool) -> ServiceSpec:
    codec = {"request_deserializer": Text.FromString, "response_serializer": Text.SerializeToString}

    async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
        methods = {
            "Whoami": grpc.unary_unary_rpc_method_handler(probe.Whoami, **codec),
            "Count": grpc.unary_stream_rpc_method_handler(probe.Count, **codec),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, methods),))

    return ServiceSpec(
        name="probe", default_port=0, service_names=[PROBE], setup=setup, uses_database=False, uses_redis=uses_redis
    )


def probe_settings(jwt_secret: str, redis_url: str, redis_key_prefix: str) -> Settings:
    environ = {
        "JWT_SECRET": jwt_secret,
        "GRPC_LISTEN": "127.0.0.1:0",
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": redis_key_prefix,
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    return Settings.from_env("probe", 0, environ=environ)


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe()


@pytest.fixture(scope="module")
async def probe_server(
    probe: Probe, jwt_secret: str, redis_url: str, redis_key_prefix: str
) -> AsyncIterator[RunningServer]:
    running = await start_server(
        probe_spec(probe, uses_redis=True), probe_settings(jwt_secret, redis_url, redis_key_prefix)
    )
    try:
        yield running
    finally:
        await running.stop()


async def call(port: int, token: str | None, value: str, *, stream: bool = False) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        if stream:
            count = channel.unary_stream(
                f"/{PROBE}/Count", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
            )
            return ",".join([m.value async for m in count(Text(value=value), metadata=metadata)])
        whoami = channel.unary_unary(
            f"/{PROBE}/Whoami", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
        )
        return (await whoami(Text(value=value), metadata=metadata)).value


@pytest.fixture
def revocations(redis_client: Redis, redis_key_prefix: str) -> RevocationList:
    return RevocationList(redis_client, redis_key_prefix)


def token_id(token: str, jwt_keys: Any) -> str:
    return TokenVerifier(jwt_keys).verify(token).token_id


class TestRevokedTokens:
    async def test_a_revoked_token_is_refused_before_the_servicer(
        self,
        probe_server: RunningServer,
        probe: Probe,
        revocations: RevocationList,
        make_token: Callable[..., str],
        jwt_keys: Any,
    ) -> None:
        revoked, other = make_token(wallet(0x51)), make_token(wallet(0x51))
        assert await call(probe_server.port, revoked, "before") == wallet(0x51)
        await revocations.revoke([(token_id(revoked, jwt_keys), time.time() + 900)])
        for stream in (False, True):
            await expect_error(
                call(probe_server.port, revoked, f"after-{stream}", stream=stream),
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_REVOKED",
                domain=DOMAIN,
            )
        assert "after-False" not in probe.calls
        assert "after-True" not in probe.calls
        # Another token of the same wallet, and anonymous calls, are not affected.
        assert await call(probe_server.port, other, "other") == wallet(0x51)
        assert await call(probe_server.port, None, "anonymous") == ""
        assert await call(probe_server.port, other, "stream", stream=True) == "0,1"

    async def test_the_key_lives_as_long_as_the_token(
        self, redis_client: Redis, revocations: RevocationList, redis_key_prefix: str
    ) -> None:
        await revocations.revoke([("jti-ttl", time.time() + 600)])
        assert revocations.key("jti-ttl") == f"{redis_key_prefix}auth:revoked:jti-ttl"
        assert 600 <= await redis_client.ttl(revocations.key("jti-ttl")) <= 606
        assert await revocations.is_revoked("jti-ttl")
        assert not await revocations.is_revoked("jti-never-revoked")

    async def test_expired_tokens_are_not_listed(self, redis_client: Redis, revocations: RevocationList) -> None:
        await revocations.revoke([("jti-expired", time.time() - 60)])
        assert not await redis_client.exists(revocations.key("jti-expired"))

    async def test_a_server_without_redis_does_not_check(
        self,
        jwt_secret: str,
        redis_url: str,
        redis_key_prefix: str,
        revocations: RevocationList,
        jwt_keys: Any,
        make_token: Callable[..., str],
    ) -> None:
        token = make_token(wallet(0x52))
        await revocations.revoke([(token_id(token, jwt_keys), time.time() + 900)])
        running = await start_server(
            probe_spec(Probe(), uses_redis=False), probe_settings(jwt_secret, redis_url, redis_key_prefix)
        )
        try:
            assert await call(running.port, token, "no-redis") == wallet(0x52)
        finally:
            await running.stop()

    async def test_redis_down_refuses_tokens_not_anonymous_calls(
        self, jwt_secret: str, redis_key_prefix: str, make_token: Callable[..., str]
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        settings = probe_settings(jwt_secret, f"redis://127.0.0.1:{closed_port}/0", redis_key_prefix)
        running = await start_server(probe_spec(Probe(), uses_redis=True), settings)
        try:
            await expect_error(
                call(running.port, make_token(wallet(0x53)), "redis-down"),
                grpc.StatusCode.UNAVAILABLE,
                "REVOCATION_CHECK_UNAVAILABLE",
                domain=DOMAIN,
            )
            assert await call(running.port, None, "anonymous") == ""
        finally:
            await running.stop()
