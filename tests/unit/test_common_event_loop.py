"""servers.common.event_loop: the loop `EVENT_LOOP` names is the one the coroutine runs on."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from servers.common import event_loop


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_uvloop_by_default() -> None:
    assert issubclass(event_loop.run(_loop_type()), uvloop.Loop)


def test_asyncio_on_request() -> None:
    kind = event_loop.run(_loop_type(), "asyncio")
    assert not issubclass(kind, uvloop.Loop)
    assert issubclass(kind, asyncio.BaseEventLoop)


def test_the_coroutine_result_and_errors_come_back() -> None:
    async def fail() -> None:
        raise LookupError("from the loop")

    with pytest.raises(LookupError, match="from the loop"):
        event_loop.run(fail(), "uvloop")


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        event_loop.loop_factory("trio")
