"""The event loop every FAR process runs on: uvloop by default, asyncio's own with `EVENT_LOOP=asyncio`.

uvloop (libuv) takes less CPU per call than asyncio's selector loop: on the inference bench the server spent
~20% less CPU per relayed token and reached the model ~0.15 ms sooner per call (bench/RESULTS.md). grpc.aio,
asyncpg and redis-py run on either loop; `EVENT_LOOP=asyncio` is the fallback if a library ever misbehaves on
uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP = "uvloop"

T = TypeVar("T")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop function for `EVENT_LOOP` (one of EVENT_LOOPS)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown event loop {name!r}: one of {', '.join(EVENT_LOOPS)}")


def run(main: Coroutine[Any, Any, T], event_loop: str = DEFAULT_EVENT_LOOP) -> T:
    """`asyncio.run(main)` on the named loop."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        return runner.run(main)
