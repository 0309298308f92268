"""A Redis lease: one replica at a time does a periodic chore (a sweeper), and another takes over when it stops.

`Lease.held()` takes the lease when it is free and extends it when it is ours, in one atomic step; the lease
lapses by itself `ttl_ms` after its holder last extended it (a crashed holder), and `release()` hands it back
at once on a clean stop.
"""

from __future__ import annotations

import contextlib
import uuid

from redis.asyncio import Redis

_TAKE_OR_EXTEND = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class Lease:
    def __init__(self, redis: Redis, key: str, *, ttl_ms: int) -> None:
        self._redis = redis
        self.key = key
        self._ttl_ms = ttl_ms
        self.holder = uuid.uuid4().hex

    async def held(self) -> bool:
        """Whether this replica holds the lease now (taking or extending it)."""
        return bool(await self._redis.eval(_TAKE_OR_EXTEND, 1, self.key, self.holder, self._ttl_ms))

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            if await self._redis.get(self.key) == self.holder.encode():
                await self._redis.delete(self.key)
