"""The stale-job sweeper on real PostgreSQL and Redis: a RUNNING job without a heartbeat is ended FAILED
(NODE_FAILED) and its followers get their end; a job with a heartbeat, or one started just now, is left alone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from far.inference.v1 import inference_service_pb2, job_pb2
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio import Redis

from servers.common.db import Database
from servers.common.lease import Lease
from servers.inference import repository
from servers.inference.admission import Admission
from servers.inference.models import JobRow
from servers.inference.sweeper import JobHeartbeats, StaleJobSweeper
from servers.inference.token_stream import End, TokenStreams

pytestmark = pytest.mark.integration


@pytest.fixture
async def database(migrated_database_url: str) -> AsyncIterator[Database]:
    db = Database(migrated_database_url)
    yield db
    await db.close()


async def running_job(database: Database, started: datetime) -> str:
    job_id = "j" + uuid.uuid4().hex[:20]
    row = JobRow(
        id=job_id,
        owner="0x" + "ab" * 20,
        model="models/m",
        input=job_pb2.Job(prompt="hi", max_tokens=4).SerializeToString(),
        max_tokens=4,
        state=job_pb2.Job.STATE_RUNNING,
        node="nodes/n",
        prompt_tokens=3,
        completion_tokens=2,
        finish_reason=0,
        output_text="",
        quote="",
        create_time=started,
        start_time=started,
    )
    async with database.transaction() as uow:
        assert await repository.insert_job(uow.session, row) is not None
    return job_id


async def state_of(database: Database, job_id: str) -> JobRow:
    async with database.read() as uow:
        row = await repository.get_job(uow.session, job_id)
    assert row is not None
    return row


async def test_running_jobs_without_a_heartbeat_are_ended(
    database: Database, redis_client: Redis, redis_key_prefix: str
) -> None:
    prefix = f"{redis_key_prefix}sweep-{uuid.uuid4().hex[:6]}:"
    heartbeats = JobHeartbeats(redis_client, prefix)
    streams = TokenStreams(redis_client, prefix)
    sweeper = StaleJobSweeper(
        database,
        heartbeats,
        streams,
        Admission(redis_client, prefix),
        Lease(redis_client, f"{prefix}lease", ttl_ms=1000),
    )
    now = datetime.now(UTC)
    orphan = await running_job(database, now - timedelta(minutes=5))
    beating = await running_job(database, now - timedelta(minutes=5))
    fresh = await running_job(database, now - timedelta(seconds=2))
    await heartbeats.beat(beating)

    assert await sweeper.sweep_once(now=now) == [orphan]
    ended = await state_of(database, orphan)
    assert ended.state == job_pb2.Job.STATE_FAILED
    assert ended.error is not None
    status = status_pb2.Status.FromString(ended.error)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "NODE_FAILED"
    for job_id in (beating, fresh):
        assert (await state_of(database, job_id)).state == job_pb2.Job.STATE_RUNNING
    # A follower of the orphan gets its end instead of waiting forever.
    items = [item async for item in streams.follow(orphan, tick_s=0.05) if item is not None]
    (end,) = items
    assert isinstance(end, End)
    final = inference_service_pb2.GenerateEnd.FromString(end.data)
    assert final.state == job_pb2.Job.STATE_FAILED
    assert final.next_offset == 2
    assert await sweeper.sweep_once(now=now) == []  # ended once
