"""far.gpu.v1.GpuService: proto in, registry call, proto out. Events and notices go out after the commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, node_pb2

from servers.common.context import current_principal
from servers.common.db import Database
from servers.common.errors import InvalidArgument
from servers.common.fieldmask import update_paths
from servers.common.pagination import page_size
from servers.gpu import convert
from servers.gpu.history import History, HistoryQuery
from servers.gpu.live import LiveState
from servers.gpu.registration import RegistrationProof
from servers.gpu.registry import (
    NODES_TOPIC,
    UPDATABLE_NODE_FIELDS,
    Change,
    Inventory,
    NodeListQuery,
    Placement,
    Registry,
)
from servers.gpu.streams import TelemetryStreams

Context = grpc.aio.ServicerContext[Any, Any]
MAX_SERVING_RESULTS = 50


def _inventory(node: node_pb2.Node) -> Inventory:
    return Inventory(
        endpoint=node.endpoint,
        endpoint_tls=node.endpoint_tls,
        region=node.region,
        labels=tuple(sorted(node.labels.items())),
        gpus=tuple((g.model_name, g.memory_bytes, g.count) for g in node.gpus),
        cpu_cores=node.cpu_cores,
        memory_bytes=node.memory_bytes,
    )


def _proof(request: gpu_service_pb2.RegisterNodeRequest) -> RegistrationProof:
    missing = [f for f in ("issue_time", "expire_time") if not request.HasField(f)]
    if missing:
        raise InvalidArgument.field(missing[0], "is required")
    return RegistrationProof(
        node_id=request.node_id,
        endpoint=request.node.endpoint,
        operator=request.operator,
        chain_id=request.chain_id,
        nonce=request.nonce,
        issue_time=request.issue_time.ToDatetime(tzinfo=UTC),
        expire_time=request.expire_time.ToDatetime(tzinfo=UTC),
        signature=request.signature,
    )


class GpuServicer(gpu_service_pb2_grpc.GpuServiceServicer):
    def __init__(
        self, database: Database, registry: Registry, live: LiveState, history: History, streams: TelemetryStreams
    ) -> None:
        self._db = database
        self._registry = registry
        self._live = live
        self._history = history
        self._streams = streams

    async def _commit(self, change: Change) -> node_pb2.Node:
        await self._registry.announce(change)
        return convert.node(change.row)

    async def RegisterNode(
        self, request: gpu_service_pb2.RegisterNodeRequest, context: Context
    ) -> gpu_service_pb2.RegisterNodeResponse:
        proof = _proof(request)
        async with self._db.transaction() as uow:
            change, token = await self._registry.register(uow, request.node_id, _inventory(request.node), proof)
            node = convert.node(change.row)
            uow.publish(NODES_TOPIC, node)
        await self._registry.announce(change)
        return gpu_service_pb2.RegisterNodeResponse(node=node, agent_token=token)

    async def GetNode(self, request: gpu_service_pb2.GetNodeRequest, context: Context) -> node_pb2.Node:
        async with self._db.read() as uow:
            return convert.node(await self._registry.get(uow, current_principal(), request.name))

    async def ListNodes(
        self, request: gpu_service_pb2.ListNodesRequest, context: Context
    ) -> gpu_service_pb2.ListNodesResponse:
        query = NodeListQuery(
            page_size=request.page_size,
            page_token=request.page_token,
            states=tuple(request.states),
            operator=request.operator,
            region=request.region,
            gpu_model=request.gpu_model,
            loaded_model=request.loaded_model,
            min_free_memory_bytes=request.min_free_memory_bytes,
            labels=tuple(request.labels),
        )
        async with self._db.read() as uow:
            rows, token = await self._registry.list_nodes(uow, current_principal(), query)
        return gpu_service_pb2.ListNodesResponse(nodes=[convert.node(r) for r in rows], next_page_token=token)

    async def UpdateNode(self, request: gpu_service_pb2.UpdateNodeRequest, context: Context) -> node_pb2.Node:
        paths = update_paths(request.update_mask, request.node, updatable=UPDATABLE_NODE_FIELDS)
        async with self._db.transaction() as uow:
            change = await self._registry.update(
                uow,
                current_principal(),
                request.node.name,
                request.node.region,
                tuple(sorted(request.node.labels.items())),
                paths,
                request.node.etag,
            )
            if change.changed:
                uow.publish(NODES_TOPIC, convert.node(change.row))
        return await self._commit(change)

    async def DrainNode(self, request: gpu_service_pb2.DrainNodeRequest, context: Context) -> node_pb2.Node:
        grace = request.grace_period.ToTimedelta() if request.HasField("grace_period") else None
        async with self._db.transaction() as uow:
            change = await self._registry.drain(uow, current_principal(), request.name, request.reason, grace)
            if change.changed:
                uow.publish(NODES_TOPIC, convert.node(change.row))
        return await self._commit(change)

    async def ResumeNode(self, request: gpu_service_pb2.ResumeNodeRequest, context: Context) -> node_pb2.Node:
        async with self._db.transaction() as uow:
            change = await self._registry.resume(uow, current_principal(), request.name)
            uow.publish(NODES_TOPIC, convert.node(change.row))
        return await self._commit(change)

    async def DeregisterNode(self, request: gpu_service_pb2.DeregisterNodeRequest, context: Context) -> node_pb2.Node:
        async with self._db.transaction() as uow:
            change = await self._registry.deregister(uow, current_principal(), request.name, force=request.force)
            if change.changed:
                uow.publish(NODES_TOPIC, convert.node(change.row))
        return await self._commit(change)

    async def SetModelPlacement(
        self, request: gpu_service_pb2.SetModelPlacementRequest, context: Context
    ) -> node_pb2.Node:
        models = [Placement(m.model, m.version) for m in request.models]
        async with self._db.transaction() as uow:
            change = await self._registry.set_placement(uow, current_principal(), request.name, models, request.etag)
            if change.changed:
                uow.publish(NODES_TOPIC, convert.node(change.row))
        return await self._commit(change)

    async def StreamTelemetry(
        self, request_iterator: AsyncIterator[gpu_service_pb2.StreamTelemetryRequest], context: Context
    ) -> AsyncIterator[gpu_service_pb2.NodeInstruction]:
        async for instruction in self._streams.run(current_principal(), request_iterator):
            yield instruction

    async def QueryTelemetry(
        self, request: gpu_service_pb2.QueryTelemetryRequest, context: Context
    ) -> gpu_service_pb2.QueryTelemetryResponse:
        async with self._db.read() as uow:
            row = await self._registry.get(uow, current_principal(), request.name)
        query = HistoryQuery(
            start=request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None,
            end=request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None,
            metrics=tuple(request.metrics),
            interval=request.interval.ToTimedelta() if request.HasField("interval") else None,
            aggregation=request.aggregation,
            gpu_indexes=tuple(request.gpu_indexes),
            models=tuple(request.models),
        )
        series, interval_s = await self._history.query(row.id, query)
        return gpu_service_pb2.QueryTelemetryResponse(
            series=[convert.time_series(s) for s in series], interval=convert.duration_s(interval_s)
        )

    async def FindServingNodes(
        self, request: gpu_service_pb2.FindServingNodesRequest, context: Context
    ) -> gpu_service_pb2.FindServingNodesResponse:
        if not request.model:
            raise InvalidArgument.field("model", "is required")
        if request.min_free_memory_bytes < 0 or request.version < 0:
            field = "version" if request.version < 0 else "min_free_memory_bytes"
            raise InvalidArgument.field(field, "must not be negative")
        if request.max_results < 0:
            raise InvalidArgument.field("max_results", "must not be negative")
        limit = page_size(request.max_results, default=5, maximum=MAX_SERVING_RESULTS)
        candidates = await self._live.find_serving(
            request.model,
            version=request.version,
            region=request.region,
            min_free_memory_bytes=request.min_free_memory_bytes,
            limit=limit,
        )
        return gpu_service_pb2.FindServingNodesResponse(nodes=[convert.serving_node(c) for c in candidates])
