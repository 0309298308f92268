"""Sign-in challenges in Redis: one key per nonce, removed by its first reader (GETDEL), gone at expiry.

Keys: `<prefix>auth:challenge:<nonce>` (JSON of the challenge, TTL until its expiry) and
`<prefix>auth:challenge-rate:<wallet>:<minute>` (challenges issued to a wallet in one clock minute).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis


@dataclass(frozen=True)
class Challenge:
    """An issued challenge: the exact message text and the values written into it."""

    nonce: str
    wallet: str
    domain: str
    uri: str
    chain_id: int
    message: str
    issue_time: datetime
    expire_time: datetime

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "nonce": self.nonce,
                "wallet": self.wallet,
                "domain": self.domain,
                "uri": self.uri,
                "chain_id": self.chain_id,
                "message": self.message,
                "issue_time": self.issue_time.isoformat(),
                "expire_time": self.expire_time.isoformat(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Challenge:
        fields = json.loads(data)
        return cls(
            nonce=fields["nonce"],
            wallet=fields["wallet"],
            domain=fields["domain"],
            uri=fields["uri"],
            chain_id=int(fields["chain_id"]),
            message=fields["message"],
            issue_time=datetime.fromisoformat(fields["issue_time"]),
            expire_time=datetime.fromisoformat(fields["expire_time"]),
        )


class ChallengeStore:
    """Keeps challenges until they expire and hands each one out once."""

    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}auth:"

    def _key(self, nonce: str) -> str:
        return f"{self._prefix}challenge:{nonce}"

    async def put(self, challenge: Challenge, *, now: datetime) -> bool:
        """Store the challenge until its expiry; False if the nonce is taken (never in practice: 95 random bits)."""
        ttl_ms = max(1, math.ceil((challenge.expire_time - now).total_seconds() * 1000))
        stored = await self._redis.set(self._key(challenge.nonce), challenge.to_json(), px=ttl_ms, nx=True)
        return bool(stored)

    async def take(self, nonce: str) -> Challenge | None:
        """The challenge of `nonce`, removed in the same step: of concurrent callers, only one gets it."""
        data = await self._redis.getdel(self._key(nonce))
        return None if data is None else Challenge.from_json(data)

    async def count_issue(self, wallet: str, *, now: datetime, limit: int) -> float | None:
        """Count one challenge for `wallet` in the current minute; the seconds to wait when over `limit`."""
        minute = int(now.timestamp()) // 60
        key = f"{self._prefix}challenge-rate:{wallet}:{minute}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = await pipe.execute()
        if int(count) <= limit:
            return None
        return float((minute + 1) * 60 - now.timestamp())
