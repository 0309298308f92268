"""StreamTelemetry sessions: the agent's reports in, acks and instructions out, one stream per node.

One queue feeds a session: the agent's messages (read by a task of the session), and the node's control
notices from any replica (placement, drain, deregistration, a newer stream, shutdown). The session ends
with a `closed` message in every case the contract names.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from far.gpu.v1 import gpu_service_pb2, telemetry_pb2

from servers.common.auth import Principal
from servers.common.db import Database
from servers.common.errors import FailedPrecondition, PermissionDenied
from servers.gpu import convert
from servers.gpu.control import DEREGISTERED, DRAIN, OPENED, PLACEMENT, SHUTDOWN, ControlHub, Notice
from servers.gpu.history import History
from servers.gpu.live import LiveState
from servers.gpu.models import NodeRow
from servers.gpu.registry import NODES_TOPIC, Registry, State
from servers.gpu.reports import RateTracker, report_problem, summarize

log = structlog.get_logger("far.gpu.streams")
DRAINING_OR_DRAINED = (State.DRAINING, State.DRAINED)
Closed = gpu_service_pb2.StreamClosed
Instruction = gpu_service_pb2.NodeInstruction


@dataclass(frozen=True)
class _Incoming:
    message: gpu_service_pb2.StreamTelemetryRequest


@dataclass(frozen=True)
class _Ended:
    pass


def closed(reason: Closed.Reason.ValueType, message: str = "") -> Instruction:
    return Instruction(closed=Closed(reason=reason, message=message))


class TelemetryStreams:
    def __init__(
        self,
        database: Database,
        registry: Registry,
        live: LiveState,
        history: History,
        control: ControlHub,
        *,
        report_interval_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = database
        self._registry = registry
        self._live = live
        self._history = history
        self._control = control
        self._interval_s = report_interval_s
        self._clock = clock

    async def run(
        self, principal: Principal, requests: AsyncIterator[gpu_service_pb2.StreamTelemetryRequest]
    ) -> AsyncIterator[Instruction]:
        node_name = principal.subject
        node_id = node_name.removeprefix("nodes/")
        idle_s = 3 * self._interval_s
        try:
            async with asyncio.timeout(idle_s):
                first = await anext(requests)
        except StopAsyncIteration:
            yield closed(Closed.REASON_CLIENT_CLOSED)
            return
        except TimeoutError:
            yield closed(Closed.REASON_IDLE, f"no message for {idle_s:g} seconds")
            return
        if first.node != node_name:
            raise PermissionDenied(f"this agent token is for {node_name}", reason="PERMISSION_DENIED")
        async with self._db.read() as uow:
            row = await self._registry.streamed_node(uow, node_id)
        seq = await self._control.next_stream_seq(node_id)
        stream_id = uuid.uuid4().hex
        queue = self._control.attach(node_id, stream_id)
        reader = asyncio.create_task(self._read(requests, queue, node_name), name=f"gpu-stream-{node_id}")
        try:
            await self._control.send(node_id, OPENED, stream_seq=seq)
            yield Instruction(config=gpu_service_pb2.AgentConfig(report_interval=convert.duration_s(self._interval_s)))
            yield Instruction(placement=convert.placement_instruction(row))
            if row.state in DRAINING_OR_DRAINED:
                yield self._drain_notice(row)
            session = _Session(node_id)
            pending: object = _Incoming(first)
            loop = asyncio.get_running_loop()
            idle_at = loop.time() + idle_s
            while True:
                if pending is None:
                    try:
                        async with asyncio.timeout_at(idle_at):
                            pending = await queue.get()
                    except TimeoutError:
                        yield closed(Closed.REASON_IDLE, f"no report for {idle_s:g} seconds")
                        return
                item, pending = pending, None
                if isinstance(item, _Incoming):
                    idle_at = loop.time() + idle_s
                    if item.message.HasField("report"):
                        try:
                            yield await self._report(session, item.message.report)
                        except FailedPrecondition:
                            yield closed(Closed.REASON_DEREGISTERED)
                            return
                elif isinstance(item, _Ended):
                    yield closed(Closed.REASON_CLIENT_CLOSED)
                    return
                elif isinstance(item, Notice):
                    outcome = await self._notice(node_id, item, seq)
                    if outcome is not None:
                        yield outcome
                        if outcome.HasField("closed"):
                            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._control.detach(node_id, stream_id)

    async def _read(
        self,
        requests: AsyncIterator[gpu_service_pb2.StreamTelemetryRequest],
        queue: asyncio.Queue[object],
        node_name: str,
    ) -> None:
        try:
            async for message in requests:
                if message.node and message.node != node_name:
                    continue  # later messages may only name the same node; others are ignored
                queue.put_nowait(_Incoming(message))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.info("agent stream read failed", node=node_name, exc_info=True)
        queue.put_nowait(_Ended())

    async def _notice(self, node_id: str, notice: Notice, seq: int) -> Instruction | None:
        if notice.kind == OPENED:
            return closed(Closed.REASON_SUPERSEDED) if notice.stream_seq > seq else None
        if notice.kind == DEREGISTERED:
            return closed(Closed.REASON_DEREGISTERED)
        if notice.kind == SHUTDOWN:
            return closed(Closed.REASON_SERVER_SHUTDOWN, "reconnect: another instance will answer")
        if notice.kind in (PLACEMENT, DRAIN):
            async with self._db.read() as uow:
                row = await self._registry.streamed_node(uow, node_id)
            if notice.kind == PLACEMENT:
                return Instruction(placement=convert.placement_instruction(row))
            if row.state in DRAINING_OR_DRAINED:  # not when resumed since
                return self._drain_notice(row)
        return None

    def _drain_notice(self, row: NodeRow) -> Instruction:
        """The drain notice; a node that drained at once (nothing running) has its deadline now."""
        deadline = convert.timestamp(row.drain_deadline or self._clock())
        return Instruction(drain=gpu_service_pb2.DrainNotice(deadline=deadline, reason=row.drain_reason))

    async def _report(self, session: _Session, report: telemetry_pb2.TelemetryReport) -> Instruction:
        now = self._clock()
        problem = report_problem(report, after_sequence=session.last_sequence, now=now)
        session.last_sequence = max(session.last_sequence, report.sequence)
        if problem:
            return Instruction(ack=gpu_service_pb2.ReportAck(sequence=report.sequence, accepted=False, reason=problem))
        summary = summarize(report, now)
        async with self._db.transaction() as uow:
            change, previously_ready = await self._registry.record_report(uow, session.node_id, summary)
            if change.changed:
                uow.publish(NODES_TOPIC, convert.node(change.row))
        await self._live.write_report(change.row, summary, previously_ready)
        values = session.rates.values(report)
        try:
            await self._history.record(session.node_id, report.sample_time.ToMilliseconds(), values)
        except Exception:  # history is for people; liveness and load already took the report
            log.warning("telemetry history not recorded", node=session.node_id, exc_info=True)
        return Instruction(ack=gpu_service_pb2.ReportAck(sequence=report.sequence, accepted=True))


@dataclass
class _Session:
    """One stream's report state: the last sequence number and the counters rates are derived from."""

    node_id: str
    last_sequence: int = 0
    rates: RateTracker = field(default_factory=RateTracker)
