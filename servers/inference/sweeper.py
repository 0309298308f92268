"""Jobs whose replica died: a job RUNNING with no heartbeat is ended FAILED (NODE_FAILED) so nothing waits forever.

Each replica's runner refreshes a heartbeat key per running job (`JobHeartbeats.beat`, every 5 s, 15 s TTL).
One replica at a time (a Redis lease) sweeps every `interval_s`: RUNNING jobs started more than
`stale_after_s` ago whose heartbeat is gone are ended, their token stream gets its End (followers finish),
their account count is released and the job event goes out.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from far.inference.v1 import job_pb2
from google.rpc import code_pb2
from redis.asyncio import Redis

from servers.common.db import Database
from servers.common.lease import Lease
from servers.inference import convert, repository
from servers.inference.admission import Admission
from servers.inference.executor import error_status
from servers.inference.jobs import JOBS_TOPIC
from servers.inference.token_stream import TokenStreams

log = structlog.get_logger("far.inference.sweeper")
BEAT_EVERY_S = 5.0
BEAT_TTL_S = 15


class JobHeartbeats:
    """`<prefix>inference:running:<job>` keys: present while a replica runs the job."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}inference:running:"

    async def beat(self, job: str) -> None:
        await self._redis.set(self._prefix + job, b"1", ex=BEAT_TTL_S)

    async def clear(self, job: str) -> None:
        await self._redis.delete(self._prefix + job)

    async def alive(self, jobs: list[str]) -> set[str]:
        if not jobs:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.exists(self._prefix + job)
        answers: list[Any] = await pipe.execute()
        return {job for job, answer in zip(jobs, answers, strict=True) if answer}

    async def keep(self, job: str) -> None:
        """Beat until cancelled (the runner's task for one job)."""
        while True:
            try:
                await self.beat(job)
            except Exception as error:  # a Redis hiccup: the TTL leaves room for the next beat
                log.warning("heartbeat failed", job=job, error=str(error))
            await asyncio.sleep(BEAT_EVERY_S)


class StaleJobSweeper:
    def __init__(
        self,
        database: Database,
        heartbeats: JobHeartbeats,
        streams: TokenStreams,
        admission: Admission,
        lease: Lease,
        *,
        interval_s: float = 10.0,
        stale_after_s: float = 30.0,
    ) -> None:
        self._db = database
        self._heartbeats = heartbeats
        self._streams = streams
        self._admission = admission
        self._lease = lease
        self._interval_s = interval_s
        self._stale_after = timedelta(seconds=stale_after_s)

    async def sweep_once(self, *, now: datetime | None = None) -> list[str]:
        """End the stale RUNNING jobs; returns their ids."""
        now = now or datetime.now(UTC)
        async with self._db.read() as uow:
            candidates = await repository.running_started_before(uow.session, now - self._stale_after, limit=200)
        alive = await self._heartbeats.alive([row.id for row in candidates])
        ended: list[str] = []
        status = error_status(code_pb2.UNAVAILABLE, "NODE_FAILED", "the replica running the job stopped")
        for row in candidates:
            if row.id in alive:
                continue
            async with self._db.transaction() as uow:
                done = await repository.mark_ended(
                    uow.session,
                    row.id,
                    state=job_pb2.Job.STATE_FAILED,
                    finish_reason=job_pb2.FINISH_REASON_ERROR,
                    error=status.SerializeToString(),
                    end_time=now,
                )
                if done is None:
                    continue
                uow.publish(JOBS_TOPIC, convert.job(done, with_output=False))
            end = convert.generate_end(done)
            await self._streams.end(done.id, end.SerializeToString())
            await self._admission.release(done.id, done.owner)
            ended.append(done.id)
            log.warning("stale job ended", job=done.id)
        return ended

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                if await self._lease.held():
                    await self.sweep_once()
            except Exception as error:  # the next round tries again
                log.warning("sweep failed", error=str(error))
