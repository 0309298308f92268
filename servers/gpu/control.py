"""The control channel that reaches a node's telemetry stream on whichever replica holds it.

Every replica pattern-subscribes to `<prefix>gpu:control:*` once; a message for a node is handed to
the streams of that node open in this process. Control messages are notices, never the data itself:
a stream that hears `placement` reads the placement from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

log = structlog.get_logger("far.gpu.control")

PLACEMENT = "placement"
DRAIN = "drain"
DEREGISTERED = "deregistered"
OPENED = "opened"  # a stream of the node opened (older streams end as SUPERSEDED)
SHUTDOWN = "shutdown"  # local only: this process is stopping


@dataclass(frozen=True)
class Notice:
    kind: str
    stream_seq: int = 0
    """For OPENED: the new stream's number (per node, increasing); streams with a lower number end."""


class ControlHub:
    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}gpu:control:"
        self._streams: dict[str, dict[str, asyncio.Queue[Any]]] = defaultdict(dict)
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="gpu-control")
        async with asyncio.timeout(10):
            await self._subscribed.wait()

    async def stop(self) -> None:
        self.shutdown_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def shutdown_streams(self) -> None:
        """Tell every stream of this process that the service is stopping (they end SERVER_SHUTDOWN)."""
        for queues in self._streams.values():
            for queue in queues.values():
                queue.put_nowait(Notice(SHUTDOWN))

    async def drain_streams(self, timeout_s: float = 2.0) -> bool:
        """End every stream of this process with SERVER_SHUTDOWN and wait until they are gone (at most
        `timeout_s`): the hook to run when the server starts draining, before it waits for running calls.
        Returns whether every stream ended in time."""
        self.shutdown_streams()
        try:
            async with asyncio.timeout(timeout_s):
                await self._no_streams.wait()
        except TimeoutError:
            return False
        return True

    async def send(self, node_id: str, kind: str, *, stream_seq: int = 0) -> None:
        """Notify the node's stream, on any replica."""
        message = {"kind": kind, "seq": stream_seq}
        await self._redis.publish(self._prefix + node_id, json.dumps(message))

    async def next_stream_seq(self, node_id: str) -> int:
        """A number for a new stream of the node, higher than every earlier one's."""
        return int(await self._redis.incr(f"{self._prefix}seq:{node_id}"))

    def attach(self, node_id: str, stream_id: str) -> asyncio.Queue[Any]:
        """The queue the node's notices arrive on; the stream may put its own items in it too."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[node_id][stream_id] = queue
        self._no_streams.clear()
        return queue

    def detach(self, node_id: str, stream_id: str) -> None:
        queues = self._streams.get(node_id)
        if queues is not None:
            queues.pop(stream_id, None)
            if not queues:
                del self._streams[node_id]
        if not self._streams:
            self._no_streams.set()

    def _dispatch(self, channel: str, data: dict[str, Any]) -> None:
        node_id = channel[len(self._prefix) :]
        for queue in list(self._streams.get(node_id, {}).values()):
            queue.put_nowait(Notice(str(data.get("kind", "")), int(data.get("seq", 0))))

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.psubscribe(self._prefix + "*")
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                    self._dispatch(channel, json.loads(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("control channel lost; resubscribing", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis 8.2
