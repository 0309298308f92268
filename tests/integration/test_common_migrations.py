"""servers.common.migrations on the run's database: idempotent upgrades, one schema per service."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from servers.common.migrations import alembic_config, main, migrations_dir, upgrade
from servers.gamed.models import Base

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TABLES = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'gamed' ORDER BY table_name"


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(query)
    finally:
        await connection.close()


async def admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
async def empty_database_url(database_url: str) -> AsyncIterator[str]:
    """A new empty database on the run's server, dropped after the test."""
    name = f"{urlsplit(database_url).path.lstrip('/')}_empty"
    await admin(database_url, f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    finally:
        await admin(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def head(service: str, url: str) -> str:
    revision = ScriptDirectory.from_config(alembic_config(service, url)).get_current_head()
    assert revision is not None
    return revision


class TestUpgrade:
    async def test_running_it_again_changes_nothing(self, migrated_database_url: str) -> None:
        before = await fetch(migrated_database_url, TABLES)
        # upgrade() runs its own event loop, so it goes to a thread.
        await asyncio.to_thread(upgrade, "gamed", migrated_database_url)
        await asyncio.to_thread(upgrade, "gamed", migrated_database_url)
        assert await fetch(migrated_database_url, TABLES) == before
        versions = await fetch(migrated_database_url, "SELECT version_num FROM gamed.alembic_version")
        assert [r["version_num"] for r in versions] == [head("gamed", migrated_database_url)]

    async def test_several_processes_at_once(self, empty_database_url: str, database_url: str) -> None:
        # Two processes migrating an empty database at the same time, like replicas starting together.
        url = empty_database_url
        env = {**os.environ, "DATABASE_URL": url}
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "servers.common.migrations",
                "upgrade",
                "gamed",
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(p.communicate() for p in processes))
        for process, (stdout, stderr) in zip(processes, results, strict=True):
            assert process.returncode == 0, stderr.decode()
            assert stdout.decode() == "migrations: gamed: at head\n"
        versions = await fetch(url, "SELECT version_num FROM gamed.alembic_version")
        assert [r["version_num"] for r in versions] == [head("gamed", url)]
        assert await fetch(url, TABLES) == await fetch(database_url, TABLES)

    async def test_the_gamed_schema_holds_its_tables_and_version_table(self, migrated_database_url: str) -> None:
        rows = await fetch(
            migrated_database_url,
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_name = 'alembic_version' OR table_schema = 'gamed'",
        )
        found = {(r["table_schema"], r["table_name"]) for r in rows}
        expected = {("gamed", table.name) for table in Base.metadata.sorted_tables}
        assert expected
        assert expected | {("gamed", "alembic_version")} <= found
        assert ("public", "alembic_version") not in found

    def test_the_command_line(
        self, migrated_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("DATABASE_URL", migrated_database_url)
        assert main(["upgrade", "gamed", "nosuchservice"]) == 0
        assert capsys.readouterr().out.splitlines() == ["migrations: gamed: at head", "migrations: nosuchservice: none"]

    def test_the_command_line_needs_a_database(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.delenv("DATABASE_URL", raising=False)
        assert main(["upgrade", "gamed"]) == 2
        assert capsys.readouterr().err == "migrations: DATABASE_URL is not set\n"
        assert main(["downgrade", "gamed"]) == 2
        assert main(["upgrade"]) == 2


def test_a_service_without_migrations(database_url: str) -> None:
    assert migrations_dir("nosuchservice") is None
    assert migrations_dir("common") is None
    with pytest.raises(LookupError, match="'nosuchservice' has no migrations"):
        alembic_config("nosuchservice", database_url)


def test_alembic_config_is_schema_scoped_and_async() -> None:
    config = alembic_config("gamed", "postgresql://u:p%40ss@h/far")
    assert config.attributes["schema"] == "gamed"
    assert config.get_main_option("sqlalchemy.url") == "postgresql+asyncpg://u:p%40ss@h/far"
    assert config.get_main_option("script_location") == str(migrations_dir("gamed"))
