"""Each service's Alembic history builds exactly what its `servers/<service>/models.py` describes."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from servers.common.db import async_url
from servers.common.migrations import migrations_dir

pytestmark = pytest.mark.integration

# Services whose tables are declared in a models module (ingest keeps its tables next to the ingester and
# has its own check in tests/chain/test_ingest.py).
SERVICES = [
    name
    for name in ("auth", "gamed", "gpu", "inference")
    if migrations_dir(name) is not None and importlib.util.find_spec(f"servers.{name}.models") is not None
]


def _differences(connection: Connection, schema: str, metadata: MetaData) -> list[Any]:
    def only_this_schema(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
        return name == schema if type_ == "schema" else True

    context = MigrationContext.configure(
        connection,
        opts={"include_schemas": True, "include_name": only_this_schema, "version_table_schema": schema},
    )
    return list(compare_metadata(context, metadata))


@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_match_the_models(migrated_database_url: str, service: str) -> None:
    models = importlib.import_module(f"servers.{service}.models")
    engine = create_async_engine(async_url(migrated_database_url))
    try:
        async with engine.connect() as connection:
            found = await connection.run_sync(_differences, models.SCHEMA, models.Base.metadata)
        assert found == []
    finally:
        await engine.dispose()


def test_the_services_with_models_are_all_checked() -> None:
    assert {"auth", "gamed", "inference"} <= set(SERVICES)
