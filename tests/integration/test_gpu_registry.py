"""The node registry over gRPC: registration proofs, visibility, listing filters, updates and the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from far.gpu.v1 import gpu_service_pb2, node_pb2
from google.protobuf import duration_pb2, field_mask_pb2

from tests.integration.gpu_support import (
    AgentStream,
    GpuStub,
    Operator,
    registered,
    report,
    unique_node_id,
    wait_for_state,
)
from tests.integration.rich_errors import expect_error

DOMAIN = "gpu.far.network"
State = node_pb2.Node.State
pytestmark = pytest.mark.integration


def get(name: str) -> gpu_service_pb2.GetNodeRequest:
    return gpu_service_pb2.GetNodeRequest(name=name)


class TestRegisterNode:
    async def test_a_signed_registration_creates_a_registering_node(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        node_id = unique_node_id()
        inventory = node_pb2.Node(
            region="eu-west-1",
            labels={"tier": "gold"},
            gpus=[node_pb2.GpuInventory(model_name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 1024**3, count=2)],
            cpu_cores=32,
            memory_bytes=256 * 1024**3,
        )
        response = await gpu.RegisterNode(operator.registration(node_id, "gpu-1.example.net:8001", node=inventory))
        node = response.node
        assert node.name == f"nodes/{node_id}"
        assert node.operator == operator.address
        assert node.endpoint == "gpu-1.example.net:8001"
        assert node.state == State.STATE_REGISTERING
        assert node.region == "eu-west-1"
        assert dict(node.labels) == {"tier": "gold"}
        assert node.gpus[0].count == 2
        assert not node.HasField("stake")
        assert node.etag
        assert response.agent_token.startswith("fna_")
        assert len(response.agent_token) <= 256
        fetched = await gpu.GetNode(get(node.name), metadata=auth(operator.address))
        assert fetched == node

    async def test_a_signature_of_another_wallet_is_refused(self, gpu: GpuStub) -> None:
        operator, impostor = Operator.new(), Operator.new()
        request = impostor.registration(unique_node_id(), operator=operator.address)
        await expect_error(
            gpu.RegisterNode(request), grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_INVALID", domain=DOMAIN
        )

    async def test_a_changed_endpoint_breaks_the_signature(self, gpu: GpuStub) -> None:
        request = Operator.new().registration(unique_node_id(), "10.0.0.1:8001")
        request.node.endpoint = "10.0.0.2:8001"
        await expect_error(
            gpu.RegisterNode(request), grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_INVALID", domain=DOMAIN
        )

    async def test_an_expired_signature_is_refused(self, gpu: GpuStub) -> None:
        request = Operator.new().registration(
            unique_node_id(), issue_time=datetime.now(UTC) - timedelta(minutes=8), validity=timedelta(minutes=5)
        )
        await expect_error(
            gpu.RegisterNode(request), grpc.StatusCode.INVALID_ARGUMENT, "SIGNATURE_EXPIRED", domain=DOMAIN
        )

    async def test_a_validity_over_ten_minutes_is_refused(self, gpu: GpuStub) -> None:
        request = Operator.new().registration(unique_node_id(), validity=timedelta(minutes=11))
        await expect_error(
            gpu.RegisterNode(request), grpc.StatusCode.INVALID_ARGUMENT, fields=["expire_time"], domain=DOMAIN
        )

    async def test_another_chain_is_refused(self, gpu: GpuStub) -> None:
        request = Operator.new().registration(unique_node_id(), chain_id=1)
        await expect_error(
            gpu.RegisterNode(request), grpc.StatusCode.INVALID_ARGUMENT, fields=["chain_id"], domain=DOMAIN
        )

    async def test_a_nonce_works_once(self, gpu: GpuStub) -> None:
        operator = Operator.new()
        nonce = secrets.token_hex(10)
        await gpu.RegisterNode(operator.registration(unique_node_id(), nonce=nonce))
        await expect_error(
            gpu.RegisterNode(operator.registration(unique_node_id(), nonce=nonce)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NONCE_REUSED",
            domain=DOMAIN,
        )

    async def test_bad_fields_are_listed(self, gpu: GpuStub) -> None:
        request = Operator.new().registration("Bad_Id", "no-port", node=node_pb2.Node(region="EU", cpu_cores=-1))
        await expect_error(
            gpu.RegisterNode(request),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["node_id", "node.endpoint", "node.region", "node.cpu_cores"],
            domain=DOMAIN,
        )

    async def test_an_id_of_another_operator_is_taken(self, gpu: GpuStub) -> None:
        name, _ = await registered(gpu, Operator.new())
        await expect_error(
            gpu.RegisterNode(Operator.new().registration(name.removeprefix("nodes/"))),
            grpc.StatusCode.ALREADY_EXISTS,
            "NODE_ALREADY_EXISTS",
            domain=DOMAIN,
        )

    async def test_registering_again_replaces_the_endpoint_keeps_labels_and_revokes_the_old_token(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        node_id = unique_node_id()
        first = await gpu.RegisterNode(
            operator.registration(node_id, "10.0.0.1:8001", node=node_pb2.Node(labels={"a": "1"}))
        )
        second = await gpu.RegisterNode(
            operator.registration(node_id, "10.0.0.9:8001", node=node_pb2.Node(labels={"b": "2"}))
        )
        assert second.node.endpoint == "10.0.0.9:8001"
        assert dict(second.node.labels) == {"a": "1"}
        assert second.node.create_time == first.node.create_time
        assert second.agent_token != first.agent_token
        async with AgentStream.open(gpu, first.agent_token, f"nodes/{node_id}") as agent:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await agent.next()
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        node = await gpu.GetNode(get(f"nodes/{node_id}"), metadata=auth(operator.address))
        assert node.endpoint == "10.0.0.9:8001"


class TestVisibility:
    async def test_other_accounts_see_nothing_and_admins_see_everything(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        name, _ = await registered(gpu, operator)
        stranger = auth(Operator.new().address)
        await expect_error(
            gpu.GetNode(get(name), metadata=stranger), grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND", domain=DOMAIN
        )
        listed = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(), metadata=stranger)
        assert name not in [n.name for n in listed.nodes]
        admin = auth(Operator.new().address, "admin")
        assert (await gpu.GetNode(get(name), metadata=admin)).operator == operator.address

    async def test_reads_need_a_signed_in_account(self, gpu: GpuStub) -> None:
        name, _ = await registered(gpu, Operator.new())
        await expect_error(gpu.GetNode(get(name)), grpc.StatusCode.UNAUTHENTICATED, domain=DOMAIN)


class TestListNodes:
    async def test_filters_and_pages(self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]) -> None:
        operator = Operator.new()
        h100 = node_pb2.Node(
            region="us-east",
            labels={"pool": "a"},
            gpus=[node_pb2.GpuInventory(model_name="NVIDIA H100", memory_bytes=80 * 1024**3, count=1)],
        )
        a100 = node_pb2.Node(
            region="eu-west",
            labels={"pool": "b"},
            gpus=[node_pb2.GpuInventory(model_name="NVIDIA A100", memory_bytes=40 * 1024**3, count=1)],
        )
        names = [
            (await registered(gpu, operator, f"{p}-{secrets.token_hex(4)}", node=n))[0]
            for p, n in (("a", h100), ("b", a100), ("c", h100))
        ]
        me = auth(operator.address)

        async def listed(**filters: object) -> list[str]:
            response = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(**filters), metadata=me)  # type: ignore[arg-type]
            return [n.name for n in response.nodes]

        assert await listed() == sorted(names)
        assert await listed(region="eu-west") == [names[1]]
        assert await listed(gpu_model="nvidia h100") == [names[0], names[2]]
        assert await listed(labels=["pool=a"]) == [names[0], names[2]]
        assert await listed(states=[State.STATE_HEALTHY]) == []
        first = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(page_size=2), metadata=me)
        assert [n.name for n in first.nodes] == sorted(names)[:2]
        rest = await gpu.ListNodes(
            gpu_service_pb2.ListNodesRequest(page_size=2, page_token=first.next_page_token), metadata=me
        )
        assert [n.name for n in rest.nodes] == sorted(names)[2:]
        assert rest.next_page_token == ""
        await expect_error(
            gpu.ListNodes(
                gpu_service_pb2.ListNodesRequest(page_size=2, page_token=first.next_page_token, region="x"),
                metadata=me,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["page_token"],
            domain=DOMAIN,
        )

    async def test_the_state_filter_returns_the_nodes_in_those_states(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        me = auth(operator.address)
        (healthy, token), (drained, _), (registering, _) = [await registered(gpu, operator) for _ in range(3)]
        await gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=drained), metadata=me)

        async def listed(*states: int) -> list[str]:
            response = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(states=states), metadata=me)
            return [n.name for n in response.nodes]

        async with AgentStream.open(gpu, token, healthy) as agent:
            reporting = asyncio.create_task(agent.keep_reporting(1))  # HEALTHY for as long as it reports
            try:
                await wait_for_state(gpu, healthy, me, State.STATE_HEALTHY)
                assert await listed(State.STATE_HEALTHY) == [healthy]
                assert await listed(State.STATE_DRAINED) == [drained]
                assert await listed(State.STATE_REGISTERING) == [registering]
                assert await listed(State.STATE_HEALTHY, State.STATE_DRAINED) == sorted([healthy, drained])
                assert await listed(State.STATE_UNHEALTHY, State.STATE_DRAINING) == []
            finally:
                reporting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporting
        await gpu.DeregisterNode(gpu_service_pb2.DeregisterNodeRequest(name=drained), metadata=me)
        assert await listed(State.STATE_DEREGISTERED) == [drained]  # named, the one state left out by default
        assert drained not in await listed()

    async def test_loaded_model_and_free_memory_come_from_the_last_report(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        model = f"m-{secrets.token_hex(4)}"
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1, models=[(model, 1)], gpus=[(5.0, 10 * 1024**3, 80 * 1024**3)]))
            assert (await agent.next_of("ack")).ack.accepted
        me = auth(operator.address)
        found = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(loaded_model=model), metadata=me)
        assert [n.name for n in found.nodes] == [name]
        roomy = await gpu.ListNodes(
            gpu_service_pb2.ListNodesRequest(loaded_model=model, min_free_memory_bytes=70 * 1024**3), metadata=me
        )
        assert [n.name for n in roomy.nodes] == [name]
        cramped = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(min_free_memory_bytes=71 * 1024**3), metadata=me)
        assert name not in [n.name for n in cramped.nodes]


class TestUpdateNode:
    async def test_region_and_labels_change_with_an_etag(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        name, _ = await registered(gpu, operator)
        me = auth(operator.address)
        node = await gpu.GetNode(get(name), metadata=me)
        updated = await gpu.UpdateNode(
            gpu_service_pb2.UpdateNodeRequest(
                node=node_pb2.Node(name=name, region="ap-south", labels={"k": "v"}, etag=node.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["region", "labels"]),
            ),
            metadata=me,
        )
        assert (updated.region, dict(updated.labels)) == ("ap-south", {"k": "v"})
        assert updated.etag != node.etag
        await expect_error(
            gpu.UpdateNode(
                gpu_service_pb2.UpdateNodeRequest(node=node_pb2.Node(name=name, region="x", etag=node.etag)),
                metadata=me,
            ),
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
            domain=DOMAIN,
        )
        await expect_error(
            gpu.UpdateNode(
                gpu_service_pb2.UpdateNodeRequest(
                    node=node_pb2.Node(name=name, endpoint="1.2.3.4:1"),
                    update_mask=field_mask_pb2.FieldMask(paths=["endpoint"]),
                ),
                metadata=me,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["update_mask.paths[0]"],
            domain=DOMAIN,
        )


class TestLifecycle:
    async def test_drain_with_nothing_running_is_drained_then_resume_and_deregister(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        await expect_error(
            gpu.DeregisterNode(gpu_service_pb2.DeregisterNodeRequest(name=name), metadata=me),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NODE_NOT_DRAINED",
            domain=DOMAIN,
        )
        await expect_error(
            gpu.ResumeNode(gpu_service_pb2.ResumeNodeRequest(name=name), metadata=me),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NODE_NOT_DRAINING",
            domain=DOMAIN,
        )
        drained = await gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=name, reason="maintenance"), metadata=me)
        assert drained.state == State.STATE_DRAINED
        again = await gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=name), metadata=me)
        assert again == drained
        resumed = await gpu.ResumeNode(gpu_service_pb2.ResumeNodeRequest(name=name), metadata=me)
        assert resumed.state == State.STATE_UNHEALTHY  # no telemetry yet
        await gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=name), metadata=me)
        gone = await gpu.DeregisterNode(gpu_service_pb2.DeregisterNodeRequest(name=name), metadata=me)
        assert gone.state == State.STATE_DEREGISTERED
        assert (await gpu.GetNode(get(name), metadata=me)).state == State.STATE_DEREGISTERED
        listed = await gpu.ListNodes(gpu_service_pb2.ListNodesRequest(), metadata=me)
        assert name not in [n.name for n in listed.nodes]
        await expect_error(
            gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=name), metadata=me),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NODE_DEREGISTERED",
            domain=DOMAIN,
        )
        async with AgentStream.open(gpu, token, name) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await agent.next()
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def test_a_busy_node_drains_when_its_requests_finish(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1, models=[("llm", 1)], active=2))
            await agent.next_of("ack")
            draining = await gpu.DrainNode(
                gpu_service_pb2.DrainNodeRequest(
                    name=name, reason="kernel update", grace_period=duration_pb2.Duration(seconds=600)
                ),
                metadata=me,
            )
            assert draining.state == State.STATE_DRAINING
            assert draining.state_message == "kernel update"
            notice = (await agent.next_of("drain")).drain
            assert notice.reason == "kernel update"
            assert notice.deadline.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(minutes=9)
            await agent.send(report(2, models=[("llm", 1)], active=1))
            await agent.next_of("ack")
            assert (await gpu.GetNode(get(name), metadata=me)).state == State.STATE_DRAINING
            await agent.send(report(3, models=[("llm", 1)]))
            await agent.next_of("ack")
            assert (await gpu.GetNode(get(name), metadata=me)).state == State.STATE_DRAINED

    async def test_a_zero_grace_period_drains_at_once(
        self, gpu: GpuStub, auth: Callable[..., tuple[tuple[str, str], ...]]
    ) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1, models=[("llm", 1)], active=3))
            await agent.next_of("ack")
            drained = await gpu.DrainNode(
                gpu_service_pb2.DrainNodeRequest(name=name, grace_period=duration_pb2.Duration()), metadata=me
            )
        assert drained.state == State.STATE_DRAINED
