"""StreamTelemetry round trips: heartbeat and health, silence, placement, drain notices and every way a stream ends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, node_pb2
from google.protobuf import duration_pb2
from redis.asyncio import Redis

from servers.common.config import Settings
from servers.common.events import EventBus
from servers.common.server import start_server
from servers.gpu.server import GpuApp
from tests.integration.gpu_support import (
    REPORT_INTERVAL_S,
    AgentStream,
    GpuStub,
    Operator,
    RunningGpu,
    registered,
    report,
    running_gpu,
    wait_for_state,
)

State = node_pb2.Node.State
Closed = gpu_service_pb2.StreamClosed
Auth = Callable[..., tuple[tuple[str, str], ...]]
# The documented silence bounds, in report intervals (servers/gpu/sweeper.py, docs/architecture.md): a stream
# without a report closes IDLE after 3; a silent node is UNHEALTHY at most 4 after its last report (3 for its live
# key to expire, 1 for the next sweep). MARGIN is one more interval (0.5 s) for a loaded 2-core machine: the
# sweep's transaction, the event loop's lag and the 50 ms GetNode polling all land on top of the bound.
IDLE_AFTER, UNHEALTHY_AFTER, MARGIN = 3, 4, 1
pytestmark = pytest.mark.integration


async def node_events(bus: EventBus, name: str) -> list[node_pb2.Node]:
    """The Node events of `name` published on `gpu.nodes` so far, oldest first."""
    found, after = [], "-"
    while deliveries := await bus.read_range("gpu.nodes", after=after, count=500):
        for delivery in deliveries:
            node = node_pb2.Node()
            delivery.parse(node)
            if node.name == name:
                found.append(node)
        after = deliveries[-1].id
    return found


class TestOpening:
    async def test_config_then_placement_then_acks(self, gpu: GpuStub) -> None:
        name, token = await registered(gpu, Operator.new())
        async with AgentStream.open(gpu, token, name) as agent:
            config = (await agent.next()).config
            assert config.report_interval.ToTimedelta() == timedelta(seconds=REPORT_INTERVAL_S)
            placement = (await agent.next()).placement
            assert (placement.revision, list(placement.desired)) == (0, [])
            await agent.send(report(1))
            ack = (await agent.next()).ack
            assert (ack.sequence, ack.accepted, ack.reason) == (1, True, "")

    async def test_a_token_for_another_node_is_refused(self, gpu: GpuStub) -> None:
        operator = Operator.new()
        other, _ = await registered(gpu, operator)
        _, token = await registered(gpu, operator)
        async with AgentStream.open(gpu, token, other) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await agent.next()
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def test_an_unknown_token_is_unauthenticated(self, gpu: GpuStub) -> None:
        async with AgentStream.open(gpu, "fna_" + "x" * 43, "nodes/nope") as agent:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await agent.next()
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def test_an_account_token_cannot_stream(self, gpu: GpuStub, make_token: Callable[..., str]) -> None:
        name, _ = await registered(gpu, Operator.new())
        async with AgentStream.open(gpu, make_token(Operator.new().address, ("admin",)), name) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await agent.next()
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


class TestReports:
    async def test_malformed_reports_are_refused_in_their_ack_and_the_stream_goes_on(self, gpu: GpuStub) -> None:
        name, token = await registered(gpu, Operator.new())
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1))
            assert (await agent.next_of("ack")).ack.accepted
            await agent.send(report(1))
            stale = (await agent.next_of("ack")).ack
            assert (stale.sequence, stale.accepted) == (1, False)
            assert "sequence" in stale.reason
            await agent.send(report(2, sample_time=datetime.now(UTC) - timedelta(minutes=7)))
            skewed = (await agent.next_of("ack")).ack
            assert not skewed.accepted
            assert "minutes off" in skewed.reason
            await agent.send(report(3))
            assert (await agent.next_of("ack")).ack.accepted

    async def test_a_healthy_report_makes_the_node_healthy_and_a_bad_one_unhealthy(
        self, gpu: GpuStub, auth: Auth, bus: EventBus
    ) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1, models=[("llm", 3)]))
            await agent.next_of("ack")
            node = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=me)
            assert node.state == State.STATE_HEALTHY
            assert node.HasField("last_seen_time")
            assert [(m.model, m.version, m.state) for m in node.loaded_models] == [
                ("llm", 3, node_pb2.MODEL_STATE_READY)
            ]
            assert (node.agent_version, node.triton_version) == ("0.1.0", "2.51.0")
            await agent.send(report(2, healthy=False))
            await agent.next_of("ack")
            sick = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=me)
            assert sick.state == State.STATE_UNHEALTHY
            assert "Triton" in sick.state_message
        states = [event.state for event in await node_events(bus, name)]
        assert states[:2] == [State.STATE_REGISTERING, State.STATE_HEALTHY]
        assert states[-1] == State.STATE_UNHEALTHY


class TestSilence:
    async def test_a_silent_node_turns_unhealthy_and_its_idle_stream_closes(
        self, gpu: GpuStub, auth: Auth, bus: EventBus
    ) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        loop = asyncio.get_running_loop()
        async with AgentStream.open(gpu, token, name) as agent:
            last_report = loop.time()  # the service's idle timer and live key start after this, never before
            await agent.send(report(1))
            await agent.next_of("ack")
            await wait_for_state(gpu, name, me, State.STATE_HEALTHY)
            closed = await agent.closed(within_s=(IDLE_AFTER + MARGIN) * REPORT_INTERVAL_S)
            closed_after = (loop.time() - last_report) / REPORT_INTERVAL_S
        assert closed.reason == Closed.REASON_IDLE
        node = await wait_for_state(
            gpu, name, me, State.STATE_UNHEALTHY, within_s=(UNHEALTHY_AFTER + MARGIN) * REPORT_INTERVAL_S
        )
        unhealthy_after = (loop.time() - last_report) / REPORT_INTERVAL_S
        # In report intervals: never early, and late by at most MARGIN.
        assert IDLE_AFTER <= closed_after <= IDLE_AFTER + MARGIN
        assert IDLE_AFTER <= unhealthy_after <= UNHEALTHY_AFTER + MARGIN
        assert "no telemetry" in node.state_message
        assert (await node_events(bus, name))[-1].state == State.STATE_UNHEALTHY
        async with AgentStream.open(gpu, token, name) as agent:  # the agent reconnects: healthy again
            await agent.send(report(1))
            await agent.next_of("ack")
        await wait_for_state(gpu, name, me, State.STATE_HEALTHY)
        states = [event.state for event in await node_events(bus, name)]
        assert State.STATE_HEALTHY in states[states.index(State.STATE_UNHEALTHY) + 1 :]

    async def test_a_sweep_between_a_reports_commit_and_its_live_key_leaves_the_node_healthy(
        self, gpu: GpuStub, gpu_server: RunningGpu, auth: Auth, redis_client: Redis, redis_key_prefix: str
    ) -> None:
        # A report commits HEALTHY, then writes the live key: a sweep in between found a HEALTHY row without a key
        # and turned a node that had just reported UNHEALTHY until its next report. Deleting the key reproduces it.
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1))
            await agent.next_of("ack")
            assert await redis_client.delete(f"{redis_key_prefix}gpu:live:{name.removeprefix('nodes/')}") == 1
            assert gpu_server.app.sweeper is not None
            await gpu_server.app.sweeper.sweep_once()
            node = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=me)
        assert node.state == State.STATE_HEALTHY


class TestPlacement:
    async def test_placement_goes_down_the_stream_and_follows_the_reports(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.next_of("placement")
            await agent.send(report(1, models=[("old", 1)]))
            await agent.next_of("ack")
            node = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=me)
            placed = await gpu.SetModelPlacement(
                gpu_service_pb2.SetModelPlacementRequest(
                    name=name, models=[node_pb2.ModelPlacement(model="llm", version=2)], etag=node.etag
                ),
                metadata=me,
            )
            assert [(m.model, m.version) for m in placed.desired_models] == [("llm", 2)]
            instruction = (await agent.next_of("placement")).placement
            assert instruction.revision == 1
            assert [(m.model, m.version) for m in instruction.load] == [("llm", 2)]
            assert [(m.model, m.version) for m in instruction.unload] == [("old", 1)]
            await agent.send(report(2, models=[("llm", 2)]))
            await agent.next_of("ack")
        reopened_name, reopened = name, await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=me)
        assert [(m.model, m.version) for m in reopened.loaded_models] == [("llm", 2)]
        async with AgentStream.open(gpu, token, reopened_name) as agent:
            instruction = (await agent.next_of("placement")).placement
            assert (instruction.revision, list(instruction.load), list(instruction.unload)) == (1, [], [])
        await_stale = gpu.SetModelPlacement(
            gpu_service_pb2.SetModelPlacementRequest(name=name, etag=node.etag), metadata=me
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await await_stale
        assert failure.value.code() == grpc.StatusCode.ABORTED

    async def test_the_same_placement_is_sent_again_with_a_new_revision(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            assert (await agent.next_of("placement")).placement.revision == 0
            await agent.send(report(1, models=[("preloaded", 1)]))  # what Triton was started with
            await agent.next_of("ack")
            etag = (await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=me)).etag
            for revision in (1, 2):  # an explicit empty set, twice: each time the agent is told to unload
                placed = await gpu.SetModelPlacement(
                    gpu_service_pb2.SetModelPlacementRequest(name=name, etag=etag), metadata=me
                )
                assert list(placed.desired_models) == []
                assert placed.etag != etag
                etag = placed.etag
                instruction = (await agent.next_of("placement")).placement
                assert (instruction.revision, list(instruction.desired)) == (revision, [])
                assert [(m.model, m.version) for m in instruction.unload] == [("preloaded", 1)]

    async def test_bad_placements_are_invalid(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, _ = await registered(gpu, operator)
        request = gpu_service_pb2.SetModelPlacementRequest(
            name=name, models=[node_pb2.ModelPlacement(model="a b"), node_pb2.ModelPlacement(model="x")] * 1
        )
        request.models.append(node_pb2.ModelPlacement(model="x"))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gpu.SetModelPlacement(request, metadata=auth(operator.address))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestDrainNotice:
    async def test_the_reason_reaches_every_stream_until_the_node_is_resumed(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.send(report(1, models=[("llm", 1)], active=1))  # a request running: DRAINING until it ends
            await agent.next_of("ack")
            drained = await gpu.DrainNode(
                gpu_service_pb2.DrainNodeRequest(
                    name=name, reason="disk swap", grace_period=duration_pb2.Duration(seconds=600)
                ),
                metadata=me,
            )
            assert drained.state == State.STATE_DRAINING
            assert (await agent.next_of("drain")).drain.reason == "disk swap"
        async with AgentStream.open(gpu, token, name) as agent:  # the agent reconnects while DRAINING
            assert (await agent.next_of("drain")).drain.reason == "disk swap"
            await agent.send(report(1, models=[("llm", 1)]))  # the request finished
            await agent.next_of("ack")
        node = await wait_for_state(gpu, name, me, State.STATE_DRAINED)
        assert node.state_message == ""
        async with AgentStream.open(gpu, token, name) as agent:  # and once DRAINED
            assert (await agent.next_of("drain")).drain.reason == "disk swap"
        await gpu.ResumeNode(gpu_service_pb2.ResumeNodeRequest(name=name), metadata=me)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.next_of("placement")
            await agent.send(report(1))
            assert (await agent.next()).WhichOneof("instruction") == "ack"  # no drain notice any more

    async def test_a_node_drained_at_once_gets_the_reason_too(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        me = auth(operator.address)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.next_of("placement")
            drained = await gpu.DrainNode(gpu_service_pb2.DrainNodeRequest(name=name, reason="move"), metadata=me)
            assert drained.state == State.STATE_DRAINED  # nothing was running
            assert (await agent.next_of("drain")).drain.reason == "move"


class TestClosing:
    async def test_half_close_ends_with_client_closed(self, gpu: GpuStub) -> None:
        name, token = await registered(gpu, Operator.new())
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.next_of("placement")
            agent.half_close()
            assert (await agent.closed()).reason == Closed.REASON_CLIENT_CLOSED

    async def test_a_newer_stream_supersedes_the_older(self, gpu: GpuStub) -> None:
        name, token = await registered(gpu, Operator.new())
        async with AgentStream.open(gpu, token, name) as older:
            await older.next_of("placement")
            async with AgentStream.open(gpu, token, name) as newer:
                await newer.next_of("placement")
                assert (await older.closed()).reason == Closed.REASON_SUPERSEDED
                await newer.send(report(1))
                assert (await newer.next_of("ack")).ack.accepted

    async def test_deregistration_closes_the_stream(self, gpu: GpuStub, auth: Auth) -> None:
        operator = Operator.new()
        name, token = await registered(gpu, operator)
        async with AgentStream.open(gpu, token, name) as agent:
            await agent.next_of("placement")
            await gpu.DeregisterNode(
                gpu_service_pb2.DeregisterNodeRequest(name=name, force=True), metadata=auth(operator.address)
            )
            assert (await agent.closed()).reason == Closed.REASON_DEREGISTERED

    async def test_a_server_stop_ends_the_stream_with_server_shutdown(self, service_env: dict[str, str]) -> None:
        environ = {"GPU_REPORT_INTERVAL_S": str(REPORT_INTERVAL_S), **service_env, "GRPC_LISTEN": "127.0.0.1:0"}
        replica = await start_server(GpuApp(environ).spec(), Settings.from_env("gpu", 0, environ=environ))
        stopping: asyncio.Task[None] | None = None
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                gpu = gpu_service_pb2_grpc.GpuServiceStub(channel)
                name, token = await registered(gpu, Operator.new())
                async with AgentStream.open(gpu, token, name) as agent:
                    await agent.next_of("placement")
                    stopping = asyncio.create_task(replica.stop())
                    closed = await agent.closed()  # a final message and status OK, not a cancelled call
                    assert closed.reason == Closed.REASON_SERVER_SHUTDOWN
                    assert "reconnect" in closed.message
        finally:
            if stopping is None:
                stopping = asyncio.create_task(replica.stop())
            await stopping


class TestReplicas:
    async def test_commands_on_one_replica_reach_a_stream_on_another(
        self, gpu: GpuStub, service_env: dict[str, str], auth: Auth
    ) -> None:
        operator = Operator.new()
        me = auth(operator.address)
        name, token = await registered(gpu, operator)
        async with (
            running_gpu(service_env) as replica,
            grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel,
        ):
            other = gpu_service_pb2_grpc.GpuServiceStub(channel)
            async with AgentStream.open(gpu, token, name) as first:
                await first.next_of("placement")
                await other.SetModelPlacement(
                    gpu_service_pb2.SetModelPlacementRequest(name=name, models=[node_pb2.ModelPlacement(model="llm")]),
                    metadata=me,
                )
                assert [m.model for m in (await first.next_of("placement")).placement.desired] == ["llm"]
                await other.DrainNode(gpu_service_pb2.DrainNodeRequest(name=name, reason="move"), metadata=me)
                assert (await first.next_of("drain")).drain.reason == "move"
                async with AgentStream.open(other, token, name) as second:
                    await second.next_of("placement")
                    assert (await first.closed()).reason == Closed.REASON_SUPERSEDED
                    await gpu.DeregisterNode(gpu_service_pb2.DeregisterNodeRequest(name=name, force=True), metadata=me)
                    assert (await second.closed()).reason == Closed.REASON_DEREGISTERED
