"""The node agent's life: register, keep a telemetry stream open, reconnect with backoff, apply placement.

It registers once at start and again only when the service stops taking its agent token
(UNAUTHENTICATED: the node registered from elsewhere, or the service lost it). It stops for good when
the service says DEREGISTERED or SUPERSEDED, or when asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import psutil
import structlog
from far.gpu.v1 import gpu_service_pb2, node_pb2

from gpu.agent.placement import Placer
from gpu.agent.registration import new_claim, register_request, sign
from gpu.agent.stream import Backoff, StreamOutcome, Stub, TelemetrySession
from gpu.agent.telemetry import TelemetryCollector

log = structlog.get_logger("gpu.agent")

REGISTER_TIMEOUT_S = 30.0


class NodeAgent:
    def __init__(
        self,
        stub: Stub,
        *,
        node_id: str,
        operator_key: str,
        chain_id: int,
        declared: node_pb2.Node,
        collector: TelemetryCollector,
        placer: Placer,
    ) -> None:
        self._stub = stub
        self._node_id = node_id
        self._operator_key = operator_key
        self._chain_id = chain_id
        self._declared = declared
        self._collector = collector
        self._placer = placer
        self._backoff = Backoff()
        self._session: TelemetrySession | None = None
        self._placements: set[asyncio.Task[None]] = set()

    @property
    def node_name(self) -> str:
        return f"nodes/{self._node_id}"

    async def register(self) -> str:
        """RegisterNode with a freshly signed claim; returns the agent token."""
        claim = new_claim(self._node_id, self._declared.endpoint, self._operator_key, self._chain_id)
        request = register_request(claim, sign(claim, self._operator_key), self._declared)
        response: gpu_service_pb2.RegisterNodeResponse = await self._stub.RegisterNode(
            request, timeout=REGISTER_TIMEOUT_S
        )
        log.info("registered", node=response.node.name, operator=claim.operator, endpoint=claim.endpoint)
        return response.agent_token

    async def run(self, stopping: asyncio.Event) -> StreamOutcome | None:
        """Until `stopping` is set or the service ends the node's streams for good; returns the last outcome."""
        token: str | None = None
        outcome: StreamOutcome | None = None
        try:
            while not stopping.is_set():
                if token is None:
                    try:
                        token = await self.register()
                    except grpc.aio.AioRpcError as exc:
                        log.error("register_failed", code=exc.code().name, error=exc.details())
                        await self._wait(stopping, self._backoff.next())
                        continue
                outcome = await self._stream(token, stopping)
                log.info("stream_ended", reason=outcome.describe(), message=outcome.message, acked=outcome.acked)
                if outcome.final:
                    return outcome
                if outcome.error == grpc.StatusCode.UNAUTHENTICATED:
                    token = None
                if outcome.acked:
                    self._backoff.reset()
                if not stopping.is_set():
                    await self._wait(stopping, self._backoff.next())
            return outcome
        finally:
            for task in self._placements:
                task.cancel()
            await asyncio.gather(*self._placements, return_exceptions=True)

    async def _stream(self, token: str, stopping: asyncio.Event) -> StreamOutcome:
        self._session = TelemetrySession(
            self._stub,
            node_name=self.node_name,
            token=token,
            reports=self._collector.report,
            placement=self._place,
            stopping=stopping,
        )
        try:
            return await self._session.run()
        finally:
            self._session = None

    def _place(self, instruction: gpu_service_pb2.PlacementInstruction) -> None:
        task = asyncio.create_task(self._apply(instruction))
        self._placements.add(task)
        task.add_done_callback(self._placements.discard)

    async def _apply(self, instruction: gpu_service_pb2.PlacementInstruction) -> None:
        try:
            changed = await self._placer.apply(instruction)
        except Exception:
            log.exception("placement_failed", revision=instruction.revision)
            return
        if changed and self._session is not None:
            self._session.report_soon()

    @staticmethod
    async def _wait(stopping: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stopping.wait()


def declared_node(
    *,
    endpoint: str,
    endpoint_tls: bool,
    region: str,
    labels: dict[str, str],
    gpus: list[node_pb2.GpuInventory],
) -> node_pb2.Node:
    """What RegisterNode declares about this machine."""
    return node_pb2.Node(
        endpoint=endpoint,
        endpoint_tls=endpoint_tls,
        region=region,
        labels=labels,
        gpus=gpus,
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        memory_bytes=psutil.virtual_memory().total,
    )
