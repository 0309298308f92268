"""In-process gamed server (the same interceptors and setup as `python -m servers.gamed`) on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from far.gamed.v1 import gamed_service_pb2_grpc
from redis.asyncio import Redis

from servers.common.config import Settings
from servers.common.events import EventBus
from servers.common.server import RunningServer, start_server
from servers.gamed.server import SPEC as GAMED


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
