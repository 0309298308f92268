"""The admission queue: one bounded Redis Stream per model, read by a consumer group of dispatchers.

`admit` is one atomic Lua call: drop the account's expired entries, refuse when the account has too many
unfinished jobs (`TOO_MANY_JOBS`) or the model's queue is full (`QUEUE_FULL`; both RESOURCE_EXHAUSTED with
RetryInfo, HTTP 429 through Envoy), else add the job to the account's set and to the queue, returning the
job's position. A job that would start at once on a free slot of its replica (`queued=False`) is refused with
`JobsWaiting` while any job waits in the model's queue, in the same call: waiting jobs go first, and no job
can join the queue between the check and the admission.

A job leaves the queue when someone *claims* it: `XDEL` of its entry returns 1 to exactly one claimer, whether
that is a dispatcher that read it through the group (`take`) or the replica that admitted it and has a free
slot right now (`claim`, the fast path with no cross-replica hop).

An entry a dispatcher read but never claimed (it died while it waited for a slot) stays pending in the group,
never delivered again to `>` readers: `read` takes such entries over first (`XAUTOCLAIM`) once they have been
pending `reclaim_after_s`. Reading one twice is harmless: only one claim of it succeeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from servers.common.errors import ResourceExhausted

GROUP = "dispatchers"

_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {-2, ''} end
if ARGV[7] == '0' then
  if redis.call('XLEN', KEYS[1]) > 0 then return {-3, ''} end
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  return {0, ''}
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[4]) then return {-1, ''} end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[6])
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
redis.call('SET', KEYS[3], id, 'EX', ARGV[6])
return {redis.call('XLEN', KEYS[1]), id}
"""


class JobsWaiting(Exception):
    """A job that would start at once was not admitted: jobs wait in the model's queue, and they go first."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted job's place: its queue entry and its position when admitted (1 = next)."""

    model: str
    job: str
    entry: str
    position: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_queue: int = 64
    """Jobs waiting per model; more is QUEUE_FULL."""
    max_unfinished_per_account: int = 4
    """Unfinished (queued or running) jobs per account; more is TOO_MANY_JOBS."""
    job_timeout_s: int = 900
    """The longest a job may stay counted against its account (a crashed replica's jobs age out)."""
    reclaim_after_s: float = 30.0
    """How long an entry may stay read but unclaimed before another dispatcher takes it over."""


class Admission:
    def __init__(self, redis: Redis, prefix: str, limits: Limits | None = None) -> None:
        self._redis = redis
        self._prefix = f"{prefix}inference:"
        self.limits = limits or Limits()
        self._admit = redis.register_script(_ADMIT)

    def queue_key(self, model: str) -> str:
        return f"{self._prefix}queue:{model}"

    def _active_key(self, owner: str) -> str:
        return f"{self._prefix}active:{owner}"

    def _entry_key(self, job: str) -> str:
        return f"{self._prefix}entry:{job}"

    async def admit(self, model: str, job: str, owner: str, *, queued: bool = True, now: float | None = None) -> Ticket:
        """Queue `job`; ResourceExhausted (`TOO_MANY_JOBS` / `QUEUE_FULL`) when it may not wait.

        `queued=False` admits a job that starts at once on a slot of this replica: it counts against its
        account but takes no queue entry (its ticket has no entry and position 0). While jobs wait in the
        model's queue it raises `JobsWaiting` instead (the account's limit is checked first).
        """
        now = time.time() if now is None else now
        limits = self.limits
        answer: Any = await self._admit(
            keys=[self.queue_key(model), self._active_key(owner), self._entry_key(job)],
            args=[
                job,
                now,
                now + limits.job_timeout_s,
                limits.max_queue,
                limits.max_unfinished_per_account,
                limits.job_timeout_s,
                "1" if queued else "0",
            ],
        )
        position, entry = int(answer[0]), answer[1]
        if position == -3:
            raise JobsWaiting(model)
        if position == -2:
            raise ResourceExhausted(
                f"the account has {limits.max_unfinished_per_account} unfinished jobs already; wait for one to end",
                reason="TOO_MANY_JOBS",
                retry_after_s=5.0,
                metadata={"limit": str(limits.max_unfinished_per_account)},
            )
        if position == -1:
            raise ResourceExhausted(
                f"the queue of {model} is full ({limits.max_queue} jobs waiting); try again shortly",
                reason="QUEUE_FULL",
                retry_after_s=1.0,
                metadata={"model": model, "queue_limit": str(limits.max_queue)},
            )
        return Ticket(model, job, _text(entry), position)

    async def release(self, job: str, owner: str) -> None:
        """The job ended: it no longer counts against its account."""
        await self._redis.zrem(self._active_key(owner), job)

    async def ticket(self, model: str, job: str) -> Ticket | None:
        """The ticket of a job admitted earlier (by any replica), while its entry is remembered."""
        entry = await self._redis.get(self._entry_key(job))
        if entry is None:
            return None
        return Ticket(model, job, _text(entry), 0)

    async def withdraw(self, ticket: Ticket, owner: str) -> bool:
        """Take a job out of the queue and its account's count (it will not run); False if it was claimed."""
        removed = await self.claim(ticket)
        await self.release(ticket.job, owner)
        return removed

    async def claim(self, ticket: Ticket) -> bool:
        """Take the job out of the queue to run it; False when someone else claimed or withdrew it first."""
        if not ticket.entry:
            return True  # admitted to run at once: never queued
        key = self.queue_key(ticket.model)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xack(key, GROUP, ticket.entry)
        pipe.xdel(key, ticket.entry)
        _, deleted = await pipe.execute()
        return int(deleted) == 1

    async def ensure_group(self, model: str) -> None:
        try:
            await self._redis.xgroup_create(self.queue_key(model), GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def read(self, model: str, consumer: str, *, block_ms: int) -> Ticket | None:
        """The next waiting job of `model` for this dispatcher (None when none came within `block_ms`).

        The job stays in the queue (it still counts, and the fast path still yields to it) until `claim`:
        a dispatcher reads a job when a slot looks free, then waits for the slot, then claims it.
        """
        key = self.queue_key(model)
        reclaimed = await self._reclaim(key, consumer)
        if reclaimed:
            entries = reclaimed
        else:
            answer: Any = await self._redis.xreadgroup(GROUP, consumer, {key: ">"}, count=1, block=block_ms)
            if not answer:
                return None
            entries = answer[0][1]
        for entry_id, fields in entries:
            if fields:  # empty for an entry withdrawn (deleted) after it was delivered
                return Ticket(model, _text(fields[b"job"]), _text(entry_id), 1)
            await self._redis.xack(key, GROUP, entry_id)
        return None

    async def _reclaim(self, key: str, consumer: str) -> list[Any]:
        """The oldest entry read by a dispatcher that has not claimed it for `reclaim_after_s`, now ours."""
        min_idle_ms = max(1, int(self.limits.reclaim_after_s * 1000))
        answer: Any = await self._redis.xautoclaim(key, GROUP, consumer, min_idle_ms, start_id="0-0", count=1)
        # [next start, [(id, fields)], deleted ids (Redis 7+)]; an entry deleted meanwhile has no fields.
        entries: list[Any] = [(entry_id, fields) for entry_id, fields in answer[1] if fields]
        return entries

    async def take(self, model: str, consumer: str, *, block_ms: int) -> str | None:
        """Read and claim the next waiting job at once (None when none came, or another claimer won)."""
        ticket = await self.read(model, consumer, block_ms=block_ms)
        if ticket is None or not await self.claim(ticket):
            return None
        return ticket.job

    async def position(self, ticket: Ticket) -> int:
        """The job's place among the jobs still waiting (1 = next); 0 once it was claimed.

        Every entry in the stream waits: a claim deletes its entry (a job read by a dispatcher that is still
        waiting for a slot is first in line, and counted).
        """
        if not ticket.entry:
            return 0
        entries: Any = await self._redis.xrange(self.queue_key(ticket.model), min="-", max=ticket.entry)
        if not entries or _text(entries[-1][0]) != ticket.entry:
            return 0
        return len(entries)

    async def length(self, model: str) -> int:
        return int(await self._redis.xlen(self.queue_key(model)))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
