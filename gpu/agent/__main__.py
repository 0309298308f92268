"""`python -m gpu.agent`: the node agent process. SIGTERM or SIGINT stop it cleanly (the stream is closed, a
Triton it started is stopped). Exit status 0 after a stop or a final close by the service (DEREGISTERED,
SUPERSEDED), 2 on a configuration error (one line on stderr)."""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
from far.gpu.v1 import gpu_service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient

from gpu.agent.agent import NodeAgent, declared_node
from gpu.agent.config import AgentSettings, TritonAttach, TritonLaunch
from gpu.agent.nvml import NvmlSampler
from gpu.agent.placement import Placer
from gpu.agent.telemetry import TelemetryCollector
from gpu.triton import TritonProcess
from servers.common import event_loop
from servers.common.config import ConfigError
from servers.common.observability import configure_logging

log = structlog.get_logger("gpu.agent")


def start_triton(launch: TritonLaunch) -> TritonProcess:
    """From the main thread, before any gRPC thread exists: Triton then also gets SIGTERM if the agent dies."""
    process = TritonProcess.start(
        launch.model_repository.resolve(),
        launch.workdir.resolve(),
        load_models=launch.load_models,
        trace_url=launch.trace_url,
    )
    log.info("triton_started", pid=process.pid, grpc=process.grpc_url, metrics=process.metrics_url)
    return process


async def serve(settings: AgentSettings, attach: TritonAttach) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    gpus = NvmlSampler.open()
    log.info("gpus", count=len(gpus.sample()) if gpus else 0)
    triton = InferenceServerClient(attach.grpc_address)
    channel = settings.channel()
    try:
        placer = Placer(triton)
        agent = NodeAgent(
            gpu_service_pb2_grpc.GpuServiceStub(channel),
            node_id=settings.node_id,
            operator_key=settings.operator_key,
            chain_id=settings.chain_id,
            declared=declared_node(
                endpoint=settings.endpoint or attach.grpc_address,
                endpoint_tls=settings.endpoint_tls,
                region=settings.region,
                labels=dict(settings.labels),
                gpus=gpus.inventory() if gpus else [],
            ),
            collector=TelemetryCollector(triton, attach.metrics_url, gpus, placer.errors),
            placer=placer,
        )
        outcome = await agent.run(stopping)
        log.info("agent_stopped", reason=outcome.describe() if outcome else "STOPPED")
    finally:
        await channel.close()
        await triton.close()
        if gpus:
            gpus.close()


def main() -> int:
    try:
        settings = AgentSettings.from_env()
    except ConfigError as error:
        print(f"far-gpu-agent: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging("gpu-agent", settings.log_level, settings.log_format)
    if isinstance(settings.triton, TritonAttach):
        event_loop.run(serve(settings, settings.triton), settings.event_loop)
        return 0
    triton = start_triton(settings.triton)
    try:
        event_loop.run(
            serve(settings, TritonAttach(grpc_address=triton.grpc_url, metrics_url=triton.metrics_url)),
            settings.event_loop,
        )
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
