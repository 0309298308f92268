"""The GenerateResponse streams of Generate and StreamJob: `job` first, queue positions, deltas, `final` last.

Two sources feed them: the local listener of a job this replica runs for its own caller (no Redis on the
way), and the job's Redis token stream for everyone else (a job running on another replica, StreamJob, a
reconnecting client). Either way the stream ends with `final`, whose `next_offset` is what this stream
delivered, so a client resumes exactly where it stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from far.inference.v1 import inference_service_pb2, job_pb2
from google.rpc import code_pb2, error_details_pb2

from servers.inference.token_stream import Delta, End, TokenStreams
from servers.inference.triton_stream import Piece

Response = inference_service_pb2.GenerateResponse
POSITION_EVERY_S = 15.0


def delta(text: str, offset: int, token_count: int) -> Response:
    return Response(delta=inference_service_pb2.TokenDelta(text=text, offset=offset, token_count=token_count))


def final(end: inference_service_pb2.GenerateEnd, next_offset: int) -> Response:
    message = inference_service_pb2.GenerateEnd()
    message.CopyFrom(end)
    message.next_offset = next_offset
    return Response(final=message)


def interrupted(state: int, next_offset: int) -> Response:
    """The `final` of a stream that ends before its job (the server is shutting down): resume with StreamJob."""
    end = inference_service_pb2.GenerateEnd(state=job_pb2.Job.State.ValueType(state), next_offset=next_offset)
    end.error.code = code_pb2.UNAVAILABLE
    end.error.message = "the server is shutting down; resume the stream with StreamJob from next_offset"
    end.error.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="STREAM_INTERRUPTED", domain="inference.far.network")
    )
    return Response(final=end)


class Interrupt:
    """Put into a listener queue: end the stream now with an interrupted `final` (server shutdown)."""


async def from_listener(
    queue: asyncio.Queue[Piece | inference_service_pb2.GenerateEnd | Interrupt],
) -> AsyncIterator[Response]:
    """Deltas and `final` of a job running here, as its pieces arrive."""
    next_offset = 0
    while True:
        item = await queue.get()
        if isinstance(item, Piece):
            next_offset = item.offset + item.token_count
            yield delta(item.text, item.offset, item.token_count)
        elif isinstance(item, Interrupt):
            yield interrupted(job_pb2.Job.STATE_RUNNING, next_offset)
            return
        else:
            yield final(item, next_offset)
            return


async def from_token_stream(
    streams: TokenStreams,
    job_id: str,
    from_offset: int,
    *,
    position: Callable[[], Awaitable[int]],
    ended_without_stream: Callable[[], Awaitable[inference_service_pb2.GenerateEnd | None]],
    tick_s: float = 1.0,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[Response]:
    """Replay from `from_offset`, follow live, and end with `final`.

    On each idle tick (`tick_s`) the job's queue position is sent while it waits, when it changed or 15 s after
    the last one (which also keeps idle HTTP connections open), and `ended_without_stream` is asked whether
    the job ended without writing its stream (cancelled while queued, or its runner died): that end is `final`.
    """
    next_offset = from_offset
    last_position, last_sent = -1, 0.0
    async for item in streams.follow(job_id, from_offset, tick_s=tick_s):
        if stop is not None and stop.is_set():  # checked at least every tick
            yield interrupted(job_pb2.Job.STATE_RUNNING if next_offset else job_pb2.Job.STATE_QUEUED, next_offset)
            return
        if isinstance(item, Delta):
            next_offset = max(next_offset, item.next_offset)
            yield delta(item.text, item.offset, item.token_count)
        elif isinstance(item, End):
            yield final(inference_service_pb2.GenerateEnd.FromString(item.data), next_offset)
            return
        else:
            ended = await ended_without_stream()
            if ended is not None:
                yield final(ended, next_offset)
                return
            place = await position()
            now = time.monotonic()
            if place > 0 and (place != last_position or now - last_sent >= POSITION_EVERY_S):
                last_position, last_sent = place, now
                yield Response(queue_position=inference_service_pb2.QueuePosition(position=place))


def job_message(job: job_pb2.Job) -> Response:
    return Response(job=job)
