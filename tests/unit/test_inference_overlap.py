"""`overlapped`: a check that runs beside the work it guards (a prompt count beside a payment verification)."""

from __future__ import annotations

import asyncio

import pytest

from servers.inference.overlap import overlapped


class Refused(Exception):
    pass


async def after(seconds: float, value: object = None, error: Exception | None = None) -> object:
    await asyncio.sleep(seconds)
    if error is not None:
        raise error
    return value


async def test_the_work_result_once_both_passed() -> None:
    assert await overlapped(after(0.02, "paid"), after(0.05, 12)) == "paid"


async def test_a_failed_check_is_raised_at_once_and_cancels_the_work() -> None:
    work = asyncio.ensure_future(after(10, "paid"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Refused):
        await overlapped(work, after(0.01, error=Refused()))
    assert loop.time() - started < 1  # not after the work's 10 s
    assert work.cancelled()


async def test_a_failed_work_cancels_the_check() -> None:
    check = asyncio.ensure_future(after(10))
    with pytest.raises(Refused):
        await overlapped(after(0.01, error=Refused()), check)
    assert check.cancelled()


async def test_cancelling_the_caller_cancels_both() -> None:
    work, check = asyncio.ensure_future(after(10)), asyncio.ensure_future(after(10))
    caller = asyncio.ensure_future(overlapped(work, check))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert work.cancelled()
    assert check.cancelled()
