"""The event bus: typed protobuf events on Redis Streams, consumed through consumer groups."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from redis.asyncio import Redis
from redis.exceptions import ResponseError

DEFAULT_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event read from a topic: its stream id, protobuf type name and serialized bytes."""

    topic: str
    id: str
    type: str
    data: bytes
    publish_time_ms: int
    event_id: str = ""
    """A publisher-assigned id that stays the same if the event is ever published twice (dedupe on it)."""

    def parse(self, message: Message) -> Message:
        """Fill `message` from the payload; the caller checks `type` first."""
        message.ParseFromString(self.data)
        return message


class EventBus:
    """Publishes to and reads from `<prefix>events:<topic>` streams.

    Delivery is at least once: a consumer acknowledges what it handled, and `claim_stale` hands
    events a dead consumer left pending to another one. Consumers dedupe by event id where it matters.
    """

    def __init__(self, redis: Redis, prefix: str, *, maxlen: int = DEFAULT_MAXLEN) -> None:
        self._redis = redis
        self._prefix = f"{prefix}events:"
        self._maxlen = maxlen

    def stream_key(self, topic: str) -> str:
        return self._prefix + topic

    async def publish(self, topic: str, event: Message, *, event_id: str = "") -> str:
        """Append an event; returns its stream id (`<ms>-<seq>`)."""
        return await self.publish_raw(topic, event.DESCRIPTOR.full_name, event.SerializeToString(), event_id=event_id)

    async def publish_raw(self, topic: str, type_name: str, data: bytes, *, event_id: str = "") -> str:
        """Append an already serialized event of protobuf type `type_name`; returns its stream id."""
        fields: dict[Any, Any] = {"type": type_name, "data": data, "time": int(time.time() * 1000)}
        if event_id:
            fields["eid"] = event_id
        stream_id = await self._redis.xadd(self.stream_key(topic), fields, maxlen=self._maxlen, approximate=True)
        return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)

    async def ensure_group(self, topic: str, group: str, *, start: str = "0") -> None:
        """Create a consumer group (and the stream) if it does not exist yet."""
        try:
            await self._redis.xgroup_create(self.stream_key(topic), group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _delivery(self, topic: str, event_id: bytes | str, fields: dict[bytes, bytes]) -> Delivery:
        return Delivery(
            topic=topic,
            id=event_id.decode() if isinstance(event_id, bytes) else event_id,
            type=fields[b"type"].decode(),
            data=fields[b"data"],
            publish_time_ms=int(fields.get(b"time", b"0")),
            event_id=fields.get(b"eid", b"").decode(),
        )

    async def read_group(
        self, topics: Sequence[str], group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[Delivery]:
        """New events for this consumer of `group` (blocks up to `block_ms` when there are none; 0 = not at all)."""
        streams: dict[Any, Any] = {self.stream_key(topic): ">" for topic in topics}
        # Redis reads BLOCK 0 as "wait forever", so 0 leaves BLOCK out.
        block = block_ms if block_ms > 0 else None
        reply: Any = await self._redis.xreadgroup(group, consumer, streams, count=count, block=block)
        deliveries: list[Delivery] = []
        for key, entries in reply or []:
            topic = (key.decode() if isinstance(key, bytes) else key)[len(self._prefix) :]
            deliveries.extend(self._delivery(topic, event_id, fields) for event_id, fields in entries if fields)
        return deliveries

    async def ack(self, group: str, *deliveries: Delivery) -> None:
        for delivery in deliveries:
            await self._redis.xack(self.stream_key(delivery.topic), group, delivery.id)

    async def claim_stale(
        self, topic: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 100
    ) -> list[Delivery]:
        """Take over events other consumers of `group` read but did not acknowledge for `min_idle_ms`."""
        reply: Any = await self._redis.xautoclaim(
            self.stream_key(topic), group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
        )
        entries = reply[1]
        return [self._delivery(topic, event_id, fields) for event_id, fields in entries if fields]

    async def read_range(self, topic: str, *, after: str = "-", count: int = 100) -> list[Delivery]:
        """Events of a topic in order, after the id `after` (exclusive), for history and replay."""
        start = after if after == "-" else f"({after}"
        entries: Any = await self._redis.xrange(self.stream_key(topic), min=start, count=count)
        return [self._delivery(topic, event_id, fields) for event_id, fields in entries]
