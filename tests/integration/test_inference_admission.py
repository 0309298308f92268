"""The admission queue on real Redis: bounds, per-account limits, positions, and exactly-once claiming."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from servers.common.errors import ResourceExhausted
from servers.inference.admission import Admission, JobsWaiting, Limits

pytestmark = pytest.mark.integration

MODEL = "m1"


@pytest.fixture
async def admission(redis_client: Redis, redis_key_prefix: str, request: pytest.FixtureRequest) -> Admission:
    # Each test its own key space: the queue key is per model, so name the model space by test.
    queues = Admission(
        redis_client, f"{redis_key_prefix}{request.node.name}:", Limits(max_queue=3, max_unfinished_per_account=2)
    )
    await queues.ensure_group(MODEL)
    return queues


async def test_positions_count_the_jobs_ahead(admission: Admission) -> None:
    tickets = [await admission.admit(MODEL, f"j{i}", f"owner{i}") for i in range(3)]
    assert [t.position for t in tickets] == [1, 2, 3]
    assert [await admission.position(t) for t in tickets] == [1, 2, 3]
    assert await admission.take(MODEL, "d1", block_ms=100) == "j0"
    assert [await admission.position(t) for t in tickets] == [0, 1, 2]


async def test_a_full_queue_refuses_with_retry_info(admission: Admission) -> None:
    for i in range(3):
        await admission.admit(MODEL, f"j{i}", f"owner{i}")
    with pytest.raises(ResourceExhausted) as caught:
        await admission.admit(MODEL, "j3", "owner3")
    assert caught.value.reason == "QUEUE_FULL"
    assert caught.value.retry_after_s
    assert await admission.take(MODEL, "d1", block_ms=100) == "j0"
    assert (await admission.admit(MODEL, "j3", "owner3")).position == 3  # room again


async def test_an_account_may_have_only_so_many_unfinished_jobs(admission: Admission) -> None:
    await admission.admit(MODEL, "a1", "alice")
    await admission.admit(MODEL, "a2", "alice")
    with pytest.raises(ResourceExhausted) as caught:
        await admission.admit(MODEL, "a3", "alice")
    assert caught.value.reason == "TOO_MANY_JOBS"
    assert await admission.length(MODEL) == 2  # the refused job was not queued
    await admission.release("a1", "alice")
    await admission.admit(MODEL, "a3", "alice")


async def test_a_start_at_once_yields_to_waiting_jobs_and_counts_nothing(admission: Admission) -> None:
    started = await admission.admit(MODEL, "s1", "alice", queued=False)
    assert (started.entry, started.position) == ("", 0)
    assert await admission.length(MODEL) == 0  # a start at once takes no queue entry
    waiting = await admission.admit(MODEL, "w1", "bob")
    with pytest.raises(JobsWaiting):
        await admission.admit(MODEL, "s2", "alice", queued=False)
    # The refusal counted nothing: alice has one unfinished job of her two, so one more may queue, not two.
    assert (await admission.admit(MODEL, "s2", "alice")).position == 2
    with pytest.raises(ResourceExhausted) as caught:
        await admission.admit(MODEL, "s3", "alice", queued=False)
    assert caught.value.reason == "TOO_MANY_JOBS"  # the account's limit comes first
    assert await admission.take(MODEL, "d1", block_ms=100) == waiting.job
    assert await admission.take(MODEL, "d1", block_ms=100) == "s2"
    assert (await admission.admit(MODEL, "b2", "bob", queued=False)).position == 0  # nobody waits: at once


async def test_entries_of_a_crashed_replica_age_out(admission: Admission) -> None:
    now = 1_000_000.0
    await admission.admit(MODEL, "a1", "alice", now=now)
    await admission.admit(MODEL, "a2", "alice", now=now)
    await admission.take(MODEL, "d1", block_ms=100)
    await admission.take(MODEL, "d1", block_ms=100)
    later = now + admission.limits.job_timeout_s + 1
    assert (await admission.admit(MODEL, "a3", "alice", now=later)).position == 1


async def test_claim_and_take_race_for_a_job_and_exactly_one_wins(admission: Admission) -> None:
    for round_ in range(20):
        ticket = await admission.admit(MODEL, f"r{round_}", f"o{round_}")
        claimed, taken = await asyncio.gather(admission.claim(ticket), admission.take(MODEL, "d1", block_ms=50))
        assert claimed != (taken == ticket.job), (claimed, taken)
        assert await admission.position(ticket) == 0
        await admission.release(ticket.job, f"o{round_}")
    assert await admission.length(MODEL) == 0


async def test_dispatchers_share_the_queue_in_order_without_duplicates(admission: Admission) -> None:
    admission.limits = Limits(max_queue=100, max_unfinished_per_account=100)
    jobs = [f"j{i:02d}" for i in range(30)]
    for job in jobs:
        await admission.admit(MODEL, job, "bob")
    won: list[str] = []

    async def dispatcher(name: str) -> None:
        while (job := await admission.take(MODEL, name, block_ms=50)) is not None:
            won.append(job)

    await asyncio.gather(dispatcher("d1"), dispatcher("d2"), dispatcher("d3"))
    assert sorted(won) == jobs
    assert await admission.take(MODEL, "d1", block_ms=10) is None


async def test_a_job_read_by_a_dispatcher_that_died_is_taken_over(admission: Admission) -> None:
    admission.limits = Limits(max_queue=3, max_unfinished_per_account=3, reclaim_after_s=0.3)
    first = await admission.admit(MODEL, "orphan", "carol")
    await admission.admit(MODEL, "next", "carol")
    read = await admission.read(MODEL, "dead", block_ms=100)  # read, then its replica dies before the claim
    assert read is not None
    assert (read.job, read.entry) == ("orphan", first.entry)
    # While it may still be waiting for a slot, the entry is its reader's: others get the next job.
    assert await admission.take(MODEL, "alive", block_ms=100) == "next"
    assert await admission.take(MODEL, "alive", block_ms=100) is None
    assert await admission.position(first) == 1  # still waiting, still counted
    await asyncio.sleep(0.4)
    assert await admission.take(MODEL, "alive", block_ms=100) == "orphan"
    assert await admission.position(first) == 0
    assert await admission.length(MODEL) == 0
    # The dead reader's claim (had it only been slow) now loses: the job runs once.
    assert not await admission.claim(read)


async def test_a_withdrawn_entry_is_not_taken_over(admission: Admission) -> None:
    admission.limits = Limits(max_queue=3, max_unfinished_per_account=3, reclaim_after_s=0.1)
    ticket = await admission.admit(MODEL, "gone", "dave")
    assert await admission.read(MODEL, "dead", block_ms=100) is not None
    assert await admission.withdraw(ticket, "dave")  # cancelled while its reader waited
    await asyncio.sleep(0.2)
    assert await admission.take(MODEL, "alive", block_ms=100) is None
