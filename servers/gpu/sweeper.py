"""The liveness sweeper: one replica at a time (a Redis lease) turns silent nodes UNHEALTHY, ends drains
whose grace period ran out, and prunes old telemetry history. A silent node is UNHEALTHY at most
4 report intervals after its last report (3 for its live key to expire, 1 for the next sweep; sweeps start
on a fixed schedule, so a sweep's own run time does not add up), plus up to 3 intervals when the sweeping
replica dies and another must wait for its lease to expire."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from redis.asyncio import Redis

from servers.common.db import Database
from servers.common.lease import Lease
from servers.gpu import convert
from servers.gpu.history import History
from servers.gpu.registry import NODES_TOPIC, Registry

log = structlog.get_logger("far.gpu.sweeper")
PRUNE_EVERY_S = 3600.0


class LivenessSweeper:
    def __init__(
        self,
        database: Database,
        registry: Registry,
        history: History,
        redis: Redis,
        key_prefix: str,
        *,
        interval_s: float,
    ) -> None:
        self._db = database
        self._registry = registry
        self._history = history
        self._redis = redis
        self._lease = Lease(redis, f"{key_prefix}gpu:sweeper", ttl_ms=int(interval_s * 3000))
        self._interval_s = interval_s
        self._pruned_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gpu-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._lease.release()

    async def _leading(self) -> bool:
        return await self._lease.held()

    async def sweep_once(self) -> int:
        """One pass; returns how many nodes changed."""
        async with self._db.transaction() as uow:
            changes = await self._registry.sweep(uow)
            for change in changes:
                uow.publish(NODES_TOPIC, convert.node(change.row))
        for change in changes:
            await self._registry.announce(change)
        if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
            await self._history.prune()
            self._pruned_at = time.monotonic()
        return len(changes)

    async def _run(self) -> None:
        next_sweep = time.monotonic()
        while True:
            try:
                if await self._leading():
                    await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("liveness sweep failed; retrying", exc_info=True)
            next_sweep = max(next_sweep + self._interval_s, time.monotonic())
            await asyncio.sleep(next_sweep - time.monotonic())
