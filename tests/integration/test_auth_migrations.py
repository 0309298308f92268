"""The auth schema: its Alembic history builds exactly what servers/auth/models.py describes."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from servers.auth.models import SCHEMA, Base
from servers.common.db import async_url

pytestmark = pytest.mark.integration


def _only_auth(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    return name == SCHEMA if type_ == "schema" else True


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"include_schemas": True, "include_name": _only_auth, "version_table_schema": SCHEMA},
    )
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_match_the_models(migrated_database_url: str) -> None:
    engine = create_async_engine(async_url(migrated_database_url))
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await engine.dispose()
