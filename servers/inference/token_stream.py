"""A job's tokens in Redis: every delta appended in order, replayed from any offset, then followed live.

One Redis stream per job, `<prefix>inference:jobs:<job>:tokens`. Entries are deltas (`o` offset, `n` token
count, `t` text) and, last, one `end` entry holding the serialized `GenerateEnd` of the job. Any number of
followers read it (StreamJob, a Generate whose caller came back), so a client that lost its connection
resumes from the offset it saw and loses nothing. The stream lives `ttl_s` after the job ends
(STREAM_EXPIRED afterwards; the whole text stays in PostgreSQL).

The writer never sits between the model and the caller: `TokenWriter.push` only queues the delta and a
background task sends batches in one pipeline each, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

DEFAULT_TTL_S = 24 * 3600
"""How long a job's token stream is kept after the job ends (the contract's STREAM_EXPIRED horizon)."""
LIVE_TTL_S = 6 * 3600
"""The expiry of a stream whose job has not ended: longer than any job may run, so a crashed writer's
stream does not stay forever."""
_REPLAY_BATCH = 512


@dataclass(frozen=True, slots=True)
class Delta:
    """Consecutive completion tokens of a job: their text and the index of the first one."""

    text: str
    offset: int
    token_count: int

    @property
    def next_offset(self) -> int:
        return self.offset + self.token_count


@dataclass(frozen=True, slots=True)
class End:
    """The last entry of a job's stream: the serialized `far.inference.v1.GenerateEnd`."""

    data: bytes


def _entry(delta: Delta) -> dict[FieldT, EncodableT]:
    """The stream entry of one delta (the fields `replay` reads back)."""
    return {"o": delta.offset, "n": delta.token_count, "t": delta.text.encode()}


class TokenStreams:
    """Reads and writes the per-job token streams."""

    def __init__(self, redis: Redis, prefix: str, *, ttl_s: int = DEFAULT_TTL_S) -> None:
        self._redis = redis
        self._prefix = f"{prefix}inference:jobs:"
        self.ttl_s = ttl_s
        self.cancel_channel = f"{prefix}inference:cancel"

    def key(self, job: str) -> str:
        return f"{self._prefix}{job}:tokens"

    async def append(self, job: str, deltas: list[Delta], *, first: bool = True) -> None:
        """Append deltas in one round trip (in order). The `first` append of a job also gives the stream its live
        expiry (later XADDs keep it), so a writer's later batches are XADDs alone."""
        if not deltas:
            return
        key = self.key(job)
        if len(deltas) == 1 and not first:  # one token per batch is the common case: no pipeline to build
            await self._redis.xadd(key, _entry(deltas[0]))
            return
        pipe = self._redis.pipeline(transaction=False)
        for delta in deltas:
            pipe.xadd(key, _entry(delta))
        if first:
            pipe.expire(key, LIVE_TTL_S)
        await pipe.execute()

    async def end(self, job: str, end: bytes) -> None:
        """Write the job's end; the stream then expires `ttl_s` later."""
        key = self.key(job)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(key, {"end": end})
        pipe.expire(key, self.ttl_s)
        await pipe.execute()

    async def exists(self, job: str) -> bool:
        return bool(await self._redis.exists(self.key(job)))

    @contextlib.asynccontextmanager
    async def following(self, job: str) -> AsyncIterator[None]:
        """Count this stream as a follower of `job` while it lasts (a job whose caller left lives on while
        someone follows it)."""
        key = f"{self._prefix}{job}:followers"
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, LIVE_TTL_S)
        await pipe.execute()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self._redis.decr(key)

    async def followers(self, job: str) -> int:
        return int(await self._redis.get(f"{self._prefix}{job}:followers") or 0)

    async def request_cancel(self, job: str, reason: str) -> None:
        """Ask every replica to cancel `job` if it runs there (one of them does)."""
        await self._redis.publish(self.cancel_channel, f"{job} {reason}")

    async def follow(self, job: str, from_offset: int = 0, *, tick_s: float = 1.0) -> AsyncIterator[Delta | End | None]:
        """Deltas from `from_offset` (a delta containing it is sent whole), then live ones, then the End.

        Yields None every `tick_s` while nothing arrives (the caller sends queue positions or keep-alives,
        or gives up). Waits for a stream that does not exist yet (a queued job). Ends after the End entry.
        """
        key = self.key(job)
        last_id = "0-0"
        # Replay what is there in bounded batches, then block for more.
        replaying = True
        # At most 2 s a block: redis-py 7 gives every read a 5 s socket timeout, blocking ones included.
        block_ms = min(2_000, max(1, int(tick_s * 1000)))
        while True:
            if replaying:
                low = f"({last_id}" if last_id != "0-0" else "-"
                entries = _entries(await self._redis.xrange(key, min=low, count=_REPLAY_BATCH))
                replaying = len(entries) == _REPLAY_BATCH
            else:
                answer: Any = await self._redis.xread({key: last_id}, block=block_ms, count=_REPLAY_BATCH)
                if not answer:
                    yield None
                    continue
                entries = _entries(answer[0][1])
            for entry_id, fields in entries:
                last_id = entry_id
                item = _parse(fields)
                if isinstance(item, End):
                    yield item
                    return
                if item.next_offset > from_offset:
                    yield item


def _entries(raw: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    """Stream entries as redis-py returns them (`decode_responses=False`), with text ids."""
    return [(entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields) for entry_id, fields in raw]


def _parse(fields: dict[bytes, bytes]) -> Delta | End:
    end = fields.get(b"end")
    if end is not None:
        return End(end)
    return Delta(text=fields[b"t"].decode(), offset=int(fields[b"o"]), token_count=int(fields[b"n"]))


class TokenWriter:
    """Appends one job's deltas in the background, in order, batching whatever accumulates meanwhile.

    `push` returns at once (the caller relays the delta to its client without waiting for Redis);
    `close` waits until everything pushed is written and then writes the End. A Redis error fails
    `close` (the job is then recorded from PostgreSQL alone; followers see the stream stop early).
    """

    def __init__(self, streams: TokenStreams, job: str) -> None:
        self._streams = streams
        self._job = job
        self._pending: list[Delta] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"tokens:{job}")

    def push(self, delta: Delta) -> None:
        if self._closing:
            raise RuntimeError("push after close")
        self._pending.append(delta)
        self._wake.set()

    async def _run(self) -> None:
        first = True
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                await self._streams.append(self._job, batch, first=first)
                first = False
            if self._closing and not self._pending:
                return

    async def close(self, end: bytes) -> None:
        """Flush what was pushed, then write the End."""
        self._closing = True
        self._wake.set()
        await self._task
        await self._streams.end(self._job, end)

    async def abort(self) -> None:
        """Stop writing without an End (the process is going away); what was pushed may be lost."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
