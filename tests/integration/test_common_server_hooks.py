"""RunningServer.stop() runs the `Runtime.on_stopping` hooks while calls still run, then stops, then closes.

A probe service with one long server stream: its stopping hook tells the stream to say goodbye and waits
until it has, so the caller gets a last message and status OK instead of a cancelled call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common import server as server_module
from servers.common.config import Settings
from servers.common.server import Runtime, ServiceSpec, start_server
from tests.integration.probe_contract import PUBLIC, Kind, declare_probe

pytestmark = pytest.mark.integration

PROBE = "far.test.v1.HookProbeService"
Text = wrappers_pb2.StringValue
Context = grpc.aio.ServicerContext[Any, Any]
Health = health_pb2.HealthCheckResponse

declare_probe(PROBE, {"Watch": (Kind.SERVER_STREAM, PUBLIC)})


class WatchService:
    """`Watch` says `started`, then `bye` once told to finish; `order` records the hooks as they run."""

    def __init__(self) -> None:
        self.channel: grpc.aio.Channel | None = None  # the test's channel, for the health check in the hook
        self.order: list[str] = []
        self.health_when_stopping: list[int] = []
        self._finish = asyncio.Event()
        self._finished = asyncio.Event()

    async def Watch(self, request: Text, context: Context) -> AsyncIterator[Text]:
        try:
            yield Text(value="started")
            await self._finish.wait()
            yield Text(value="bye")
        finally:
            self._finished.set()

    async def failing_hook(self) -> None:
        self.order.append("failing")
        raise RuntimeError("a broken hook must not stop the others")

    async def say_goodbye(self) -> None:
        self.order.append("stopping")
        assert self.channel is not None
        answer = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=PROBE))
        self.health_when_stopping.append(answer.status)
        self._finish.set()
        await self._finished.wait()

    async def close(self) -> None:
        self.order.append("close")

    def spec(self) -> ServiceSpec:
        async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
            watch = grpc.unary_stream_rpc_method_handler(
                self.Watch, request_deserializer=Text.FromString, response_serializer=Text.SerializeToString
            )
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, {"Watch": watch}),))
            runtime.on_close(self.close)
            runtime.on_stopping(self.failing_hook)
            runtime.on_stopping(self.say_goodbye)

        return ServiceSpec(
            name="probe", default_port=0, service_names=[PROBE], setup=setup, uses_database=False, uses_redis=False
        )


def probe_settings(jwt_secret: str) -> Settings:
    environ = {
        "JWT_SECRET": jwt_secret,
        "GRPC_LISTEN": "127.0.0.1:0",
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }
    return Settings.from_env("probe", 0, environ=environ)


class TestStoppingHooks:
    async def test_hooks_run_before_calls_are_cancelled_and_before_closing(self, jwt_secret: str) -> None:
        service = WatchService()
        running = await start_server(service.spec(), probe_settings(jwt_secret))
        stopping: asyncio.Task[None] | None = None
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                service.channel = channel
                watch = channel.unary_stream(
                    f"/{PROBE}/Watch", request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
                )
                call = watch(Text(value="x"))
                assert await call.read() == Text(value="started")
                stopping = asyncio.create_task(running.stop())
                assert await call.read() == Text(value="bye")
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
        finally:
            if stopping is None:
                stopping = asyncio.create_task(running.stop())
            await stopping
        assert service.order == ["failing", "stopping", "close"]
        assert service.health_when_stopping == [Health.NOT_SERVING]


class StuckSteps:
    """A stopping hook and a closer that never finish, and a closer that records it ran after them."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.closed_after_stuck = False

    async def _hang(self, name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise

    async def stuck_hook(self) -> None:
        await self._hang("hook")

    async def stuck_closer(self) -> None:
        await self._hang("closer")

    async def last_closer(self) -> None:
        self.closed_after_stuck = True

    def spec(self) -> ServiceSpec:
        async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
            runtime.on_close(self.last_closer)  # registered first, so it runs last
            runtime.on_close(self.stuck_closer)
            runtime.on_stopping(self.stuck_hook)

        return ServiceSpec(
            name="probe", default_port=0, service_names=[], setup=setup, uses_database=False, uses_redis=False
        )


class TestStuckShutdownSteps:
    async def test_a_step_that_never_ends_is_cancelled_and_the_steps_after_it_still_run(
        self, jwt_secret: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(server_module, "SHUTDOWN_STEP_S", 0.2)
        steps = StuckSteps()
        running = await start_server(steps.spec(), probe_settings(jwt_secret))
        async with asyncio.timeout(5 + 3 * 0.2 + 2):  # grace + the bounded steps + slack
            await running.stop()
        assert steps.cancelled == ["hook", "closer"]
        assert steps.closed_after_stuck

    async def test_a_step_that_ignores_its_cancel_is_left_behind(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`asyncio.wait_for` would wait for it forever; the shutdown goes on after CANCEL_WAIT_S."""
        monkeypatch.setattr(server_module, "CANCEL_WAIT_S", 0.1)
        release = asyncio.Event()
        cancels = 0

        async def stubborn() -> None:
            nonlocal cancels
            while True:
                try:
                    await release.wait()
                    return
                except asyncio.CancelledError:
                    cancels += 1

        started = time.monotonic()
        finished = await server_module._bounded(stubborn(), 0.1)
        elapsed = time.monotonic() - started
        release.set()  # let it end, so that nothing outlives the test
        await asyncio.sleep(0)
        assert finished is False
        assert cancels == 1
        assert elapsed < 1.0
