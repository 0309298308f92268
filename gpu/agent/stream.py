"""One StreamTelemetry stream: reports out every interval, instructions in, and a clean close.

The first report goes out as soon as the stream opens (it names the node, and it makes the node
HEALTHY without waiting a whole interval); the next ones follow every `report_interval` from the
service's `config`, and at once when something worth reporting happened (placement applied, drain
notice). To stop, the agent half-closes and reads on until the service's `closed` message, so the
service records a CLIENT_CLOSED end rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import grpc
import structlog
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, telemetry_pb2

log = structlog.get_logger("gpu.agent.stream")

DEFAULT_REPORT_INTERVAL_S = 10.0
CLOSE_TIMEOUT_S = 10.0
Closed = gpu_service_pb2.StreamClosed
Reason: TypeAlias = gpu_service_pb2.StreamClosed.Reason.ValueType
FINAL_REASONS = frozenset({Closed.REASON_DEREGISTERED, Closed.REASON_SUPERSEDED})
if TYPE_CHECKING:  # the stub of a grpc.aio channel; only the .pyi names this type
    Stub: TypeAlias = gpu_service_pb2_grpc.GpuServiceAsyncStub
    Call: TypeAlias = grpc.aio.StreamStreamCall[gpu_service_pb2.StreamTelemetryRequest, gpu_service_pb2.NodeInstruction]
else:
    Stub = gpu_service_pb2_grpc.GpuServiceStub


class Backoff:
    """Reconnect delays: 1 second doubling to 1 minute, back to 1 second after a stream that worked."""

    def __init__(self, initial_s: float = 1.0, maximum_s: float = 60.0) -> None:
        self._initial = initial_s
        self._maximum = maximum_s
        self._next = initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay

    def reset(self) -> None:
        self._next = self._initial


@dataclass
class StreamOutcome:
    """How a stream ended: the service's `closed` reason, or the gRPC error that broke it."""

    closed: Reason | None = None
    message: str = ""
    error: grpc.StatusCode | None = None
    acked: int = 0

    @property
    def final(self) -> bool:
        """The service said not to reconnect (DEREGISTERED, SUPERSEDED)."""
        return self.closed in FINAL_REASONS

    def describe(self) -> str:
        if self.closed is not None:
            return Closed.Reason.Name(self.closed)
        return self.error.name if self.error is not None else "ENDED"


ReportSource = Callable[[int], Awaitable[telemetry_pb2.TelemetryReport]]
PlacementSink = Callable[[gpu_service_pb2.PlacementInstruction], None]


class TelemetrySession:
    """One stream with the service, from open to `closed` (or to the error that ends it)."""

    def __init__(
        self,
        stub: Stub,
        *,
        node_name: str,
        token: str,
        reports: ReportSource,
        placement: PlacementSink,
        stopping: asyncio.Event,
    ) -> None:
        self._stub = stub
        self._node_name = node_name
        self._token = token
        self._reports = reports
        self._placement = placement
        self._stopping = stopping
        self._interval = DEFAULT_REPORT_INTERVAL_S
        self._report_now = asyncio.Event()

    def report_soon(self) -> None:
        """Send the next report now instead of at the end of the interval."""
        self._report_now.set()

    async def run(self) -> StreamOutcome:
        call = self._stub.StreamTelemetry(metadata=(("authorization", f"Bearer {self._token}"),))
        outcome = StreamOutcome()
        reader = asyncio.create_task(self._read(call, outcome))
        writer = asyncio.create_task(self._write(call))
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                # Stopping: the writer half-closes; the service answers CLIENT_CLOSED and ends the stream.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await asyncio.shield(reader)
        finally:
            for task in (stop, writer, reader):
                task.cancel()
            await asyncio.gather(stop, writer, reader, return_exceptions=True)
            call.cancel()
        return outcome

    async def _read(self, call: Call, outcome: StreamOutcome) -> None:
        try:
            while True:
                instruction = await call.read()
                if not isinstance(instruction, gpu_service_pb2.NodeInstruction):  # grpc.aio.EOF
                    return
                self._handle(instruction, outcome)
        except grpc.aio.AioRpcError as exc:
            outcome.error = exc.code()
            outcome.message = exc.details() or ""

    def _handle(self, instruction: gpu_service_pb2.NodeInstruction, outcome: StreamOutcome) -> None:
        match instruction.WhichOneof("instruction"):
            case "config":
                interval = instruction.config.report_interval.ToTimedelta().total_seconds()
                if interval > 0 and interval != self._interval:
                    self._interval = interval
                    log.info("report_interval", seconds=interval)
                    self.report_soon()  # the pause under way was measured with the old interval
            case "ack":
                outcome.acked += 1
                if not instruction.ack.accepted:
                    log.warning("report_rejected", sequence=instruction.ack.sequence, reason=instruction.ack.reason)
            case "placement":
                placement = instruction.placement
                log.info("placement", revision=placement.revision, desired=[m.model for m in placement.desired])
                self._placement(placement)
            case "drain":
                # Nothing stops here: Triton finishes what runs and the service sends no more; the reports
                # show the active requests going to 0, which is what makes the node DRAINED.
                log.info(
                    "drain_notice",
                    reason=instruction.drain.reason,
                    deadline=instruction.drain.deadline.ToJsonString(),
                )
                self.report_soon()
            case "closed":
                outcome.closed = instruction.closed.reason
                outcome.message = instruction.closed.message

    async def _write(self, call: Call) -> None:
        sequence = 0
        try:
            while not self._stopping.is_set():
                sequence += 1
                self._report_now.clear()
                report = await self._reports(sequence)
                await call.write(gpu_service_pb2.StreamTelemetryRequest(node=self._node_name, report=report))
                await self._pause()
            await call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            log.debug("stream_write_ended", error=str(exc))
        except Exception:
            log.exception("report_failed", sequence=sequence)
            call.cancel()  # the session ends; the agent reconnects after its backoff

    async def _pause(self) -> None:
        """Until the interval passes, a report is asked for, or the agent stops."""
        waits = [asyncio.create_task(self._report_now.wait()), asyncio.create_task(self._stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=self._interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
