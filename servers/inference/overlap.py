"""Two awaitables at once, where one is a check that must pass before the other's result counts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def overlapped(work: Awaitable[T], check: Awaitable[object]) -> T:
    """`work`'s result once `check` has passed too. Both run at once; the first failure is raised at once (the
    check's, if both have failed by then) and cancels the other."""
    working, checking = asyncio.ensure_future(work), asyncio.ensure_future(check)
    try:
        done, _ = await asyncio.wait((working, checking), return_when=asyncio.FIRST_EXCEPTION)
        for task in (checking, working):
            error = task.exception() if task in done else None
            if error is not None:
                raise error
        return working.result()
    finally:
        for task in (working, checking):
            task.cancel()  # a no-op for a task that is done
        await asyncio.gather(working, checking, return_exceptions=True)
