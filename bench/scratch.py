"""A scratch place for one benchmark run: a work folder, a database of its own and a Redis key prefix.

PostgreSQL and Redis come from DATABASE_URL / REDIS_URL or are started embedded (in the work folder);
everything is dropped and stopped at the end, the run's Redis keys included. The work folder is removed
unless the run failed (then its servers' logs stay there, and the path is printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from servers.common.db import run_admin_statement, with_database
from servers.common.embedded import EmbeddedServer, ensure_redis, start_postgres


@dataclass(frozen=True)
class Scratch:
    work: Path
    database_url: str
    redis_url: str
    redis_key_prefix: str

    def env(self, **more: str) -> dict[str, str]:
        """DATABASE_URL, REDIS_URL and REDIS_KEY_PREFIX of the run, with `more`."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": self.redis_key_prefix,
            **more,
        }


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Scratch]:
    work = Path(tempfile.mkdtemp(prefix=f"far-bench-{name}-"))
    embedded: list[EmbeddedServer] = []
    server_url = os.environ.get("DATABASE_URL", "").strip()
    database = f"far_bench_{secrets.token_hex(4)}"
    created = False
    failed = True
    prefix = f"far-bench-{secrets.token_hex(4)}:"
    redis_url = ""
    try:
        if not server_url:
            pg = start_postgres(work / "postgres")
            embedded.append(pg)
            server_url = pg.url
        redis_url = os.environ.get("REDIS_URL", "").strip()
        if not redis_url:
            redis = ensure_redis(work / "redis")
            embedded.append(redis)
            redis_url = redis.url
        asyncio.run(run_admin_statement(server_url, f'CREATE DATABASE "{database}"'))
        created = True
        yield Scratch(work, with_database(server_url, database), redis_url, prefix)
        failed = False
    finally:
        if created:
            asyncio.run(run_admin_statement(server_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        if redis_url:
            _drop_keys(redis_url, prefix)
        for server in embedded:
            if server.started:
                server.stop()
        if failed:
            print(f"bench: failed; the servers' logs are kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _drop_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
