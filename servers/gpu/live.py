"""Live node state in Redis: what FindServingNodes and the liveness sweeper read, never a PostgreSQL scan.

<prefix>gpu:live:<node>      the last accepted report's serving figures; expires 3 report intervals
                             after it was written, so a silent node's key disappears by itself
<prefix>gpu:node:<node>      the node's registry fields inference needs (state, endpoint, region),
                             written after every committed change and refreshed with every report
<prefix>gpu:serving:<model>  the ids of nodes whose last report had the model READY
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from servers.gpu.models import NodeRow
from servers.gpu.reports import ReportSummary

STATE_HEALTHY = 2
MAX_REPORT_AGE_S = 30.0


@dataclass(frozen=True)
class ServingCandidate:
    node_id: str
    endpoint: str
    endpoint_tls: bool
    region: str
    version: int
    active_requests: int
    pending_requests: int
    free_memory_bytes: int
    gpu_utilization_percent: float
    report_time_ms: int

    @property
    def load(self) -> int:
        return self.active_requests + self.pending_requests


def _meta(row: NodeRow) -> bytes:
    return json.dumps(
        {"state": row.state, "endpoint": row.endpoint, "tls": row.endpoint_tls, "region": row.region}
    ).encode()


class LiveState:
    def __init__(self, redis: Redis, key_prefix: str, *, ttl_s: float) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}gpu:"
        self._ttl_ms = max(1, int(ttl_s * 1000))

    def _live(self, node_id: str) -> str:
        return f"{self._prefix}live:{node_id}"

    def _node(self, node_id: str) -> str:
        return f"{self._prefix}node:{node_id}"

    def _serving(self, model: str) -> str:
        return f"{self._prefix}serving:{model}"

    async def write_report(self, row: NodeRow, summary: ReportSummary, previously_ready: Iterable[str]) -> None:
        """Record an accepted report: the live key (with a fresh TTL), the node's fields, the serving sets."""
        live = {
            "t": int(summary.received_time.timestamp() * 1000),
            "models": [[m.model, m.version, m.active_requests, m.pending_requests] for m in summary.ready],
            "free": summary.max_free_memory_bytes or 0,
            "util": summary.mean_gpu_utilization,
            "ok": summary.healthy,
        }
        ready = set(summary.ready_model_names)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._live(row.id), json.dumps(live).encode(), px=self._ttl_ms)
            pipe.set(self._node(row.id), _meta(row))
            for model in ready:
                pipe.sadd(self._serving(model), row.id)
            for model in set(previously_ready) - ready:
                pipe.srem(self._serving(model), row.id)
            await pipe.execute()

    async def write_node(self, row: NodeRow) -> None:
        """The node's registry fields after a committed change (drain, deregister, a new endpoint...)."""
        await self._redis.set(self._node(row.id), _meta(row))

    async def forget(self, node_id: str, ready_models: Iterable[str]) -> None:
        """Drop a node's live report and serving entries (deregistered: its reports no longer count)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._live(node_id))
            for model in ready_models:
                pipe.srem(self._serving(model), node_id)
            await pipe.execute()

    async def live_health(self, node_ids: Sequence[str]) -> dict[str, bool]:
        """The nodes that reported within the liveness window (their live key still exists), each with
        whether that last report was healthy."""
        if not node_ids:
            return {}
        values = await self._redis.mget([self._live(node_id) for node_id in node_ids])
        return {
            node_id: bool(json.loads(value)["ok"])
            for node_id, value in zip(node_ids, values, strict=True)
            if value is not None
        }

    async def find_serving(
        self, model: str, *, version: int, region: str, min_free_memory_bytes: int, limit: int
    ) -> list[ServingCandidate]:
        """HEALTHY nodes with a fresh report that has the model READY, least loaded first."""
        raw_members = await self._redis.smembers(self._serving(model))
        members = sorted(m.decode() if isinstance(m, bytes) else m for m in raw_members)
        if not members:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.mget([self._live(node_id) for node_id in members])
            pipe.mget([self._node(node_id) for node_id in members])
            lives, metas = await pipe.execute()
        oldest_ms = int((time.time() - MAX_REPORT_AGE_S) * 1000)
        found = []
        for node_id, raw_live, raw_meta in zip(members, lives, metas, strict=True):
            if raw_live is None or raw_meta is None:
                continue
            live: dict[str, Any] = json.loads(raw_live)
            meta: dict[str, Any] = json.loads(raw_meta)
            if meta["state"] != STATE_HEALTHY or live["t"] < oldest_ms:
                continue
            if region and meta["region"] != region:
                continue
            if live["free"] < min_free_memory_bytes:
                continue
            versions = [entry for entry in live["models"] if entry[0] == model and (not version or entry[1] == version)]
            if not versions:
                continue
            _, best_version, active, pending = max(versions, key=lambda entry: entry[1])
            found.append(
                ServingCandidate(
                    node_id=node_id,
                    endpoint=meta["endpoint"],
                    endpoint_tls=meta["tls"],
                    region=meta["region"],
                    version=best_version,
                    active_requests=active,
                    pending_requests=pending,
                    free_memory_bytes=live["free"],
                    gpu_utilization_percent=live["util"],
                    report_time_ms=live["t"],
                )
            )
        found.sort(key=lambda c: (c.load, c.gpu_utilization_percent, -c.free_memory_bytes, c.node_id))
        return found[:limit]
