"""SetModelPlacement reaches a real node agent every time, even with the set already desired.

A fresh node's placement is revision 0 with nothing desired, which the agent leaves alone (Triton keeps the
models it was started with). An explicit empty placement is the same set, and must still unload them.
The module has a tritonserver of its own (tests/gpu/conftest_agent.py): this test pulls its model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, node_pb2
from tritonclient.grpc.aio import InferenceServerClient

from gpu.triton import TritonProcess
from tests.gpu.conftest_agent import MODEL, Operator, eventually, start_agent, start_agent_triton
from tests.integration.gpu_support import GpuStub, Metadata, RunningGpu, running_gpu, unique_node_id

pytestmark = pytest.mark.integration

READY = node_pb2.MODEL_STATE_READY
UNAVAILABLE = node_pb2.MODEL_STATE_UNAVAILABLE


@pytest.fixture(scope="module")
async def agent_triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonProcess]:
    triton = await start_agent_triton(tmp_path_factory.mktemp("placement-triton"))
    try:
        yield triton
    finally:
        await asyncio.to_thread(triton.stop)


@pytest.fixture(scope="module")
async def gpu_server(service_env: dict[str, str]) -> AsyncIterator[RunningGpu]:
    async with running_gpu(service_env) as running:
        yield running


async def model_state(gpu: GpuStub, name: str, metadata: Metadata) -> int | None:
    node = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=metadata)
    states = [m.state for m in node.loaded_models if m.model == MODEL]
    return max(states) if states else None


async def triton_state(triton: TritonProcess) -> str:
    client = InferenceServerClient(triton.grpc_url)
    try:
        index = await client.get_model_repository_index()
    finally:
        await client.close()
    return str(max((row for row in index.models if row.name == MODEL), key=lambda row: row.version).state)


async def test_an_explicit_empty_placement_unloads_what_triton_was_started_with(
    tmp_path: Path, gpu_server: RunningGpu, agent_triton: TritonProcess, make_token: Callable[..., str]
) -> None:
    operator = Operator.create(tmp_path)
    me: Metadata = (("authorization", f"Bearer {make_token(operator.address, ('user',))}"),)
    agent = await start_agent(
        tmp_path, gpu_port=gpu_server.port, triton=agent_triton, operator=operator, node_id=unique_node_id()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gpu_server.port}") as channel:
            gpu = gpu_service_pb2_grpc.GpuServiceStub(channel)
            await agent.wait_event("placement", revision=0)

            async def ready() -> bool:
                return await model_state(gpu, agent.name, me) == READY

            await eventually(ready, what="the preloaded model READY in a report")
            placed = await gpu.SetModelPlacement(gpu_service_pb2.SetModelPlacementRequest(name=agent.name), metadata=me)
            assert list(placed.desired_models) == []
            await agent.wait_event("placement", revision=1, desired=[])
            assert (await agent.wait_event("placement_apply", revision=1))["unload"] == [MODEL]

            async def unloaded() -> bool:
                return await model_state(gpu, agent.name, me) == UNAVAILABLE

            await eventually(unloaded, what="the model reported unloaded")
            assert await triton_state(agent_triton) == "UNAVAILABLE"
    finally:
        assert await agent.stop() == 0
