"""FindServingNodes: HEALTHY nodes with the model READY in a fresh report, least loaded first, filters, access."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest
from far.gpu.v1 import gpu_service_pb2, node_pb2

from tests.integration.gpu_support import (
    AgentStream,
    GpuStub,
    Operator,
    registered,
    report,
)
from tests.integration.rich_errors import expect_error

Auth = Callable[..., tuple[tuple[str, str], ...]]
GIB = 1024**3
pytestmark = pytest.mark.integration


def find(model: str, **filters: object) -> gpu_service_pb2.FindServingNodesRequest:
    return gpu_service_pb2.FindServingNodesRequest(model=model, **filters)  # type: ignore[arg-type]


@pytest.fixture
async def agents() -> AsyncIterator[AsyncExitStack]:
    """Streams opened by a test stay open until it ends (an open stream keeps its node reporting)."""
    async with AsyncExitStack() as stack:
        yield stack


async def serving_node(
    gpu: GpuStub,
    agents: AsyncExitStack,
    operator: Operator,
    model: str,
    *,
    version: int = 1,
    active: int = 0,
    util: float = 10.0,
    free_gib: int = 40,
    region: str = "eu-west",
) -> str:
    name, token = await registered(gpu, operator, node=node_pb2.Node(region=region))
    agent = await agents.enter_async_context(AgentStream.open(gpu, token, name))
    fields: dict[str, Any] = {
        "models": [(model, version)],
        "active": active,
        "gpus": [(util, (80 - free_gib) * GIB, 80 * GIB)],
    }
    await agent.send(report(1, **fields))
    assert (await agent.next_of("ack")).ack.accepted
    await keep_reporting(agents, agent, **fields)
    return name


async def keep_reporting(agents: AsyncExitStack, agent: AgentStream, **fields: Any) -> None:
    """Keep the node reporting until the test ends, so its live report never goes stale on a slow machine."""
    task = asyncio.create_task(agent.keep_reporting(2, **fields))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    agents.push_async_callback(stop)


class TestFindServingNodes:
    async def test_least_loaded_first_then_utilisation_then_free_memory(
        self, gpu: GpuStub, agents: AsyncExitStack, auth: Auth
    ) -> None:
        operator, model = Operator.new(), f"m-{secrets.token_hex(4)}"
        busy = await serving_node(gpu, agents, operator, model, active=3)
        hot = await serving_node(gpu, agents, operator, model, util=90.0)
        roomy = await serving_node(gpu, agents, operator, model, util=10.0, free_gib=60)
        cool = await serving_node(gpu, agents, operator, model, util=10.0, free_gib=20)
        await serving_node(gpu, agents, operator, f"other-{model}")
        admin = auth(Operator.new().address, "admin")
        response = await gpu.FindServingNodes(find(model), metadata=admin)
        assert [n.node for n in response.nodes] == [roomy, cool, hot, busy]
        first = response.nodes[0]
        assert (first.endpoint, first.region, first.version) == ("127.0.0.1:8001", "eu-west", 1)
        assert (first.active_requests, first.free_memory_bytes) == (0, 60 * GIB)
        assert first.gpu_utilization_percent == pytest.approx(10.0)
        assert first.HasField("report_time")
        limited = await gpu.FindServingNodes(find(model, max_results=2), metadata=admin)
        assert [n.node for n in limited.nodes] == [roomy, cool]

    async def test_filters(self, gpu: GpuStub, agents: AsyncExitStack, auth: Auth) -> None:
        operator, model = Operator.new(), f"m-{secrets.token_hex(4)}"
        europe = await serving_node(gpu, agents, operator, model, region="eu-west", free_gib=10)
        america = await serving_node(gpu, agents, operator, model, region="us-east", version=2, free_gib=50)
        admin = auth(Operator.new().address, "admin")

        async def found(**filters: object) -> list[str]:
            return [n.node for n in (await gpu.FindServingNodes(find(model, **filters), metadata=admin)).nodes]

        assert await found(region="us-east") == [america]
        assert await found(version=1) == [europe]
        assert await found(min_free_memory_bytes=20 * GIB) == [america]
        assert await found(region="ap-south") == []
        assert await found() == [america, europe]  # more free memory first when load and utilisation tie
        assert [n.node for n in (await gpu.FindServingNodes(find(f"x-{model}"), metadata=admin)).nodes] == []

    async def test_draining_and_unhealthy_nodes_are_left_out(
        self, gpu: GpuStub, agents: AsyncExitStack, auth: Auth
    ) -> None:
        operator, model = Operator.new(), f"m-{secrets.token_hex(4)}"
        drained = await serving_node(gpu, agents, operator, model)
        sick_name, sick_token = await registered(gpu, operator)
        sick = await agents.enter_async_context(AgentStream.open(gpu, sick_token, sick_name))
        await sick.send(report(1, models=[(model, 1)], healthy=False))
        await sick.next_of("ack")
        await keep_reporting(agents, sick, models=[(model, 1)], healthy=False)
        admin = auth(Operator.new().address, "admin")
        assert [n.node for n in (await gpu.FindServingNodes(find(model), metadata=admin)).nodes] == [drained]
        await gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=drained), metadata=auth(operator.address))
        assert list((await gpu.FindServingNodes(find(model), metadata=admin)).nodes) == []

    async def test_only_services_and_admins_may_ask(self, gpu: GpuStub, auth: Auth) -> None:
        await expect_error(
            gpu.FindServingNodes(find("m"), metadata=auth(Operator.new().address)),
            grpc.StatusCode.PERMISSION_DENIED,
            "PARTNER_ONLY",
            domain="gpu.far.network",
        )
        await expect_error(
            gpu.FindServingNodes(find(""), metadata=auth(Operator.new().address, "admin")),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["model"],
            domain="gpu.far.network",
        )
