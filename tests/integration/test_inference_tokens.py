"""The per-job token streams in Redis: ordered appends, replay from any offset, live follow, end, expiry."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from servers.inference.token_stream import Delta, End, TokenStreams, TokenWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def streams(redis_client: Redis, redis_key_prefix: str) -> TokenStreams:
    return TokenStreams(redis_client, redis_key_prefix, ttl_s=120)


DELTAS = [Delta("Hel", 0, 1), Delta("lo", 1, 1), Delta(", wor", 2, 2), Delta("ld", 4, 1)]


async def collect(streams: TokenStreams, job: str, from_offset: int = 0) -> list[Delta | End]:
    """Everything the follower yields but the idle ticks (None)."""
    items: list[Delta | End] = []
    async for item in streams.follow(job, from_offset, tick_s=0.05):
        if item is not None:
            items.append(item)
    return items


async def test_replay_from_zero_returns_every_delta_then_the_end(streams: TokenStreams) -> None:
    await streams.append("j1", DELTAS)
    await streams.end("j1", b"the-end")
    assert await collect(streams, "j1") == [*DELTAS, End(b"the-end")]


@pytest.mark.parametrize(
    ("from_offset", "first"),
    [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4)],  # offset 3 is inside the ", wor" delta: it is replayed whole
)
async def test_resume_skips_what_was_seen_and_repeats_nothing(
    streams: TokenStreams, from_offset: int, first: int
) -> None:
    await streams.append("j2", DELTAS)
    await streams.end("j2", b"e")
    assert await collect(streams, "j2", from_offset) == [*DELTAS[first:], End(b"e")]


async def test_ttl_is_the_ended_horizon(streams: TokenStreams, redis_client: Redis) -> None:
    await streams.append("j3", DELTAS[:1])
    assert await redis_client.ttl(streams.key("j3")) > 120  # live: the longer expiry
    await streams.end("j3", b"e")
    assert 0 < await redis_client.ttl(streams.key("j3")) <= 120


async def test_a_writer_keeps_the_live_expiry_across_batches(streams: TokenStreams, redis_client: Redis) -> None:
    writer = TokenWriter(streams, "j8")
    key = streams.key("j8")
    for count, delta in enumerate(DELTAS, start=1):
        writer.push(delta)  # one batch each: the first sets the expiry, the later ones only add
        for _ in range(200):
            if await redis_client.xlen(key) == count:
                break
            await asyncio.sleep(0.005)
        assert await redis_client.xlen(key) == count
        assert await redis_client.ttl(key) > 120  # the live expiry, kept by every later XADD
    await writer.close(b"e")
    assert 0 < await redis_client.ttl(key) <= 120
    assert await collect(streams, "j8") == [*DELTAS, End(b"e")]


async def test_a_follower_waits_for_a_job_that_has_not_started(streams: TokenStreams) -> None:
    follower = asyncio.create_task(collect(streams, "j4"))
    await asyncio.sleep(0.1)
    assert not follower.done()
    writer = TokenWriter(streams, "j4")
    for delta in DELTAS:
        writer.push(delta)
    await writer.close(b"done")
    async with asyncio.timeout(5):
        assert await follower == [*DELTAS, End(b"done")]


async def test_idle_followers_get_ticks(streams: TokenStreams) -> None:
    ticks = 0
    async for item in streams.follow("j5", tick_s=0.02):
        assert item is None
        ticks += 1
        if ticks == 3:
            break
    assert ticks == 3
    assert not await streams.exists("j5")


async def test_writer_keeps_order_across_batches_and_many_followers_see_the_same(streams: TokenStreams) -> None:
    deltas = [Delta(f"t{i} ", i, 1) for i in range(300)]
    followers = [asyncio.create_task(collect(streams, "j6", start)) for start in (0, 0, 150)]
    writer = TokenWriter(streams, "j6")
    for index, delta in enumerate(deltas):
        writer.push(delta)
        if index % 37 == 0:
            await asyncio.sleep(0)  # let the writer flush partial batches
    await writer.close(b"end")
    async with asyncio.timeout(10):
        first, second, late = await asyncio.gather(*followers)
    assert first == second == [*deltas, End(b"end")]
    assert late == [*deltas[150:], End(b"end")]
    assert "".join(d.text for d in first if isinstance(d, Delta)) == "".join(f"t{i} " for i in range(300))


async def test_push_after_close_is_a_bug(streams: TokenStreams) -> None:
    writer = TokenWriter(streams, "j7")
    await writer.close(b"e")
    with pytest.raises(RuntimeError):
        writer.push(Delta("x", 0, 1))
