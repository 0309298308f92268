"""inference's job insert on real PostgreSQL: the row it returns is what the database holds, the values the
database filled in included, and a second job with the same request id is refused without a write."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from far.inference.v1 import job_pb2

from servers.common.db import Database
from servers.inference import repository
from servers.inference.models import JobRow

pytestmark = pytest.mark.integration

COLUMNS = [column.key for column in JobRow.__table__.columns]


@pytest.fixture
async def database(migrated_database_url: str) -> AsyncIterator[Database]:
    db = Database(migrated_database_url)
    yield db
    await db.close()


def _row(owner: str, **values: object) -> JobRow:
    required: dict[str, object] = {
        "id": "j" + uuid.uuid4().hex[:20],
        "owner": owner,
        "model": "models/m",
        "input": job_pb2.Job(prompt="hi", max_tokens=4).SerializeToString(),
        "max_tokens": 4,
        "state": job_pb2.Job.STATE_QUEUED,
    }
    return JobRow(**{**required, **values})


async def _stored(database: Database, job_id: str) -> dict[str, object]:
    async with database.read() as uow:
        stored = await repository.get_job(uow.session, job_id)
    assert stored is not None
    return {key: getattr(stored, key) for key in COLUMNS}


async def test_the_returned_row_holds_what_the_database_filled_in(database: Database) -> None:
    before = datetime.now(UTC)
    row = _row("0x" + "cd" * 20)  # no node, usage, output, quote or create time: the database's defaults
    async with database.transaction() as uow:
        inserted = await repository.insert_job(uow.session, row)
    assert inserted is row
    assert inserted.node == ""
    assert inserted.output_text == ""
    assert inserted.quote == ""
    assert inserted.prompt_tokens == 0
    assert inserted.completion_tokens == 0
    assert inserted.streamed is False
    assert inserted.create_time is not None
    assert inserted.create_time >= before
    assert {key: getattr(inserted, key) for key in COLUMNS} == await _stored(database, row.id)


async def test_given_values_are_stored_as_given(database: Database) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    row = _row(
        "0x" + "ce" * 20,
        node="nodes/n",
        state=job_pb2.Job.STATE_SUCCEEDED,  # not RUNNING: the sweeper's test ends every old RUNNING job it finds
        create_time=started,
        start_time=started,
        request_id="r-1",
        max_prompt_tokens=100,
    )
    async with database.transaction() as uow:
        inserted = await repository.insert_job(uow.session, row)
    assert inserted is row
    stored = await _stored(database, row.id)
    assert stored == {key: getattr(row, key) for key in COLUMNS}
    assert stored["create_time"] == started
    assert stored["node"] == "nodes/n"


async def test_a_second_job_with_the_same_request_id_is_refused_and_not_written(database: Database) -> None:
    owner = "0x" + "cf" * 20
    first, second = _row(owner, request_id="same"), _row(owner, request_id="same")
    async with database.transaction() as uow:
        assert await repository.insert_job(uow.session, first) is first
    async with database.transaction() as uow:
        assert await repository.insert_job(uow.session, second) is None
        assert await repository.get_job(uow.session, second.id) is None
        existing = await repository.job_by_request_id(uow.session, owner, "same")
    assert existing is not None
    assert existing.id == first.id
