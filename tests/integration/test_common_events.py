"""servers.common.events.EventBus on the run's Redis: publish, history, consumer groups, ack, claims."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest
from google.protobuf import wrappers_pb2
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from servers.common.events import Delivery, EventBus

pytestmark = pytest.mark.integration

Text = wrappers_pb2.StringValue


@pytest.fixture
def topic() -> str:
    return f"test.{uuid.uuid4().hex[:12]}"


def texts(deliveries: list[Delivery]) -> list[str]:
    return [d.parse(Text()).value for d in deliveries]


class TestPublishAndReadRange:
    async def test_events_come_back_in_order_with_type_and_time(self, bus: EventBus, topic: str) -> None:
        before = int(time.time() * 1000)
        ids = [await bus.publish(topic, Text(value=f"e{i}")) for i in range(3)]
        assert all(re.fullmatch(r"\d+-\d+", event_id) for event_id in ids)
        deliveries = await bus.read_range(topic)
        assert [d.id for d in deliveries] == ids
        assert texts(deliveries) == ["e0", "e1", "e2"]
        assert {d.type for d in deliveries} == {"google.protobuf.StringValue"}
        assert {d.topic for d in deliveries} == {topic}
        assert all(before <= d.publish_time_ms <= int(time.time() * 1000) for d in deliveries)

    async def test_stream_key_uses_the_prefix(
        self, bus: EventBus, topic: str, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        await bus.publish(topic, Text(value="x"))
        assert bus.stream_key(topic) == f"{redis_key_prefix}events:{topic}"
        assert await redis_client.xlen(f"{redis_key_prefix}events:{topic}") == 1

    async def test_after_is_exclusive_and_count_limits(self, bus: EventBus, topic: str) -> None:
        ids = [await bus.publish(topic, Text(value=f"e{i}")) for i in range(4)]
        assert texts(await bus.read_range(topic, after=ids[0])) == ["e1", "e2", "e3"]
        assert texts(await bus.read_range(topic, after=ids[1], count=1)) == ["e2"]
        assert await bus.read_range(topic, after=ids[3]) == []

    async def test_unknown_topic_is_empty(self, bus: EventBus, topic: str) -> None:
        assert await bus.read_range(topic) == []


class TestConsumerGroups:
    async def test_ensure_group_is_idempotent_and_creates_the_stream(
        self, bus: EventBus, topic: str, redis_client: Redis
    ) -> None:
        await bus.ensure_group(topic, "g")
        await bus.ensure_group(topic, "g")
        groups = await redis_client.xinfo_groups(bus.stream_key(topic))
        assert [g["name"] for g in groups] == [b"g"]

    async def test_ensure_group_reports_other_errors(self, bus: EventBus, topic: str, redis_client: Redis) -> None:
        await redis_client.set(bus.stream_key(topic), b"not a stream")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await bus.ensure_group(topic, "g")

    async def test_group_from_zero_sees_earlier_events_once(self, bus: EventBus, topic: str) -> None:
        await bus.publish(topic, Text(value="early"))
        await bus.ensure_group(topic, "g")
        await bus.publish(topic, Text(value="late"))
        assert texts(await bus.read_group([topic], "g", "c1", block_ms=0)) == ["early", "late"]
        assert await bus.read_group([topic], "g", "c1", block_ms=0) == []

    async def test_group_from_dollar_sees_only_new_events(self, bus: EventBus, topic: str) -> None:
        await bus.publish(topic, Text(value="early"))
        await bus.ensure_group(topic, "g", start="$")
        await bus.publish(topic, Text(value="late"))
        assert texts(await bus.read_group([topic], "g", "c1", block_ms=0)) == ["late"]

    async def test_consumers_of_a_group_share_the_events(self, bus: EventBus, topic: str) -> None:
        await bus.ensure_group(topic, "g")
        for i in range(4):
            await bus.publish(topic, Text(value=f"e{i}"))
        first = await bus.read_group([topic], "g", "c1", count=3, block_ms=0)
        second = await bus.read_group([topic], "g", "c2", count=3, block_ms=0)
        assert (texts(first), texts(second)) == (["e0", "e1", "e2"], ["e3"])

    async def test_several_topics_in_one_read(self, bus: EventBus, topic: str) -> None:
        other = topic + ".other"
        for name in (topic, other):
            await bus.ensure_group(name, "g")
            await bus.publish(name, Text(value=name))
        deliveries = await bus.read_group([topic, other], "g", "c1", block_ms=0)
        assert sorted((d.topic, d.parse(Text()).value) for d in deliveries) == [(topic, topic), (other, other)]

    async def test_read_group_waits_for_block_ms_then_returns_nothing(self, bus: EventBus, topic: str) -> None:
        await bus.ensure_group(topic, "g")
        started = time.monotonic()
        assert await bus.read_group([topic], "g", "c1", block_ms=50) == []
        assert 0.04 <= time.monotonic() - started < 2

    async def test_block_ms_zero_does_not_block(self, bus: EventBus, topic: str) -> None:
        await bus.ensure_group(topic, "g")
        async with asyncio.timeout(2):
            assert await bus.read_group([topic], "g", "c1", block_ms=0) == []

    async def test_read_group_wakes_up_for_a_new_event(self, bus: EventBus, topic: str) -> None:
        await bus.ensure_group(topic, "g", start="$")
        reader = asyncio.create_task(bus.read_group([topic], "g", "c1", block_ms=5000))
        await asyncio.sleep(0.05)
        await bus.publish(topic, Text(value="wake"))
        async with asyncio.timeout(3):
            assert texts(await reader) == ["wake"]


class TestAckAndClaim:
    async def test_ack_clears_pending(self, bus: EventBus, topic: str, redis_client: Redis) -> None:
        await bus.ensure_group(topic, "g")
        await bus.publish(topic, Text(value="a"))
        await bus.publish(topic, Text(value="b"))
        deliveries = await bus.read_group([topic], "g", "c1", block_ms=0)
        assert (await redis_client.xpending(bus.stream_key(topic), "g"))["pending"] == 2
        await bus.ack("g", *deliveries)
        assert (await redis_client.xpending(bus.stream_key(topic), "g"))["pending"] == 0

    async def test_another_consumer_claims_what_a_dead_one_left_pending(
        self, bus: EventBus, topic: str, redis_client: Redis
    ) -> None:
        await bus.ensure_group(topic, "g")
        await bus.publish(topic, Text(value="handled"))
        await bus.publish(topic, Text(value="orphaned"))
        handled, orphaned = await bus.read_group([topic], "g", "dead", block_ms=0)
        await bus.ack("g", handled)

        assert await bus.claim_stale(topic, "g", "alive", min_idle_ms=60_000) == []
        await asyncio.sleep(0.06)
        claimed = await bus.claim_stale(topic, "g", "alive", min_idle_ms=50)
        assert [(d.id, d.topic, d.type) for d in claimed] == [(orphaned.id, topic, orphaned.type)]
        assert texts(claimed) == ["orphaned"]

        pending = await redis_client.xpending_range(bus.stream_key(topic), "g", min="-", max="+", count=10)
        assert [(p["message_id"].decode(), p["consumer"]) for p in pending] == [(orphaned.id, b"alive")]
        await bus.ack("g", *claimed)
        assert (await redis_client.xpending(bus.stream_key(topic), "g"))["pending"] == 0
        assert await bus.claim_stale(topic, "g", "alive", min_idle_ms=0) == []
