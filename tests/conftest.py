"""Infrastructure every test run shares: a fresh PostgreSQL database and a Redis key prefix of its own.

With DATABASE_URL / REDIS_URL set, the run creates (and at the end drops) its own database on that
server and uses a unique key prefix; unset, it starts the embedded PostgreSQL / Redis in a temp dir.
"""

from __future__ import annotations

import devstack  # noqa: F401  (first: it turns gRPC's fork support off before anything imports grpc)

# isort: split
import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from devstack import processes
from servers.common.auth import JwtKeys, TokenIssuer
from servers.common.db import run_admin_statement, with_database
from servers.common.embedded import ensure_redis, start_postgres
from servers.common.migrations import migrations_dir, upgrade
from tests.watchdog import on_hang

RUN_ID = secrets.token_hex(4)
SERVICES = ("auth", "inference", "realtime", "gaming", "desci", "gamed", "gpu", "staking", "ingest")
TEST_JWT_SECRET = "far-test-secret-" + "0123456789abcdef" * 2
pytest_plugins = ["tests.watchdog"]  # a hung test ends the run with every thread's stack


@pytest.fixture(scope="session", autouse=True)
def _stop_processes_if_a_test_hangs() -> None:
    """A hung run (tests/watchdog.py) stops the processes devstack started before it exits."""
    on_hang(processes.stop_leftovers)


@pytest.fixture(scope="session")
def new_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """`new_database(name)` -> the URL of a database `far_test_<run>_<name>` of this run's own (`database_url`
    is `new_database("")`); every one is dropped at the end. For stacks of servers whose background work
    (sweepers, dispatchers) must not act on another stack's rows."""
    server_url = os.environ.get("DATABASE_URL", "").strip()
    embedded = None
    if not server_url:
        embedded = start_postgres(tmp_path_factory.mktemp("postgres"))
        server_url = embedded.url
        if embedded.started:
            on_hang(embedded.stop)
    made: dict[str, str] = {}

    def make(suffix: str) -> str:
        name = f"far_test_{RUN_ID}" + (f"_{suffix}" if suffix else "")
        if name not in made:
            asyncio.run(run_admin_statement(server_url, f'CREATE DATABASE "{name}"'))
            made[name] = with_database(server_url, name)
        return made[name]

    try:
        yield make
    finally:
        for name in made:
            asyncio.run(run_admin_statement(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if embedded is not None and embedded.started:
            embedded.stop()


@pytest.fixture(scope="session")
def database_url(new_database: Callable[[str], str]) -> str:
    """A database of this run's own, dropped at the end."""
    return new_database("")


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    """The run's database with every service's migrations applied."""
    for service in SERVICES:
        if migrations_dir(service) is not None:
            upgrade(service, database_url)
    return database_url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "").strip()
    if url:
        yield url
        return
    embedded = ensure_redis(tmp_path_factory.mktemp("redis"))
    if embedded.started:
        on_hang(embedded.stop)
    try:
        yield embedded.url
    finally:
        if embedded.started:
            embedded.stop()


@pytest.fixture(scope="session")
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this run's own; its keys are deleted at the end."""
    prefix = f"far-test-{RUN_ID}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    return TEST_JWT_SECRET


@pytest.fixture(scope="session")
def jwt_keys(jwt_secret: str) -> JwtKeys:
    return JwtKeys(current_kid="k1", secrets={"k1": jwt_secret})


@pytest.fixture(scope="session")
def make_token(jwt_keys: JwtKeys) -> Callable[..., str]:
    """`make_token(wallet, roles=("publisher",), ttl_s=900)` -> a signed access token."""
    issuer = TokenIssuer(jwt_keys)

    def make(subject: str, roles: tuple[str, ...] = ("user",), ttl_s: float = 900.0) -> str:
        return issuer.issue(subject, roles, ttl_s=ttl_s)

    return make


@pytest.fixture(scope="session")
def service_env(migrated_database_url: str, redis_url: str, redis_key_prefix: str, jwt_secret: str) -> dict[str, str]:
    """The environment a server process of this run starts with."""
    return {
        "DATABASE_URL": migrated_database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": redis_key_prefix,
        "JWT_SECRET": jwt_secret,
        "JWT_KEY_ID": "k1",
        "LOG_LEVEL": "info",
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "FAR_DATA_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / f"far-test-{RUN_ID}"),
    }


def wallet(n: int) -> str:
    """A deterministic test wallet address."""
    return "0x" + f"{n:040x}"
