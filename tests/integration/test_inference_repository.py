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


async def test_a_queued_job_starts_once_and_an_unfinished_one_ends_once(database: Database) -> None:
    row = _row("0x" + "d0" * 20)
    async with database.transaction() as uow:
        await repository.insert_job(uow.session, row)
    started_at = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    async with database.transaction() as uow:
        started = await repository.mark_started(uow.session, row.id, node="nodes/a", start_time=started_at)
        assert await repository.mark_started(uow.session, row.id, node="nodes/b", start_time=started_at) is None
    assert started is not None
    assert (started.state, started.node, started.start_time) == (job_pb2.Job.STATE_RUNNING, "nodes/a", started_at)
    assert {key: getattr(started, key) for key in COLUMNS} == await _stored(database, row.id)

    ended_at = datetime(2026, 2, 3, 4, 5, 9, tzinfo=UTC)
    end = {
        "state": job_pb2.Job.STATE_SUCCEEDED,
        "finish_reason": job_pb2.FINISH_REASON_LENGTH,
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "output_text": "four",
        "error": None,
        "end_time": ended_at,
        "time_to_first_token_ms": 12,
    }
    async with database.transaction() as uow:
        ended = await repository.mark_ended(uow.session, row.id, **end)
    assert ended is not None
    assert {key: getattr(ended, key) for key in end} == end
    assert (ended.node, ended.start_time) == ("nodes/a", started_at)  # what the end does not set stays
    assert {key: getattr(ended, key) for key in COLUMNS} == await _stored(database, row.id)
    async with database.transaction() as uow:  # the first end wins
        again = await repository.mark_ended(uow.session, row.id, state=job_pb2.Job.STATE_CANCELLED, end_time=ended_at)
    assert again is None
    assert (await _stored(database, row.id))["state"] == job_pb2.Job.STATE_SUCCEEDED


async def test_a_job_that_never_existed_neither_starts_nor_ends(database: Database) -> None:
    async with database.transaction() as uow:
        now = datetime.now(UTC)
        assert await repository.mark_started(uow.session, "j-missing", node="nodes/a", start_time=now) is None
        assert await repository.mark_ended(uow.session, "j-missing", state=job_pb2.Job.STATE_FAILED) is None


async def test_a_job_whose_id_is_taken_is_refused_and_not_written(database: Database) -> None:
    first = _row("0x" + "d1" * 20)
    again = _row("0x" + "d2" * 20, id=first.id)  # a paid job's id is its quote's: a reused quote
    async with database.transaction() as uow:
        assert await repository.insert_job(uow.session, first) is first
    async with database.transaction() as uow:
        assert await repository.insert_job(uow.session, again) is None
    assert (await _stored(database, first.id))["owner"] == first.owner
