"""Alembic migrations, one PostgreSQL schema and one version table per service.

    python -m servers.common.migrations upgrade gamed [other services...]   (DATABASE_URL must be set)

Each service keeps its migrations in `servers/<service>/migrations/`, whose env.py calls `run_env`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection

from servers.common.db import async_url


def migrations_dir(service: str) -> Path | None:
    spec = importlib.util.find_spec(f"servers.{service}")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "migrations"
    return path if (path / "env.py").exists() else None


def alembic_config(service: str, database_url: str) -> Config:
    location = migrations_dir(service)
    if location is None:
        raise LookupError(f"the service {service!r} has no migrations")
    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", async_url(database_url).replace("%", "%%"))
    config.attributes["schema"] = service
    return config


def upgrade(service: str, database_url: str, revision: str = "head") -> None:
    """Apply a service's migrations up to `revision`. Safe to run from several processes at once."""
    command.upgrade(alembic_config(service, database_url), revision)


def run_env(metadata: MetaData) -> None:
    """The body of every service's env.py: online, async, schema-scoped, under an advisory lock."""
    from sqlalchemy.ext.asyncio import create_async_engine

    config = context.config
    schema: str = config.attributes["schema"]

    def migrate(connection: Connection) -> None:
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"far-migrate-{schema}"})
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table_schema=schema,
            include_schemas=True,
            transaction_per_migration=False,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run() -> None:
        engine = create_async_engine(config.get_main_option("sqlalchemy.url") or "")
        try:
            async with engine.begin() as connection:
                await connection.run_sync(migrate)
        finally:
            await engine.dispose()

    asyncio.run(run())


def main(argv: list[str]) -> int:
    import os

    if len(argv) < 2 or argv[0] != "upgrade":
        print("usage: python -m servers.common.migrations upgrade SERVICE [SERVICE ...]", file=sys.stderr)
        return 2
    database_url = os.environ.get("DATABASE_URL", "").strip()
    if not database_url:
        print("migrations: DATABASE_URL is not set", file=sys.stderr)
        return 2
    for service in argv[1:]:
        if migrations_dir(service) is None:
            print(f"migrations: {service}: none")
            continue
        upgrade(service, database_url)
        print(f"migrations: {service}: at head")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
