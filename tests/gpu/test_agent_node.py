"""The node agent end to end: a real `python -m gpu.agent` process, a real tritonserver with the SmolLM2 model,
and the real gpu service (in-process, report interval REPORT_INTERVAL_S).

Each test registers a node of its own (a fresh id and operator) on the module's Triton; tests that change
the placement put the model back before they end.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import psutil
import pytest
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, node_pb2
from google.protobuf import duration_pb2
from tritonclient.grpc.aio import InferenceServerClient

from devstack.node import start_local_node
from devstack.processes import free_port
from gpu.agent.telemetry import TelemetryCollector
from gpu.triton import TritonProcess
from servers.common.config import Settings
from servers.common.server import RunningServer, start_server
from servers.gpu.server import GpuApp
from tests.gpu.conftest_agent import MODEL, AgentProcess, Operator, eventually, start_agent, start_agent_triton
from tests.gpu.triton_support import COUNTING, Response, Stream, chat_inputs, generate, text_of
from tests.integration.gpu_support import GpuStub, Metadata, RunningGpu, running_gpu, unique_node_id

pytestmark = pytest.mark.integration

State = node_pb2.Node
READY = node_pb2.MODEL_STATE_READY
UNAVAILABLE = node_pb2.MODEL_STATE_UNAVAILABLE


@pytest.fixture(scope="module")
async def agent_triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonProcess]:
    triton = await start_agent_triton(tmp_path_factory.mktemp("agent-triton"))
    try:
        yield triton
    finally:
        await asyncio.to_thread(triton.stop)


@pytest.fixture(scope="module")
async def gpu_server(service_env: dict[str, str]) -> AsyncIterator[RunningGpu]:
    async with running_gpu(service_env) as running:
        yield running


@pytest.fixture(scope="module")
async def gpu(gpu_server: RunningGpu) -> AsyncIterator[GpuStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gpu_server.port}") as channel:
        yield gpu_service_pb2_grpc.GpuServiceStub(channel)


@pytest.fixture
def operator(tmp_path: Path) -> Operator:
    return Operator.create(tmp_path)


@pytest.fixture
def as_operator(operator: Operator, make_token: Callable[..., str]) -> Metadata:
    return (("authorization", f"Bearer {make_token(operator.address, ('user',))}"),)


@pytest.fixture
async def agent(
    tmp_path: Path, gpu_server: RunningGpu, agent_triton: TritonProcess, operator: Operator
) -> AsyncIterator[AgentProcess]:
    process = await start_agent(
        tmp_path, gpu_port=gpu_server.port, triton=agent_triton, operator=operator, node_id=unique_node_id()
    )
    try:
        await process.wait_event("registered")
        yield process
    finally:
        await process.stop()


async def node_where(
    gpu: GpuStub, name: str, metadata: Metadata, check: Callable[[node_pb2.Node], bool], what: str
) -> node_pb2.Node:
    async def matching() -> node_pb2.Node | None:
        node: node_pb2.Node = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=metadata)
        return node if check(node) else None

    return await eventually(matching, what=f"{name} {what}")


def model_state(node: node_pb2.Node, model: str = MODEL) -> int | None:
    states = [m.state for m in node.loaded_models if m.model == model]
    return max(states) if states else None


async def triton_states(triton: TritonProcess) -> dict[str, str]:
    """Triton's own word on its models: name -> state of the highest version listed."""
    client = InferenceServerClient(triton.grpc_url)
    try:
        index = await client.get_model_repository_index()
    finally:
        await client.close()
    return {row.name: row.state for row in sorted(index.models, key=lambda r: r.version)}


async def place(gpu: GpuStub, name: str, metadata: Metadata, *models: str) -> None:
    await gpu.SetModelPlacement(
        gpu_service_pb2.SetModelPlacementRequest(name=name, models=[node_pb2.ModelPlacement(model=m) for m in models]),
        metadata=metadata,
    )


class TestTelemetry:
    async def test_report_of_a_real_triton_after_a_generation(self, agent_triton: TritonProcess) -> None:
        client = InferenceServerClient(agent_triton.grpc_url)
        try:
            collector = TelemetryCollector(client, agent_triton.metrics_url, gpus=None)
            before = await collector.report(1)
            responses = await generate(agent_triton.grpc_url, prompt="Hello", max_tokens=4, temperature=0.0)
            assert responses[-1].final
            after = await collector.report(2)
        finally:
            await client.close()
        assert after.triton.live
        assert after.triton.ready
        assert after.triton.version == "2.51.0"
        [model] = [m for m in after.triton.models if m.model == MODEL]
        [earlier] = [m for m in before.triton.models if m.model == MODEL]
        assert (model.version, model.state) == (1, READY)
        assert model.inference_count == earlier.inference_count + 1
        assert model.execution_count == earlier.execution_count + 1
        assert model.cumulative_compute_duration.ToMicroseconds() > earlier.cumulative_compute_duration.ToMicroseconds()
        assert model.active_requests == 0  # the generation has finished


class TestRegistration:
    async def test_registers_and_turns_healthy_with_the_model_ready(
        self, gpu: GpuStub, agent: AgentProcess, as_operator: Metadata, operator: Operator, agent_triton: TritonProcess
    ) -> None:
        assert (await agent.wait_event("registered"))["node"] == agent.name
        node = await node_where(
            gpu,
            agent.name,
            as_operator,
            lambda n: n.state == State.STATE_HEALTHY and model_state(n) == READY,
            "HEALTHY with the model READY",
        )
        assert node.operator == operator.address
        assert node.endpoint == agent_triton.grpc_url
        assert node.triton_version == "2.51.0"
        assert node.agent_version == "0.1.0"
        assert node.cpu_cores >= 1
        assert node.memory_bytes > 0
        assert list(node.gpus) == []  # no NVIDIA driver on this machine: a CPU-only node
        assert node.last_seen_time.seconds > 0

    async def test_agent_started_triton_serves_and_stops_with_it(
        self, gpu: GpuStub, gpu_server: RunningGpu, tmp_path: Path, operator: Operator, as_operator: Metadata
    ) -> None:
        agent = await start_agent(
            tmp_path, gpu_port=gpu_server.port, triton=None, operator=operator, node_id=unique_node_id()
        )
        try:
            started = await agent.wait_event("triton_started", within_s=120)
            await agent.wait_event("registered")
            node = await node_where(
                gpu,
                agent.name,
                as_operator,
                lambda n: n.state == State.STATE_HEALTHY and model_state(n) == READY,
                "HEALTHY with the model READY",
            )
            assert node.endpoint == started["grpc"]
            assert psutil.pid_exists(started["pid"])
        finally:
            code = await agent.stop()
        assert code == 0
        assert not psutil.pid_exists(started["pid"])  # stopped and reaped by the agent

    async def test_start_local_node_brings_up_triton_and_a_registered_agent(
        self, gpu: GpuStub, gpu_server: RunningGpu, tmp_path: Path, make_token: Callable[..., str]
    ) -> None:
        node_id = unique_node_id()
        local = await asyncio.to_thread(
            start_local_node,
            tmp_path,
            gpu_service=f"127.0.0.1:{gpu_server.port}",
            node_id=node_id,
            triton_env={"FAR_LLAMA_SLOTS": "1"},
        )
        try:
            key_file = tmp_path / f"node-{node_id}" / "operator.key"
            assert key_file.stat().st_mode & 0o777 == 0o600
            metadata = (("authorization", f"Bearer {make_token(local.operator, ('user',))}"),)
            node = await node_where(
                gpu,
                local.name,
                metadata,
                lambda n: n.state == State.STATE_HEALTHY and model_state(n) == READY,
                "HEALTHY with the model READY",
            )
            assert node.endpoint == local.triton.grpc_url
        finally:
            await asyncio.to_thread(local.stop)
        assert not local.agent.alive()
        assert not local.triton.alive()
        assert local.agent.returncode == 0


class TestPlacement:
    async def test_unload_and_load_again_round_trip(
        self, gpu: GpuStub, agent: AgentProcess, as_operator: Metadata, agent_triton: TritonProcess
    ) -> None:
        await place(gpu, agent.name, as_operator, MODEL)  # placement revision 1: what Triton already serves
        await node_where(gpu, agent.name, as_operator, lambda n: model_state(n) == READY, "with the model READY")
        try:
            await place(gpu, agent.name, as_operator)
            node = await node_where(
                gpu, agent.name, as_operator, lambda n: model_state(n) == UNAVAILABLE, "with the model unloaded"
            )
            assert list(node.desired_models) == []
            assert (await triton_states(agent_triton))[MODEL] == "UNAVAILABLE"
            assert (await agent.wait_event("placement_apply"))["unload"] == [MODEL]
        finally:
            await place(gpu, agent.name, as_operator, MODEL)
        node = await node_where(
            gpu, agent.name, as_operator, lambda n: model_state(n) == READY, "with the model loaded again"
        )
        assert [m.model for m in node.desired_models] == [MODEL]
        assert (await triton_states(agent_triton))[MODEL] == "READY"

    async def test_a_model_triton_cannot_load_is_reported_with_the_error(
        self, gpu: GpuStub, agent: AgentProcess, as_operator: Metadata
    ) -> None:
        await place(gpu, agent.name, as_operator, MODEL, "no-such-model")
        node = await node_where(
            gpu,
            agent.name,
            as_operator,
            lambda n: model_state(n, "no-such-model") == UNAVAILABLE,
            "reporting the failure",
        )
        failed = next(m for m in node.loaded_models if m.model == "no-such-model")
        assert failed.message.startswith("load failed: ")
        assert model_state(node) == READY  # the rest of the placement still applies


class TestHealth:
    async def test_silence_turns_unhealthy_and_a_new_agent_recovers_the_node(
        self,
        gpu: GpuStub,
        agent: AgentProcess,
        as_operator: Metadata,
        tmp_path: Path,
        gpu_server: RunningGpu,
        agent_triton: TritonProcess,
        operator: Operator,
    ) -> None:
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
        os.kill(agent.process.pid, signal.SIGKILL)  # no goodbye: the service only notices the silence
        node = await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_UNHEALTHY, "UNHEALTHY")
        assert node.state_message
        again = await start_agent(
            tmp_path, gpu_port=gpu_server.port, triton=agent_triton, operator=operator, node_id=agent.node_id
        )
        try:
            await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY again")
        finally:
            assert await again.stop() == 0

    async def test_drain_notice_then_drained_then_resumed(
        self, gpu: GpuStub, agent: AgentProcess, as_operator: Metadata
    ) -> None:
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
        drained = await gpu.DrainNode(
            gpu_service_pb2.DrainNodeRequest(name=agent.name, reason="maintenance"), metadata=as_operator
        )
        assert drained.state in (State.STATE_DRAINING, State.STATE_DRAINED)
        notice = await agent.wait_event("drain_notice")
        assert notice["deadline"]
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_DRAINED, "DRAINED")
        await gpu.ResumeNode(gpu_service_pb2.ResumeNodeRequest(name=agent.name), metadata=as_operator)
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY again")


class TestDrainInFlight:
    # ~3 s on one CPU thread (60-130 tokens/s); the drain and the checks on it take ~0.7 s (~35 tokens) here.
    TOKENS = 200

    async def test_a_running_generation_finishes_while_the_node_drains_and_gets_no_new_work(
        self,
        gpu: GpuStub,
        agent: AgentProcess,
        as_operator: Metadata,
        agent_triton: TritonProcess,
        make_token: Callable[..., str],
    ) -> None:
        admin = (("authorization", f"Bearer {make_token('0x' + 'ad' * 20, ('admin',))}"),)

        async def offered() -> dict[str, gpu_service_pb2.ServingNode]:
            """The nodes the gpu service offers the inference service for the model."""
            request = gpu_service_pb2.FindServingNodesRequest(model=MODEL, max_results=50)
            response = await gpu.FindServingNodes(request, metadata=admin)
            return {n.node: n for n in response.nodes}

        async def offered_with(check: Callable[[gpu_service_pb2.ServingNode], bool]) -> gpu_service_pb2.ServingNode:
            async def matching() -> gpu_service_pb2.ServingNode | None:
                node = (await offered()).get(agent.name)
                return node if node is not None and check(node) else None

            return await eventually(matching, what=f"{agent.name} offered for {MODEL}")

        await offered_with(lambda n: n.active_requests == 0)
        client = InferenceServerClient(agent_triton.grpc_url)
        responses: list[Response] = []

        async def consume() -> None:
            async for response in Stream(client, chat_inputs(prompt=COUNTING, max_tokens=self.TOKENS, temperature=0)):
                responses.append(response)

        generation = asyncio.create_task(consume())
        try:
            await offered_with(lambda n: n.active_requests == 1)  # a report showed the generation running
            draining = await gpu.DrainNode(
                gpu_service_pb2.DrainNodeRequest(
                    name=agent.name, reason="maintenance", grace_period=duration_pb2.Duration(seconds=600)
                ),
                metadata=as_operator,
            )
            assert draining.state == State.STATE_DRAINING
            await agent.wait_event("drain_notice")
            seen = draining.last_seen_time.ToDatetime()
            later = await node_where(
                gpu,
                agent.name,
                as_operator,
                lambda n: n.last_seen_time.ToDatetime() > seen,
                "reporting after the drain",
            )
            assert later.state == State.STATE_DRAINING  # the report still shows the generation: no DRAINED yet
            assert agent.name not in await offered()
            assert not any(r.final for r in responses)  # all of that while it generated
            async with asyncio.timeout(120):
                await generation
        finally:
            generation.cancel()
            await client.close()

        *pieces, last = responses
        assert not any(r.error or r.final for r in pieces)
        assert (last.final, last.error, last.finish_reason) == (True, "", "length")
        assert last.completion_tokens == self.TOKENS
        assert text_of(responses).startswith(" 4, 5, 6, 7, 8, 9, 10,")
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_DRAINED, "DRAINED")
        assert agent.name not in await offered()
        await gpu.ResumeNode(gpu_service_pb2.ResumeNodeRequest(name=agent.name), metadata=as_operator)
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY again")
        await offered_with(lambda n: n.active_requests == 0)


class TestReconnect:
    async def test_reconnects_when_the_service_comes_back(
        self,
        service_env: dict[str, str],
        tmp_path: Path,
        agent_triton: TritonProcess,
        operator: Operator,
        as_operator: Metadata,
    ) -> None:
        port = free_port()
        environ = {"GPU_REPORT_INTERVAL_S": "0.3", **service_env, "GRPC_LISTEN": f"127.0.0.1:{port}"}

        async def serve() -> RunningServer:
            return await start_server(GpuApp(environ).spec(), Settings.from_env("gpu", 0, environ=environ))

        server = await serve()
        agent = await start_agent(
            tmp_path, gpu_port=port, triton=agent_triton, operator=operator, node_id=unique_node_id()
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = gpu_service_pb2_grpc.GpuServiceStub(channel)
                await agent.wait_event("registered")
                await node_where(stub, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
                await server.stop()
                ended = await agent.wait_event("stream_ended")
                assert ended["reason"] in ("REASON_SERVER_SHUTDOWN", "UNAVAILABLE")
                server = await serve()
                await agent.wait_event("placement", count=2)  # the second stream's first instructions
                await node_where(stub, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
                assert len(agent.events("registered")) == 1  # the agent token still holds: no new registration
        finally:
            await agent.stop()
            await server.stop()


class TestStreamEnd:
    async def test_sigterm_closes_the_stream_cleanly(
        self, gpu: GpuStub, agent: AgentProcess, as_operator: Metadata
    ) -> None:
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
        assert await agent.stop() == 0
        ended = agent.events("stream_ended")
        assert [e["reason"] for e in ended] == ["REASON_CLIENT_CLOSED"]

    async def test_deregistration_stops_the_agent_for_good(
        self, gpu: GpuStub, agent: AgentProcess, as_operator: Metadata
    ) -> None:
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
        await gpu.DeregisterNode(
            gpu_service_pb2.DeregisterNodeRequest(name=agent.name, force=True), metadata=as_operator
        )
        assert await agent.wait_exit() == 0
        assert agent.events("stream_ended")[-1]["reason"] == "REASON_DEREGISTERED"

    async def test_a_second_agent_for_the_node_supersedes_the_first(
        self,
        gpu: GpuStub,
        agent: AgentProcess,
        as_operator: Metadata,
        tmp_path: Path,
        gpu_server: RunningGpu,
        agent_triton: TritonProcess,
        operator: Operator,
    ) -> None:
        await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
        second = await start_agent(
            tmp_path, gpu_port=gpu_server.port, triton=agent_triton, operator=operator, node_id=agent.node_id
        )
        try:
            assert await agent.wait_exit() == 0
            assert agent.events("stream_ended")[-1]["reason"] == "REASON_SUPERSEDED"
            await node_where(gpu, agent.name, as_operator, lambda n: n.state == State.STATE_HEALTHY, "HEALTHY")
            assert second.process.alive()
        finally:
            assert await second.stop() == 0
