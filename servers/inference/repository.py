"""All of inference's SQL. Functions take the caller's session and flush; they never commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from far.inference.v1 import job_pb2
from sqlalchemy import Table, Update, bindparam, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from servers.inference.models import JobRow

QUEUED, RUNNING = job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_RUNNING
UNFINISHED = (QUEUED, RUNNING)


_JOBS = cast(Table, JobRow.__table__)
_DEFAULTED = tuple(c for c in _JOBS.columns if c.default is not None or c.server_default is not None)
_INSERT_JOB = (
    insert(_JOBS)
    .on_conflict_do_nothing()  # the id (a paid job's is its quote's) or the owner's request id is taken
    .returning(_JOBS.c.id, *_DEFAULTED)
)
"""Built once and run with the row's values as parameters. A new ORM statement with the values inline, per job,
cost ~1 ms more of CPU: a bind and a cache-key part per column, the ORM's insert bookkeeping, and a second
row object built from RETURNING."""


async def insert_job(session: AsyncSession, row: JobRow) -> JobRow | None:
    """Insert the job and return `row`, with what the database filled in for the columns it left unset; None
    when a job with its id exists, or the owner has a job with its request id (the caller reads that one)."""
    values = {c.key: getattr(row, c.key) for c in _JOBS.columns}
    given = {key: value for key, value in values.items() if value is not None}
    inserted = (await session.execute(_INSERT_JOB, given)).first()
    if inserted is None:
        return None
    for column in _DEFAULTED:
        if values[column.key] is None:
            setattr(row, column.key, inserted._mapping[column.key])
    return row


async def get_job(session: AsyncSession, job_id: str, *, for_update: bool = False) -> JobRow | None:
    query = select(JobRow).where(JobRow.id == job_id)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def job_by_request_id(session: AsyncSession, owner: str, request_id: str) -> JobRow | None:
    query = select(JobRow).where(JobRow.owner == owner, JobRow.request_id == request_id)
    return (await session.execute(query)).scalar_one_or_none()


async def count_unfinished(session: AsyncSession, owner: str) -> int:
    query = select(func.count()).select_from(JobRow).where(JobRow.owner == owner, JobRow.state.in_(UNFINISHED))
    return int((await session.execute(query)).scalar_one())


async def list_jobs(
    session: AsyncSession,
    *,
    owner: str,
    state: int,
    model: str,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[JobRow]:
    """The owner's jobs matching the filters, newest first, after the keyset cursor (create_time, id)."""
    query = select(JobRow).where(JobRow.owner == owner)
    if state:
        query = query.where(JobRow.state == state)
    if model:
        query = query.where(JobRow.model == model)
    if after is not None:
        query = query.where(tuple_(JobRow.create_time, JobRow.id) < tuple_(*after))
    query = query.order_by(JobRow.create_time.desc(), JobRow.id.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


_START_JOB = update(_JOBS).where(_JOBS.c.id == bindparam("job"), _JOBS.c.state == QUEUED).returning(*_JOBS.c)
_END_JOB = update(_JOBS).where(_JOBS.c.id == bindparam("job"), _JOBS.c.state.in_(UNFINISHED)).returning(*_JOBS.c)
"""Built once, like `_INSERT_JOB`: the columns to set come as parameters (each set of columns compiles once),
and the row that comes back is made a JobRow without the ORM's update bookkeeping (~1 ms of CPU per job)."""


async def _updated(session: AsyncSession, statement: Update, job_id: str, values: dict[str, Any]) -> JobRow | None:
    updated = (await session.execute(statement, {"job": job_id, **values})).mappings().one_or_none()
    return JobRow(**updated) if updated is not None else None


async def mark_started(session: AsyncSession, job_id: str, *, node: str, start_time: datetime) -> JobRow | None:
    """QUEUED -> RUNNING on `node`; None when the job is no longer queued (cancelled meanwhile)."""
    return await _updated(session, _START_JOB, job_id, {"state": RUNNING, "node": node, "start_time": start_time})


async def mark_ended(session: AsyncSession, job_id: str, **values: Any) -> JobRow | None:
    """Set the end of an unfinished job (state, finish reason, usage, output, error, times); None when it
    had ended already (the first end wins: a cancel racing the last token, a retry of the same end)."""
    return await _updated(session, _END_JOB, job_id, values)


async def running_started_before(session: AsyncSession, before: datetime, *, limit: int) -> list[JobRow]:
    """RUNNING jobs that started before `before`, oldest first (the stale-job sweeper's candidates)."""
    query = (
        select(JobRow)
        .where(JobRow.state == RUNNING, JobRow.start_time < before)
        .order_by(JobRow.start_time)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())
