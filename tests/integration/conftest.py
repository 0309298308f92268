"""In-process gamed and auth servers (the same interceptors and setup as `python -m servers.<name>`) on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from far.auth.v1 import auth_service_pb2_grpc, session_pb2
from far.gamed.v1 import gamed_service_pb2_grpc
from redis.asyncio import Redis

from servers.auth.server import make_spec as make_auth_spec
from servers.common.config import Settings
from servers.common.events import EventBus
from servers.common.server import RunningServer, start_server
from servers.gamed.server import SPEC as GAMED
from tests.integration.auth_support import BOOTSTRAP_ADMIN, admin_session
from tests.integration.gpu_support import gpu, gpu_channel, gpu_server, moto_dynamodb  # noqa: F401


@pytest.fixture(scope="session")
async def gamed_server(service_env: dict[str, str]) -> AsyncIterator[RunningServer]:
    settings = Settings.from_env("gamed", 0, environ={**service_env, "GRPC_LISTEN": "127.0.0.1:0"})
    running = await start_server(GAMED, settings)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="session")
async def gamed_channel(gamed_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gamed_server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def gamed(gamed_channel: grpc.aio.Channel) -> gamed_service_pb2_grpc.GamedServiceStub:
    return gamed_service_pb2_grpc.GamedServiceStub(gamed_channel)


@pytest.fixture(scope="session")
def auth(make_token: Callable[..., str]) -> Callable[..., tuple[tuple[str, str], ...]]:
    """`auth(wallet, *roles)` -> call metadata carrying a bearer token for that wallet."""

    def metadata(subject: str, *roles: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {make_token(subject, roles or ('user',))}"),)

    return metadata


@pytest.fixture(scope="module")
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def bus(redis_client: Redis, redis_key_prefix: str) -> EventBus:
    """An event bus on the run's Redis and key prefix."""
    return EventBus(redis_client, redis_key_prefix)


# The auth service, in-process, with a clock the tests can move (`auth_clock.advance(...)`).


class MovableClock:
    """The real time plus an offset that tests move; `reset()` puts it back."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta

    def reset(self) -> None:
        self.offset = timedelta()


AUTH_TEST_SETTINGS = {
    "AUTH_SIWE_DOMAINS": "app.far.test,partner.far.test:8443",
    "AUTH_CHAIN_IDS": "97,56",
    "AUTH_BOOTSTRAP_ADMINS": BOOTSTRAP_ADMIN.address,
    "AUTH_CHALLENGES_PER_MINUTE": "5",
}


@pytest.fixture(scope="session")
def auth_clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
def clock(auth_clock: MovableClock) -> Iterator[MovableClock]:
    """The auth server's clock, back to the real time after the test."""
    try:
        yield auth_clock
    finally:
        auth_clock.reset()


@pytest.fixture(scope="session")
async def auth_server(service_env: dict[str, str], auth_clock: MovableClock) -> AsyncIterator[RunningServer]:
    settings = Settings.from_env("auth", 0, environ={**service_env, "GRPC_LISTEN": "127.0.0.1:0"})
    running = await start_server(make_auth_spec(auth_clock, environ=AUTH_TEST_SETTINGS), settings)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="session")
async def auth_channel(auth_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def auth_api(auth_channel: grpc.aio.Channel) -> auth_service_pb2_grpc.AuthServiceStub:
    return auth_service_pb2_grpc.AuthServiceStub(auth_channel)


@pytest.fixture(scope="session")
async def auth_admin(auth_api: auth_service_pb2_grpc.AuthServiceStub) -> session_pb2.Session:
    """A session of the bootstrap admin, signed in once per run (tests must not end it)."""
    return await admin_session(auth_api)
